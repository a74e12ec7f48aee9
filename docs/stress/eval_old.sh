#!/usr/bin/env bash
# Test-split evaluation of the previously shipped smol-whisper preset (clean and perturbed test), issue 18.
set -x
cd /work/main
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
for split in clean perturbed; do
  data=/work/data/smol/conflicts/test/conflicts.jsonl
  [ $split = perturbed ] && data=/work/data/smol/perturbed/test/conflicts.jsonl
  time backpatch eval --model organism:smol-whisper --preset /work/data/smol/cal/old-smol-whisper.yaml \
    --data $data --out /work/data/smol/cal/test-$split-old.json --max-new-tokens 4 --batch-size 48
done
