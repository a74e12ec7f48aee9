#!/usr/bin/env bash
# README "`digits`: trained from scratch": the shipped digits organism and its test metrics.
# Rebuild the model organism from scratch: corpus -> train -> conflict sets -> test metrics.
# Needs espeak-ng and sox on PATH; CPU only, about 10-12 minutes on 2 idle cores.
# Usage: scripts/organism/reproduce.sh [DATA_DIR]   (default /work/data/organism; nothing big goes in the repo)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DATA="${1:-/work/data/organism}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
SEED="${SEED:-0}"

python -m backpatch.organism.corpus --out "$DATA/corpus" --seed "$SEED"
python -m backpatch.organism.train --corpus "$DATA/corpus" --run-dir "$DATA/run-s$SEED" --seed "$SEED" \
    --out "$ROOT/backpatch/organism/digits"
python -m backpatch.organism.conflicts build --corpus "$DATA/corpus" --out "$DATA/conflicts" --seed 0 \
    --examples "$ROOT/backpatch/organism/examples"
for split in validation test; do
    python -m backpatch.organism.conflicts eval --model "$ROOT/backpatch/organism/digits" \
        --data "$DATA/conflicts/$split/conflicts.jsonl" --out "$DATA/metrics-$split.json"
done
