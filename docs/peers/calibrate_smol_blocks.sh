#!/usr/bin/env bash
# Issue 20 for smol-whisper: the resumed recalibration's search (docs/stress/calibrate_resume.sh) resumed once more
# with the peer blocks (attention to audio, audio-silence steering) in its refine stage; validation only, a hard
# 50-minute budget (30 leave the search about 1.5 minutes: the plain pass is 5 min, the reserve 4x that).
# Its sweep feeds scripts/peer_comparison.py (issue 20). Log: /work/data/smol/cal3.log.
set -x
cd /work/main
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
mkdir -p /work/data/smol/cal3
time backpatch calibrate --model organism:smol-whisper \
  --data /work/data/smol/conflicts/validation/conflicts.jsonl \
  --stress-data /work/data/smol/perturbed/validation/conflicts.jsonl \
  --out /work/data/smol/cal3/smol-whisper.yaml --name smol-whisper \
  --resume docs/stress/smol-whisper-resumed.sweep.json --alphas 1,2,3,4 \
  --budget-minutes 50 --skip-full-stage --verify-top 2 --max-new-tokens 4 --batch-size 48
