#!/usr/bin/env bash
# Issue 20's table for digits: every method's setting from the validation sweep (calibrate_digits.sh), then the
# TEST split once per method, against the same plain answers.
set -x
cd /work/main
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
time python scripts/peer_comparison.py --model organism:digits --base organism-digits \
  --sweep /work/data/organism/cal/digits.sweep.json --test /work/data/organism/conflicts/test/conflicts.jsonl \
  --out docs/peers/digits.json
