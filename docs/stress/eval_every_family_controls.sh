#!/usr/bin/env bash
# Issue 28: the shipped smol-whisper preset against plain on the control items (consistent + audio-only) of the
# every-family perturbed *validation* set: every validation clip once under each perturbation family, so each
# family's paired no-harm bound rests on 240 consistent and 240 audio-only items (the one-level-per-clip set gave
# 12-65). Validation only: this is the data a per-family rule would choose on.
set -x
cd /work/main
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
.venv/bin/python -m backpatch.organism.perturb build --corpus /work/data/smol/corpus \
  --out /work/data/smol/perturbed-families --seed 0 --every-family
python3 - <<'PY'
import json
d = "/work/data/smol/perturbed-families/validation/"
rows = [json.loads(line) for line in open(d + "conflicts.jsonl")]
open(d + "controls.jsonl", "w").write("".join(json.dumps(r) + "\n" for r in rows if r["kind"] != "conflict"))
PY
time .venv/bin/backpatch eval --model organism:smol-whisper --max-new-tokens 4 --batch-size 48 \
  --data /work/data/smol/perturbed-families/validation/controls.jsonl \
  --out docs/stress/smol-whisper-every-family-controls.json
