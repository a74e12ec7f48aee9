"""Regenerate an organism's numbers in the README: plain vs back-patching vs contrastive vs both.

README "Model organisms": the held-out test tables of `smol-whisper` (`docs/smol-whisper-report.json`)
and `digits` (`docs/organism-report.json`).

The four configurations come from the calibration sweep on the VALIDATION split (the best no-harm candidate of
each kind by the first-token sweep); they are then evaluated with full greedy generate() on the TEST split, and
on the shipped examples subset (tests/test_organism_metrics.py checks that the shipped weights reproduce those).
Time ratios: generate() of each configuration over plain generate(), same batches, interleaved, median of runs.

    python scripts/organism_report.py --sweep CALIBRATION.sweep.json --test TEST.jsonl --out docs/organism-report.json
    python scripts/organism_report.py --model organism:smol-whisper --base smol-whisper --test TEST.jsonl \
        --out docs/smol-whisper-report.json     # no --sweep: the base preset itself, as one configuration
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
from backpatch.evaluate import encode_items, evaluate, item_waves, load_conflict_set
from backpatch.loading import load_model_and_processor

KEYS = ("tdr", "afr", "other_rate", "audio_only_acc", "consistent_acc")


def _no_harm(after: dict, before: dict, max_harm: float = 0.02) -> bool:
    from backpatch.calibrate import passes_no_harm

    return passes_no_harm(after, before, max_harm)


def configurations(sweep: dict, base: Preset) -> dict[str, Preset]:
    """Best no-harm candidate of each kind from the validation sweep (lowest first-token TDR). In a staged search,
    from the last stage that measured that kind (the full stage when it did, else the larger subset)."""
    order = {"full": 0, "refine": 1, "coarse": 2}
    rows = [r for r in sweep["sweep"] if r["no_harm"] and r["tdr"] is not None]

    by_label = {r["setting"]: r for r in sweep["sweep"]}
    # settings that calibration verified with generate() and that kept the no-harm rule there come first: the
    # first-token proxy can miss harm that only full decoding shows (it did for contrastive alpha 2 here)
    verified = [(by_label[v["setting"]], v["backpatched"]["tdr"]) for v in sweep.get("verified", [])
                if v["setting"] in by_label and _no_harm(v["backpatched"], v["plain"])]

    def best(pred):
        checked = [(r, tdr) for r, tdr in verified if pred(r)]
        if checked:
            return min(checked, key=lambda rt: rt[1])[0]
        kind = [r for r in rows if pred(r)]
        stage = min(order.get(r.get("stage", "full"), 0) for r in kind)
        return min((r for r in kind if order.get(r.get("stage", "full"), 0) == stage), key=lambda r: r["tdr"])

    picks = {
        "back-patching": best(lambda r: r["patch"] and not r["alpha"]),
        "contrastive": best(lambda r: not r["patch"] and r["alpha"]),
        "both": best(lambda r: r["patch"] and r["alpha"]),
    }
    null_audio = sweep["grid"]["null_audio"]
    out = {}
    for name, row in picks.items():
        out[name] = Preset(
            name=f"{base.name}-{name}", match=base.match, model=base.model, audio_span=base.audio_span,
            patches=[Patch(**row["patch"])] if row["patch"] else [],
            contrastive=Contrastive(alpha=row["alpha"], null_audio=null_audio) if row["alpha"] else None,
        )
    return out


@torch.no_grad()
def time_ratio(wrapped, processor, items, batch_size: int, runs: int, instruction: str | None = None,
               mitigate: bool = True) -> float:
    """generate() of the method over plain generate(), same batches, interleaved, median of ``runs``. The method's
    prompts carry ``instruction`` when given; ``mitigate=False`` runs it without the preset (framing alone)."""
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    waves = [item_waves(processor, chunk) for chunk in chunks]
    plain_batches = [encode_items(processor, chunk, waves=w) for chunk, w in zip(chunks, waves, strict=True)]
    method_batches = plain_batches if instruction is None else [
        encode_items(processor, chunk, instruction=instruction, waves=w)
        for chunk, w in zip(chunks, waves, strict=True)]
    kwargs = dict(max_new_tokens=4, do_sample=False)

    def run(method: bool) -> float:
        start = time.perf_counter()
        for inputs in method_batches if method else plain_batches:
            if method and mitigate:
                wrapped.generate(**inputs, **kwargs)
            else:
                with wrapped.disabled():
                    wrapped.generate(**inputs, **kwargs)
        return time.perf_counter() - start

    run(False), run(True)  # warm-up
    plain, method = [], []
    for _ in range(runs):
        plain.append(run(False))
        method.append(run(True))
    return statistics.median(method) / statistics.median(plain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="organism:digits", help="model to evaluate (default organism:digits)")
    parser.add_argument("--base", default="organism-digits", help="bundled preset giving layers and audio span")
    parser.add_argument("--sweep", type=Path, help="calibration sweep JSON (default: evaluate the base preset)")
    parser.add_argument("--test", required=True, type=Path)
    parser.add_argument("--examples", type=Path, default=organism.examples_path())
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    model, processor = load_model_and_processor(args.model)
    base = backpatch.load_preset(args.base)
    configs = configurations(json.loads(args.sweep.read_text()), base) if args.sweep else {"preset": base}
    report = {"model": args.model, "sweep": str(args.sweep) if args.sweep else None, "test": str(args.test),
              "configurations": {}}
    test_items = load_conflict_set(args.test)
    for name, preset in configs.items():
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
