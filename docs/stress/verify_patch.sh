#!/usr/bin/env bash
# Issue 28: the coarse stage's best patch (20 -> 18 add 1 @audio), which the budget cut from the refine stage of
# docs/stress/calibrate_families.sh, verified by hand like calibration's finalists (plain answers reused from
# docs/stress/verify_next.py; cal5/patch-20-18.yaml written from its sweep row with candidate_of_row/candidate_preset).
cd /work/data/smol
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PATH=/work/main/.venv/bin:$PATH
for split in clean perturbed; do
  data=conflicts/validation/conflicts.jsonl; [ $split = perturbed ] && data=perturbed/validation/conflicts.jsonl
  backpatch eval --model organism:smol-whisper --preset cal5/patch-20-18.yaml --data $data --out cal5/patch-20-18-$split.json --max-new-tokens 4 --batch-size 48 --plain-from cal5/plain-$split.json
done
