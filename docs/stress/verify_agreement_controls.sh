#!/usr/bin/env bash
# Issue 28: the shipped preset (chosen by scripts/agreement_frontier.py on first answer tokens) verified with greedy
# generate(), 4 new tokens, on the control items of the every-family validation set (240 consistent + 240 audio-only
# per family; built by eval_every_family_controls.sh, whose plain answers are reused): the per-family rule as
# calibration's generate() verification would check it. Validation only.
set -x
cd /work/main
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
time .venv/bin/backpatch eval --model organism:smol-whisper --preset presets/smol-whisper.yaml --max-new-tokens 4 \
  --batch-size 48 --data /work/data/smol/perturbed-families/validation/controls.jsonl \
  --plain-from docs/stress/smol-whisper-every-family-controls.json \
  --out docs/stress/agreement/every-family-controls.json
