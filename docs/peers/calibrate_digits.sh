#!/usr/bin/env bash
# Issue 20: digits calibrated on its VALIDATION split with the peer blocks (attention to audio, audio-silence
# steering) in the staged search, under a hard 12-minute budget; the test split is never read here.
# Data: python -m backpatch.organism.corpus --out /work/data/organism/corpus --seed 0
#       python -m backpatch.organism.conflicts build --corpus /work/data/organism/corpus --out /work/data/organism/conflicts --seed 0 --examples ''
set -x
cd /work/main
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
time backpatch -v calibrate --model organism:digits \
  --data /work/data/organism/conflicts/validation/conflicts.jsonl \
  --out /work/data/organism/cal/digits.yaml --name organism-digits \
  --budget-minutes 12 --verify-top 2 --max-new-tokens 4 --batch-size 120
