#!/usr/bin/env bash
# Issue 20's table for smol-whisper: every method's setting from the validation sweep (calibrate_smol_blocks.sh),
# then the TEST split (clean) once per method, against the same plain answers; time ratios on one batch of 48
# items, median of 3 runs (the 2-core machine: 240 items x 3 runs would take 40 min more).
set -x
cd /work/main
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
time python scripts/peer_comparison.py --model organism:smol-whisper --base smol-whisper \
  --sweep /work/data/smol/cal3/smol-whisper.blocks.sweep.json --best smol-whisper --test /work/data/smol/conflicts/test/conflicts.jsonl \
  --out docs/peers/smol-whisper.json --batch-size 48 --time-items 48 --runs 3
