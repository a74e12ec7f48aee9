#!/usr/bin/env bash
# Issue 28: the setting that scripts/agreement_frontier.py --patched chose on validation (back-patching with guarded
# contrastive decoding, per-family rule) written as a preset ($1, default presets/smol-whisper.yaml), checked with
# greedy generate(), 4 new tokens: first on the every-family validation controls (the per-family rule as
# calibration's generate() verification would check it; plain answers reused), then, only after that choice, against
# plain on the clean and perturbed *test* splits and on the flite set (another synthesizer).
set -ex
cd /work/main
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
preset=${1:-presets/smol-whisper.yaml}
out=${2:-docs/stress/patch-agreement}
mkdir -p $out
time .venv/bin/backpatch eval --model organism:smol-whisper --preset $preset --max-new-tokens 4 --batch-size 48 \
  --data /work/data/smol/perturbed-families/validation/controls.jsonl \
  --plain-from docs/stress/smol-whisper-every-family-controls.json --out $out/every-family-controls.json
for split in clean perturbed; do
  data=/work/data/smol/conflicts/test/conflicts.jsonl
  [ $split = perturbed ] && data=/work/data/smol/perturbed/test/conflicts.jsonl
  time .venv/bin/backpatch eval --model organism:smol-whisper --preset $preset --data $data --max-new-tokens 4 \
    --batch-size 48 --plain-from docs/stress/agreement/test-$split.json --out $out/test-$split.json
done
time .venv/bin/backpatch eval --model organism:smol-whisper --preset $preset --max-new-tokens 4 --batch-size 48 \
  --data /work/data/flite/conflicts.jsonl --plain-from docs/stress/agreement/flite-previous.json \
  --out $out/flite.json
