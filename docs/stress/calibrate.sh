#!/usr/bin/env bash
# Recalibration of smol-whisper for issue 18: clean + perturbed validation, paired no-harm rule, gates.
# Waits for the running old-preset evaluation (one long job at a time on 2 cores).
set -x
while pgrep -f eval_old.sh > /dev/null; do sleep 10; done
cd /work/main
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
time backpatch -v calibrate --model organism:smol-whisper \
  --data /work/data/smol/conflicts/validation/conflicts.jsonl \
  --stress-data /work/data/smol/perturbed/validation/conflicts.jsonl \
  --out /work/data/smol/cal/smol-whisper.yaml --name smol-whisper \
  --budget-minutes 55 --skip-full-stage --verify-top 2 --max-new-tokens 4 --batch-size 48
