"""Issue 28: does the frontier's first-token scoring predict what greedy generate() does? For the setting a preset
holds (back-patch from scripts/patch_probe.py's file, contrastive with its guards, audio_gap gate), the verdicts
that scripts/agreement_frontier.py computes from stored logits against the verdicts of a `backpatch eval --out`
report on the same items (matched by id): how many agree, and the items that do not.

    python scripts/first_token_vs_generate.py /work/probe/logits.pt /work/probe/patched.pt \
        --preset presets/smol-whisper.yaml --report docs/stress/patch-agreement/every-family-controls.json

A preset whose patch has an agreement guard is scored as the frontier scores it (rows the audio already agrees on
keep the plain logits). The probe arguments may be several files (their scales are pooled).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from types import SimpleNamespace

import torch
from agreement_frontier import patched_main, pooled_probe
from transformers import AutoProcessor

import backpatch
from backpatch.items import judge
from backpatch.loading import resolve_model_id
from backpatch.methods.contrastive import agreement_signal, contrastive_logits
from backpatch.methods.gate import gate_strength


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("logits")
    ap.add_argument("patched", nargs="+", help="patch_probe.py outputs (their scales pooled)")
    ap.add_argument("--preset", required=True)
    ap.add_argument("--report", required=True)
    args = ap.parse_args()
    saved, probe = torch.load(args.logits), pooled_probe(args.patched)
    main_l, null_l, items = saved["main"].float(), saved["null"].float(), saved["items"]
    preset = backpatch.load_preset(args.preset)
    gate = preset.gate
    if gate is not None and gate.signal != "audio_gap":
        raise SystemExit(f"{args.preset}: gate signal {gate.signal!r}; the patch probe measured audio_gap gates only")
    bounds = (gate.low, gate.high) if gate is not None else None
    strength = gate_strength(gate, main_l, null_l) if gate is not None else None
    if preset.patches:
        (patch,) = preset.patches
        main = patched_main(probe, patch.scale, bounds, main_l, strength)
        if patch.agreement is not None:  # the patch's agreement guard, as the frontier scores it
            main = torch.where((agreement_signal(main_l, null_l) >= patch.agreement).unsqueeze(-1), main_l, main)
    else:
        main = main_l
    c = preset.contrastive
    combined = main if c is None or not c.alpha else contrastive_logits(
        main, null_l, c.alpha, gate_strength(gate, main, null_l) if gate is not None else None, c.plausibility,
        c.agreement)
    processor = AutoProcessor.from_pretrained(resolve_model_id("organism:smol-whisper"))
    first = {it["id"]: judge(processor.decode([t], skip_special_tokens=True), SimpleNamespace(**it))
             for t, it in zip(combined.argmax(-1).tolist(), items, strict=True)}
    report = json.load(open(args.report))
    pairs = [(first[it["id"]], it["backpatched_follows"], it["id"]) for it in report["items"] if it["id"] in first]
    agree = sum(a == b for a, b, _ in pairs)
    print(json.dumps({"matched": len(pairs), "agree": agree, "disagreements": Counter(
        f"{a} -> {b}" for a, b, _ in pairs if a != b), "examples": [p for p in pairs if p[0] != p[1]][:10]}, indent=1))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
