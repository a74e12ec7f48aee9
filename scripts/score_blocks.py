"""Score the peer blocks that a budget-cut calibration never reached, on that calibration's own refine-stage items.

README "Peer methods as preset blocks": the steering and combination rows of
`docs/peers/smol-whisper-calibration.sweep.json`, where smol-whisper's peer settings in that table come from.

Why: on ``smol-whisper`` a calibration with the peer blocks (``docs/peers/calibrate_smol_blocks.sh``, 50 min) spent
its refine share on contrastive alphas and gates and the attention grid, and the budget ran out before the
steering grid (the sweep names it under ``skipped``). Resuming the whole search would first spend its coarse share
again. This script scores only what is missing, exactly as the refine stage would have: the same clip subset
(``clip_subsets`` with the run's seed), the same scorer (the whole engine for block candidates), paired
statistics against the same plain answers and the same point-loss no-harm rule; then the refine stage's
:func:`backpatch.calibrate.search.combinations` of the best blocks with the best other methods. The rows are
appended to a copy of the sweep with ``"stage": "refine"`` and ``"added_by": "scripts/score_blocks.py"``.
Validation data only, like the calibration it completes.

    python scripts/score_blocks.py --model organism:smol-whisper --base smol-whisper \
        --sweep CAL.sweep.json --out CAL.blocks.sweep.json --batch-size 48
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import backpatch
from backpatch import Patch
from backpatch.calibrate.grid import block_grid
from backpatch.calibrate.run import (
    STAGE_FRACTIONS,
    _plain_metrics,
    _row,
    load_calibration_items,
    plain_differs,
    previous_results,
)
from backpatch.calibrate.search import StageRecord, _run_stage, clip_subsets, combinations
from backpatch.calibrate.sweep import Scorer, prepare_batches
from backpatch.calibrate.writing import _with_patches, candidate_preset
from backpatch.loading import load_model_and_processor
from backpatch.methods.contrastive import silence_frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--base", required=True, help="bundled preset giving layers and audio span")
    parser.add_argument("--sweep", required=True, type=Path, help="the staged calibration's .sweep.json")
    parser.add_argument("--out", required=True, type=Path, help="the sweep with the added rows")
    parser.add_argument("--batch-size", type=int, default=48)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    sweep = json.loads(args.sweep.read_text())
    seed, max_harm, null_audio = sweep["search"]["seed"], sweep["max_harm"], sweep["grid"]["null_audio"]
    items = load_calibration_items(sweep["data"], sweep.get("stress_data"), None)
    previous = previous_results(args.sweep, sweep["data"], sweep.get("stress_data"), seed, len(items))
    refine = clip_subsets(items, STAGE_FRACTIONS, seed)[1]
    if previous["sizes"].get("refine") != len(refine):
        raise SystemExit(f"the sweep's refine stage scored {previous['sizes'].get('refine')} items, this would "
                         f"score {len(refine)}")

    model, processor = load_model_and_processor(args.model)
    base = backpatch.load_preset(args.base)
    wrapped = backpatch.wrap(model, _with_patches(base, [Patch(source=1, target=0)]), processor=processor)
    silence = silence_frame(processor) if null_audio == "silence" else None
    scorer = Scorer(model, processor, wrapped.preset, null_audio, silence, candidate_preset)
    batches, answers = prepare_batches(wrapped, processor, refine, {"sources": [1], "positions": ["audio"]},
                                args.batch_size, True)
    plain = _plain_metrics(refine, answers)
    earlier = previous["plain"]["refine"]
    if plain_differs(earlier, plain):
        raise SystemExit(f"plain answers differ from the sweep's refine stage ({earlier} there, {plain} here)")

    done = previous["results"]["refine"]
    record = StageRecord("refine", len(refine), plain, results=list(done.items()), items=refine)
    missing = [c for c in block_grid(wrapped.resolved.num_layers) if c not in done]
    _run_stage(record, missing, lambda c: scorer.score(c, batches), math.inf, max_harm, True)
    combined = combinations(record, max_harm)
    _run_stage(record, combined, lambda c: scorer.score(c, batches), math.inf, max_harm, True)
    added = [(c, m) for c, m in record.results if c not in done]
    rows = [{**_row(c, m, plain, max_harm, False, stage="refine", n_items=len(refine)),
             "added_by": "scripts/score_blocks.py"} for c, m in added]
    out = {**sweep, "sweep": sweep["sweep"] + rows,
           "added": {"by": "scripts/score_blocks.py", "from": str(args.sweep), "rows": len(rows),
                     "blocks": len(missing), "combinations": len(combined)}}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for row in rows:
        print(f"{row['setting']:<70} TDR {row['tdr']}  no_harm {row['no_harm']}", flush=True)
    print(f"plain (refine, {len(refine)} items): TDR {plain['tdr']}; wrote {args.out} (+{len(rows)} rows)")


if __name__ == "__main__":
    main()
