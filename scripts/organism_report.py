"""Regenerate the organism numbers in the README: plain vs back-patching vs contrastive vs both.

The four configurations come from the calibration sweep on the VALIDATION split (the best no-harm candidate of
each kind by the first-token sweep); they are then evaluated with full greedy generate() on the TEST split, and
on the shipped examples subset (tests/test_organism_metrics.py checks that the shipped weights reproduce those).
Time ratios: generate() of each configuration over plain generate(), same batches, interleaved, median of runs.

    python scripts/organism_report.py --sweep CALIBRATION.sweep.json --test TEST.jsonl --out docs/organism-report.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import backpatch
from backpatch import Contrastive, Patch, Preset, organism
from backpatch.evaluate import encode_items, evaluate, load_conflict_set
from backpatch.loading import load_model_and_processor

KEYS = ("tdr", "afr", "other_rate", "audio_only_acc", "consistent_acc")


def configurations(sweep: dict, base: Preset) -> dict[str, Preset]:
    """Best no-harm candidate of each kind from the validation sweep (lowest first-token TDR)."""
    rows = [r for r in sweep["sweep"] if r["no_harm"] and r["tdr"] is not None]

    def best(pred):
        return min((r for r in rows if pred(r)), key=lambda r: r["tdr"])

    picks = {
        "back-patching": best(lambda r: r["patch"] and not r["alpha"]),
        "contrastive": best(lambda r: not r["patch"] and r["alpha"]),
        "both": best(lambda r: r["patch"] and r["alpha"]),
    }
    null_audio = sweep["grid"]["null_audio"]
    out = {}
    for name, row in picks.items():
        out[name] = Preset(
            name=f"organism-{name}", match=base.match, model=base.model, audio_span=base.audio_span,
            patches=[Patch(**row["patch"])] if row["patch"] else [],
            contrastive=Contrastive(alpha=row["alpha"], null_audio=null_audio) if row["alpha"] else None,
        )
    return out


@torch.no_grad()
def time_ratio(wrapped, processor, items, batch_size: int, runs: int) -> float:
    batches = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        batches.append(encode_items(processor, chunk))
    kwargs = dict(max_new_tokens=4, do_sample=False)

    def run(patched: bool) -> float:
        start = time.perf_counter()
        for inputs in batches:
            if patched:
                wrapped.generate(**inputs, **kwargs)
            else:
                with wrapped.disabled():
                    wrapped.generate(**inputs, **kwargs)
        return time.perf_counter() - start

    run(False), run(True)  # warm-up
    plain, patched = [], []
    for _ in range(runs):
        plain.append(run(False))
        patched.append(run(True))
    return statistics.median(patched) / statistics.median(plain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", required=True, type=Path)
    parser.add_argument("--test", required=True, type=Path)
    parser.add_argument("--examples", type=Path, default=organism.examples_path())
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    model, processor = load_model_and_processor()
    base = backpatch.load_preset("organism-digits")
    sweep = json.loads(args.sweep.read_text())
    report = {"sweep": str(args.sweep), "test": str(args.test), "configurations": {}}
    test_items = load_conflict_set(args.test)
    for name, preset in configurations(sweep, base).items():
        wrapped = backpatch.wrap(model, preset, processor=processor)
        test = evaluate(wrapped, processor, args.test, batch_size=120, max_new_tokens=4, progress=False)
        examples = evaluate(wrapped, processor, args.examples, batch_size=50, max_new_tokens=4, progress=False)
        ratio = time_ratio(wrapped, processor, test_items[:240], batch_size=120, runs=args.runs)
        report["configurations"][name] = {
            "preset": preset.to_dict(),
            "test": {"plain": test["plain"], "method": test["backpatched"]},
            "examples": {"plain": examples["plain"], "method": examples["backpatched"]},
            "time_ratio": round(ratio, 3),
        }
        m, p = test["backpatched"], test["plain"]
        print(f"{name:<14} " + "  ".join(f"{k} {p[k]} -> {m[k]}" for k in KEYS) + f"  time x{ratio:.2f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
