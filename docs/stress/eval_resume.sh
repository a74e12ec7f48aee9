#!/usr/bin/env bash
# Test-split evaluation of the second recalibration (calibrate_resume.sh), clean and perturbed test, issue 18.
# Waits for the calibration; reuses the plain answers of the old preset's reports (same items and settings).
set -x
while pgrep -f calibrate_resume.sh > /dev/null; do sleep 10; done
cd /work/main
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
for split in clean perturbed; do
  data=/work/data/smol/conflicts/test/conflicts.jsonl
  [ $split = perturbed ] && data=/work/data/smol/perturbed/test/conflicts.jsonl
  time backpatch eval --model organism:smol-whisper --preset /work/data/smol/cal2/smol-whisper.yaml \
    --data $data --out /work/data/smol/cal2/test-$split-resumed.json --max-new-tokens 4 --batch-size 48 \
    --plain-from /work/data/smol/cal/test-$split-old.json
done
