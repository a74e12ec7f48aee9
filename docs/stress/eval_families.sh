#!/usr/bin/env bash
# Issue 28 point 3: held-out test evaluation (clean and perturbed, with the per-perturbation-family breakdown) of
# the setting chosen by the calibration under the per-family no-harm rule (docs/stress/calibrate_families.sh).
# It chose the shipped setting again (contrastive alpha 2, gate audio_gap 0.1..0.3), so one eval per split serves
# both the "shipped" and the "recalibrated" rows.
set -x
cd /work/main
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
out=/work/data/smol/cal3
for split in perturbed; do  # clean: the same setting on the same data as the shipped row of smol-whisper-test.json
  data=/work/data/smol/conflicts/test/conflicts.jsonl
  [ $split = perturbed ] && data=/work/data/smol/perturbed/test/conflicts.jsonl
  time .venv/bin/backpatch eval --model organism:smol-whisper --preset $out/smol-whisper.yaml \
    --data $data --out $out/test-$split-new.json --max-new-tokens 4 --batch-size 48
done
