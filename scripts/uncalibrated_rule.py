"""Does the one rule for uncalibrated presets do no harm? Measured on both organisms, validation then test.

README "Bundled presets", the table of "The one rule for uncalibrated presets" (`docs/uncalibrated-rule.json`).

The rule (``backpatch.methods.backpatching.UNCALIBRATED_RULE``) was read off the organisms' validation calibrations;
this script checks it with full greedy ``generate()`` through ``backpatch.evaluate.evaluate``, on the validation split
(where it was derived) and the test split. No harm: audio-only and consistent accuracy each within 2 points of
plain. The organisms share the espeak validation and test clips, so one pair of conflict sets serves both.

History, plainly: the first rule (add x0.1) passed validation and lost 2.5 points of audio-only accuracy on
smol-whisper's test split (``docs/uncalibrated-rule-scale0.1.json``); its scale was halved for that reason, so
the organisms' test splits are no longer untouched for this rule. ``--fresh-trained`` therefore also checks it on
a smol-whisper projector trained with another seed, a model the rule was never chosen on.

    python scripts/uncalibrated_rule.py --validation VALIDATION.jsonl --test TEST.jsonl \\
        --fresh-trained SEED1/trained.safetensors --out docs/uncalibrated-rule.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import backpatch
from backpatch import Preset
from backpatch.evaluate import evaluate
from backpatch.loading import load_model_and_processor
from backpatch.methods.backpatching import UNCALIBRATED_RULE, uncalibrated_patch
from backpatch.organism import smol_whisper

KEYS = ("tdr", "afr", "other_rate", "audio_only_acc", "consistent_acc")
MAX_HARM = 0.02


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--validation", required=True, type=Path)
    parser.add_argument("--test", type=Path, help="omit to check the validation split alone first")
    parser.add_argument("--organisms", default="smol-whisper,digits")
    parser.add_argument("--fresh-trained", type=Path, help="trained.safetensors of another smol-whisper projector "
                        "(e.g. seed 1): a model the rule was never chosen on, checked on the test split too")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    report: dict = {"rule": UNCALIBRATED_RULE, "max_harm": MAX_HARM, "organisms": {}}
    runs = [(name, None) for name in args.organisms.split(",")]
    if args.fresh_trained:
        runs.append(("smol-whisper-fresh-projector", args.fresh_trained))
    for name, trained in runs:
        if trained is None:
            model, processor = load_model_and_processor(f"organism:{name}")
        else:
            model, processor = smol_whisper.assemble_variant(trained)
        base = backpatch.wrap(model, processor=processor).preset  # the organism's own preset: its facts only
        num_layers = base.model.num_layers
        patch = uncalibrated_patch(num_layers)
        preset = Preset(name=f"{name}-uncalibrated-rule", patches=[patch], audio_span=base.audio_span,
                        model=base.model)
        wrapped = backpatch.wrap(model, preset, processor=processor)
        entry: dict = {"num_layers": num_layers, "patch": preset.to_dict()["patches"][0], "splits": {}}
        if trained is not None:
            entry["trained"] = str(trained)
        for split, data in (("validation", args.validation), ("test", args.test)):
            if data is None or (trained is not None and split != "test"):
                continue
            start = time.perf_counter()
            result = evaluate(wrapped, processor, data, batch_size=48, max_new_tokens=4, progress=False)
            plain, patched = result["plain"], result["backpatched"]
            harm = {k: round(plain[k] - patched[k], 4) for k in ("audio_only_acc", "consistent_acc")}
            entry["splits"][split] = {
                "data": str(data), "plain": {k: plain[k] for k in KEYS}, "backpatched": {k: patched[k] for k in KEYS},
                "tdr_ci95": {"plain": plain["ci95"]["tdr"], "backpatched": patched["ci95"]["tdr"]},
                "harm": harm, "no_harm": all(v <= MAX_HARM for v in harm.values()),
                "seconds": round(time.perf_counter() - start, 1),
            }
            print(f"{name:<13} {split:<10} {backpatch.methods.patch_label(patch):<24} "
                  + "  ".join(f"{k} {plain[k]} -> {patched[k]}" for k in KEYS), flush=True)
        report["organisms"][name] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
