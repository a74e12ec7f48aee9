#!/usr/bin/env bash
# Issue 21 point 3, measured: a calibration whose budget is far below what the search wants (digits, 3 minutes,
# on a machine busy with another job) must end within 10% of it, name what it skipped, and say only what it searched.
set -x
cd /work/main
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
time backpatch calibrate --model organism:digits \
  --data /work/data/organism/conflicts/validation/conflicts.jsonl \
  --out /work/data/organism/cal/budget3.yaml --budget-minutes 3 --verify-top 3 --max-new-tokens 4 --batch-size 120
