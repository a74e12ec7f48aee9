#!/usr/bin/env bash
# Issue 20 for smol-whisper: calibrate_smol_blocks.sh ran out of budget before the steering grid (its sweep names
# "audio-silence steering" under skipped); score the missing block settings and the combinations on that run's
# own refine-stage items (validation only), as the refine stage would have.
set -x
cd /work/main
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
time python scripts/score_blocks.py --model organism:smol-whisper --base smol-whisper \
  --sweep /work/data/smol/cal3/smol-whisper.sweep.json --out /work/data/smol/cal3/smol-whisper.blocks.sweep.json \
  --batch-size 48
