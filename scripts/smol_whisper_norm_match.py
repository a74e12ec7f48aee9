"""Does a norm-matched combine widen the no-harm band? (calibration issue, point 4; validation only)

README "Model organisms", "`smol-whisper`: pretrained weights, inherited text dominance",
the "Norm-matched combine" paragraph (`docs/smol-whisper-norm-match.json`).

Late-layer states are much larger than early ones. Norm matching rescales the captured states, per position, to
the norm of the target layer's states before ``add`` / ``interpolate``. Both variants are scored by first answer
token on the same validation clips (the calibration's coarse subset: 10% of the clips, seed 0) for the same
settings: nearby and far pairs over the whole depth, small and large scales, and the region where the calibration
found the best patches (late sources 26-28 into targets 15 and 18, ``add`` 0.1-1).

    python scripts/smol_whisper_norm_match.py --data VALIDATION.jsonl --out docs/smol-whisper-norm-match.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import backpatch
from backpatch.calibrate.grid import Candidate, Setting
from backpatch.calibrate.run import STAGE_FRACTIONS
from backpatch.calibrate.search import clip_subsets, passes_no_harm
from backpatch.calibrate.sweep import Scorer, prepare_batches
from backpatch.calibrate.writing import candidate_preset
from backpatch.evaluate import judge, load_conflict_set, metrics
from backpatch.loading import load_model_and_processor

KEYS = ("tdr", "afr", "other_rate", "audio_only_acc", "consistent_acc")
MODES = (("add", 0.25), ("add", 1.0), ("interpolate", 0.5), ("interpolate", 1.0))
#: the calibration's best region on 30 layers (sources, targets, add scales)
BEST_REGION = ((26, 27, 28), (15, 18), (0.1, 0.25, 0.5, 1.0))


def settings(num_layers: int) -> list[Setting]:
    out = []
    for t in range(0, num_layers - 1, 6):
        for s in sorted({t + 1, t + 2, t + 4, num_layers - 1}):
            if t < s < num_layers:
                out += [Setting(s, t, scale, mode, "audio") for mode, scale in MODES]
    sources, targets, scales = BEST_REGION
    out += [Setting(s, t, scale, "add", "audio") for s in sources for t in targets for scale in scales
            if s < num_layers and Setting(s, t, scale, "add", "audio") not in out]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="organism:smol-whisper")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--batch-size", type=int, default=40)
    args = parser.parse_args()
    model, processor = load_model_and_processor(args.model)
    wrapped = backpatch.wrap(model, processor=processor)
    items = clip_subsets(load_conflict_set(args.data), STAGE_FRACTIONS, seed=0)[0]
    items = items[: math.ceil(len(items) / args.batch_size) * args.batch_size]
    todo = settings(wrapped.resolved.num_layers)
    grid = {"sources": sorted({s.source for s in todo}), "positions": ["audio"]}
    batches, answers = prepare_batches(wrapped, processor, items, grid, args.batch_size, True, layer_states=True)
    plain = metrics(items, [judge(a, it) for a, it in zip(answers, items, strict=True)])
    scorer = Scorer(model, processor, wrapped.preset, "silence", None, candidate_preset)
    rows, started = [], time.perf_counter()
    for setting in todo:
        row = {"setting": setting.label()}
        for variant, match in (("plain_combine", False), ("match_norm", True)):
            m = scorer.score(Candidate(setting), batches, match_norm=match)
            row[variant] = {**{k: m[k] for k in KEYS}, "no_harm": passes_no_harm(m, plain)}
        rows.append(row)
        print(row["setting"], {v: (row[v]["tdr"], row[v]["no_harm"]) for v in ("plain_combine", "match_norm")},
              flush=True)
    summary = {}
    for variant in ("plain_combine", "match_norm"):
        ok = [r[variant] for r in rows if r[variant]["no_harm"] and r[variant]["tdr"] is not None]
        helps = [m for m in ok if m["tdr"] < plain["tdr"]]
        summary[variant] = {"no_harm": len(ok), "no_harm_and_lower_tdr": len(helps),
                            "best_no_harm_tdr": min((m["tdr"] for m in ok), default=None),
                            "mean_other_rate": round(sum(r[variant]["other_rate"] for r in rows) / len(rows), 4)}
    report = {"data": str(args.data), "n_items": len(items), "plain": {k: plain[k] for k in KEYS},
              "n_settings": len(rows), "seconds": round(time.perf_counter() - started, 1), "summary": summary,
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
