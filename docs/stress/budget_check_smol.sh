#!/usr/bin/env bash
# Issue 21 point 3 on smol-whisper: the case (--budget-minutes 8 on the 1200-item validation set, which ran
# 12.6 min before), and the same budget on 240 items (--limit), which fits.
set -x
cd /work/main
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
time backpatch calibrate --model organism:smol-whisper --data /work/data/smol/conflicts/validation/conflicts.jsonl \
  --out /work/data/smol/budget8.yaml --budget-minutes 8 --max-new-tokens 4 --batch-size 48
time backpatch calibrate --model organism:smol-whisper --data /work/data/smol/conflicts/validation/conflicts.jsonl \
  --out /work/data/smol/budget8-limit.yaml --budget-minutes 8 --max-new-tokens 4 --batch-size 48 --limit 240
