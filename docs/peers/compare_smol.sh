#!/usr/bin/env bash
# Issue 20's table for smol-whisper: every method's setting from the validation sweep (calibrate_smol_blocks.sh),
# then the TEST split (clean) once per method, against the same plain answers.
set -x
cd /work/main
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
time python scripts/peer_comparison.py --model organism:smol-whisper --base smol-whisper \
  --sweep /work/data/smol/cal3/smol-whisper.blocks.sweep.json --best smol-whisper --test /work/data/smol/conflicts/test/conflicts.jsonl \
  --out docs/peers/smol-whisper.json --batch-size 48
