#!/usr/bin/env bash
# Second recalibration of smol-whisper for issue 18: the first run (calibrate.sh) was cut by its budget at coarse
# 102/300 and refine 56/223, with the refine stage ordered by setting name. This run resumes it (its scored settings
# are reused, not rescored), with the refine stage in priority order (contrastive alone, then the best coarse
# settings with their alphas and gates, the strongest, the neighbours), alpha 3 added, and audio_gap ramps.
# Validation data only (clean + perturbed); the test splits are never read here.
set -x
cd /work/main
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
mkdir -p /work/data/smol/cal2
time backpatch -v calibrate --model organism:smol-whisper \
  --data /work/data/smol/conflicts/validation/conflicts.jsonl \
  --stress-data /work/data/smol/perturbed/validation/conflicts.jsonl \
  --out /work/data/smol/cal2/smol-whisper.yaml --name smol-whisper \
  --resume docs/stress/smol-whisper-gated.sweep.json --alphas 1,2,3,4 \
  --budget-minutes 50 --skip-full-stage --verify-top 2 --max-new-tokens 4 --batch-size 48
