#!/usr/bin/env bash
# Issue 28: the previous shipped preset (contrastive alpha 2, audio_gap 0.1..0.3) and the one chosen by the per-family
# rule (alpha 1, agreement 0.3, audio_gap 0.2..0.4) against plain on the flite set (build_flite_set.sh): another
# synthesizer, read only after the choice.
set -x
cd /work/main
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
.venv/bin/backpatch eval --model organism:smol-whisper --preset docs/stress/smol-whisper-resumed.yaml \
  --data /work/data/flite/conflicts.jsonl --out /work/data/smol/cal6/flite-previous.json --max-new-tokens 4 --batch-size 48
.venv/bin/backpatch eval --model organism:smol-whisper --preset presets/smol-whisper.yaml \
  --data /work/data/flite/conflicts.jsonl --out /work/data/smol/cal6/flite-new.json --max-new-tokens 4 --batch-size 48 \
  --plain-from /work/data/smol/cal6/flite-previous.json
