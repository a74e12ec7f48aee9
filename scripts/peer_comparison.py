"""Issue 20's table: every training-free fix on one model and one TEST split, with the same no-harm statistics.

README "Peer methods as preset blocks", the "Side by side, measured" table (`docs/peers/*.json`).

Each method's setting comes from a calibration sweep on the VALIDATION split (``backpatch calibrate`` with the peer
blocks; never the test split): the best candidate of its kind that passed the no-harm rule in the last stage that
measured that kind (lowest first-token TDR; verified with generate() where calibration verified one). Prompt framing
has no setting: ALME's instruction, in the user turn. "best combination" is the calibration's own choice (the preset
it wrote), or ``--best`` (a bundled name or a YAML path). Then every method runs greedy ``generate()`` on the test
split against the same plain answers (generated once), and the paired statistics of :mod:`backpatch.paired` compare
each with plain on the same items.

    python scripts/peer_comparison.py --model organism:digits --base organism-digits \
        --sweep CAL.sweep.json --test TEST.jsonl --out docs/peers/digits.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from organism_report import time_ratio  # scripts/ is on sys.path when this runs as a script

import backpatch
from backpatch import Preset
from backpatch.calibrate.run import candidate_of_row
from backpatch.calibrate.writing import candidate_preset
from backpatch.evaluate import evaluate, load_conflict_set
from backpatch.loading import load_model_and_processor

FRAMING = "The text may be wrong; answer from the audio."
KEYS = ("tdr", "afr", "other_rate", "audio_only_acc", "consistent_acc")
KINDS = {
    "back-patching": lambda r: r["patch"] and not r["alpha"] and not _blocks(r),
    "contrastive": lambda r: not r["patch"] and r["alpha"] and not r.get("gate") and not _blocks(r),
    "attention to audio (MATA)": lambda r: _alone(r, "attention"),
    "audio-silence steering": lambda r: _alone(r, "steering"),
}


def _alone(row: dict, block: str) -> bool:
    """A row of one peer block by itself (the search also scores the blocks on top of the other methods)."""
    other = "steering" if block == "attention" else "attention"
    return row.get(block) is not None and row.get(other) is None and not row["patch"] and not row["alpha"]


def _blocks(row: dict) -> bool:
    return row.get("attention") is not None or row.get("steering") is not None


def pick(sweep: dict, kind) -> dict | None:
    """The best no-harm row of one kind: generate()-verified first, else the last stage that measured the kind."""
    order = {"full": 0, "grid": 0, "refine": 1, "coarse": 2}
    by_label = {r["setting"]: r for r in sweep["sweep"]}
    verified = [(by_label[v["setting"]], v["backpatched"]["tdr"]) for v in sweep.get("verified", [])
                if v["setting"] in by_label and kind(by_label[v["setting"]])
                and (v["paired"]["harm_upper"] is None or v["paired"]["harm_upper"] <= sweep["max_harm"] + 1e-9)]
    if verified:
        return min(verified, key=lambda rt: rt[1])[0]
    rows = [r for r in sweep["sweep"] if kind(r) and r["no_harm"] and r["tdr"] is not None]
    if not rows:
        return None
    stage = min(order.get(r.get("stage", "full"), 0) for r in rows)
    return min((r for r in rows if order.get(r.get("stage", "full"), 0) == stage), key=lambda r: r["tdr"])


def preset_of(row: dict, base: Preset, null_audio: str, name: str) -> Preset:
    """The preset of a sweep row as calibration builds it (the null rows a gate or steering reads included), with
    ``base``'s facts only."""
    preset = candidate_preset(base, candidate_of_row(row), null_audio)
    return dataclasses.replace(preset, name=name, description=None, calibration=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--base", required=True, help="bundled preset giving layers and audio span")
    parser.add_argument("--sweep", required=True, type=Path, help="VALIDATION calibration sweep JSON (with blocks)")
    parser.add_argument("--test", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--batch-size", type=int, default=120)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--time-items", type=int, default=240)
    parser.add_argument("--best", help="the preset to measure as the best combination (default: the one the sweep's "
                        "calibration wrote); e.g. the shipped preset when that run could not verify its choice")
    args = parser.parse_args()

    model, processor = load_model_and_processor(args.model)
    base = backpatch.load_preset(args.base)
    sweep = json.loads(args.sweep.read_text())
    null_audio = sweep["grid"]["null_audio"]
    methods: dict[str, tuple[Preset | None, str | None]] = {"prompt framing": (None, FRAMING)}
    unscored = {kind for kind, test in KINDS.items() if not any(test(r) for r in sweep["sweep"])}
    for kind, test in KINDS.items():
        row = pick(sweep, test)
        methods[kind] = (preset_of(row, base, null_audio, kind) if row else None, None)
    best = backpatch.load_preset(args.best) if args.best else Preset.from_yaml(sweep["preset"])
    methods["best combination (calibrated)"] = (best, None)
    report = {"model": args.model, "sweep": str(args.sweep), "test": str(args.test), "framing": FRAMING,
              "best": args.best or sweep["preset"], "methods": {}}
    items = load_conflict_set(args.test)
    plain_answers = None
    for name, (preset, instruction) in methods.items():
        if preset is None and instruction is None:
            why = ("the validation sweep scored no setting of this kind" if name in unscored
                   else "no setting of this kind passed the no-harm rule on validation")
            report["methods"][name] = {"null": why}
            print(f"{name:<32} {why}", flush=True)
            continue
        mitigate = preset is not None
        wrapped = backpatch.wrap(model, preset or base, processor=processor)
        result = evaluate(wrapped, processor, args.test, batch_size=args.batch_size, max_new_tokens=4,
                          progress=False, plain_answers=plain_answers, instruction=instruction, mitigate=mitigate)
        plain_answers = [row["plain"] for row in result["items"]]
        ratio = time_ratio(wrapped, processor, items[: args.time_items], args.batch_size, args.runs, instruction,
                           mitigate)
        report["methods"][name] = {
            "preset": preset.to_dict() if preset else None, "instruction": instruction,
            "plain": result["plain"], "method": result["backpatched"], "paired": result["paired"],
            "time_ratio": round(ratio, 3),
        }
        p, m = result["plain"], result["backpatched"]
        print(f"{name:<32} " + "  ".join(f"{k} {p[k]} -> {m[k]}" for k in KEYS) + f"  time x{ratio:.2f}",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
