#!/usr/bin/env bash
# Issue 28: the setting chosen on validation by the per-family rule (scripts/agreement_frontier.py: contrastive
# alpha 1, agreement guard 0.3, audio_gap gate 0.2..0.4) against plain on the clean and perturbed *test* splits,
# greedy generate(), 4 new tokens. Test data is read here only, after the choice.
set -x
cd /work/main
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
for split in clean perturbed; do
  data=/work/data/smol/conflicts/test/conflicts.jsonl
  [ $split = perturbed ] && data=/work/data/smol/perturbed/test/conflicts.jsonl
  time .venv/bin/backpatch eval --model organism:smol-whisper --preset presets/smol-whisper.yaml \
    --data $data --out /work/data/smol/cal6/test-$split.json --max-new-tokens 4 --batch-size 48
done
