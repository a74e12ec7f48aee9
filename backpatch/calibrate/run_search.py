"""Running the chosen search on the model: captures, first-token scoring, and the stage records they give.

:mod:`.search` is the staged search's logic on stages it is handed; this module builds those stages on a model
(:func:`_staged`: captures of the nested clip subsets, checks that a resumed run scored the same items with the
same model) and picks the stage the finalists come from (:func:`selection_stage`). An explicit grid
(``--sources/--targets/...``) is swept here too (:func:`_grid_sweep`): every setting on every item, then
contrastive decoding alone and on the best three patches. Both give :class:`.search.StageRecord` s.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from ..evaluate import judge, metrics
from ..paired import paired_report
from .budget import Budget
from .grid import Candidate, _settings
from .resume import plain_differs
from .search import StageRecord, clip_subsets, passes_no_harm, rank_key, staged_search
from .sweep import Scorer, prepare_batches

logger = logging.getLogger(__name__)

#: nested clip subsets of the staged search (coarse, refine, full)
STAGE_FRACTIONS = (0.1, 0.3, 1.0)


def selection_stage(records: Sequence[StageRecord]) -> StageRecord | None:
    """The stage whose results the finalists to verify come from: the last that scored anything; but a full stage
    the budget cut (one of its finalists scored, say) would choose among the few it reached, not among the best,
    so then the refine stage. None when nothing was scored."""
    scored = [r for r in records if r.results]
    if not scored:
        return None
    if len(scored) > 1 and scored[-1].name == "full" and scored[-1].truncated:
        return scored[-2]
    return scored[-1]


def _plain_metrics(items, answers) -> dict[str, Any]:
    verdicts = [judge(a, it) for a, it in zip(answers, items, strict=True)]
    return {**metrics(items, verdicts), "verdicts": verdicts}


def _paired(m: dict[str, Any], record: StageRecord) -> dict[str, Any]:
    m["paired"] = paired_report(record.items, record.plain["verdicts"], m["verdicts"])
    return m


def _grid_sweep(wrapped, processor, items, grid, scorer: Scorer, batch_size: int, search_end: float,
                max_harm: float, progress: bool, null=None) -> StageRecord:
    """The explicit grid on every item until ``search_end`` (a ``perf_counter`` time): the patches get 80% of the
    time left, then contrastive decoding alone and on the best three no-harm patches. Negative layers in
    ``grid`` are resolved in place (the summary records them resolved)."""
    num_layers = wrapped.resolved.num_layers
    grid["sources"] = [s + num_layers if s < 0 else s for s in grid["sources"]]
    grid["targets"] = [t + num_layers if t < 0 else t for t in grid["targets"]]
    settings = _settings(grid)
    if not settings:
        raise ValueError("the calibration grid is empty: every source must be later than some target")
    logger.info("calibrating %d settings on %d items", len(settings), len(items))
    batches, plain_answers = prepare_batches(wrapped, processor, items, grid, batch_size, progress, null=null)
    plain = _plain_metrics(items, plain_answers)
    record = StageRecord("grid", len(items), plain, items=items, bounded=True)
    patches_end = time.perf_counter() + 0.8 * (search_end - time.perf_counter())  # the rest: contrastive
    for setting in tqdm(settings, desc="sweep patches", unit="setting", disable=not progress):
        if time.perf_counter() > patches_end:
            record.truncated += 1
            continue
        record.results.append((Candidate(setting), _paired(scorer.score(Candidate(setting), batches), record)))
    best_patches = [c.setting for c, m in sorted(record.results, key=lambda r: rank_key(r[1]))
                    if passes_no_harm(m, plain, max_harm, bounded=True)][:3]
    contrastive = [Candidate(s, float(a)) for a in grid["alphas"] if a > 0 for s in (None, *best_patches)]
    for candidate in tqdm(contrastive, desc="sweep contrastive", unit="setting", disable=not progress):
        if time.perf_counter() > search_end:
            record.truncated += 1
            continue
        record.results.append((candidate, _paired(scorer.score(candidate, batches), record)))
    return record


def _staged(wrapped, processor, items, grid, scorer: Scorer, batch_size: int, search_end: float, max_harm: float,
            seed: int, progress: bool, null=None, gates: bool = True, full_stage: bool = True,
            previous=None, budget: Budget | None = None, blocks: bool = True,
            ) -> tuple[list[StageRecord], dict[str, Any]]:
    """Captures for the nested subsets, then :func:`staged_search` until ``search_end`` (a ``perf_counter``
    time). The two small subsets keep every layer's state (short path); the full set only the source states,
    and its capture is skipped when its estimate (the small capture's time per item) does not fit."""
    subsets = clip_subsets(items, STAGE_FRACTIONS, seed)
    refine = subsets[1]
    # whole batches: stage 1 is the first batches of stage 2's (stage 2 lists stage 1's items first)
    n_first = min(len(refine), math.ceil(len(subsets[0]) / batch_size) * batch_size)
    if previous is not None:
        sizes = previous["sizes"]
        for stage, n in (("coarse", n_first), ("refine", len(refine)), ("full", len(subsets[2]))):
            if stage in sizes and sizes[stage] != n:
                raise ValueError(f"--resume: the earlier run's {stage} stage scored {sizes[stage]} items, this one "
                                 f"would score {n} (a different --batch-size?): resume with the same --batch-size")
    began = time.perf_counter()
    small, small_plain = prepare_batches(wrapped, processor, refine, grid, batch_size, progress, layer_states=True,
                                  null=null)
    full_capture_seconds = (time.perf_counter() - began) * len(subsets[2]) / max(1, len(refine))
    plain_of = _plain_metrics

    first = small[: math.ceil(n_first / batch_size)]
    stages = [(lambda c: scorer.score(c, first), plain_of(refine[:n_first], small_plain[:n_first]), n_first,
               refine[:n_first]),
              (lambda c: scorer.score(c, small), plain_of(refine, small_plain), len(refine), refine)]
    if previous is not None:  # same items, but the same model? its plain answers must be the same
        for name, (_, plain, _, _) in zip(("coarse", "refine"), stages, strict=True):
            if plain_differs(previous["plain"].get(name), plain):
                raise ValueError(f"--resume: the earlier run's plain answers on the {name} stage differ from this "
                                 "model's (another model, dtype or preset?): resume only the run of the same model")
    full_plain: dict[str, Any] = {}

    def prepare_full(finalists):
        sources = sorted({c.setting.source for c in finalists if c.setting} or {1})
        positions = sorted({c.setting.positions for c in finalists if c.setting} or {"audio"})
        del small[:]  # free the per-layer states of the small subsets before capturing the full set
        batches, answers = prepare_batches(wrapped, processor, subsets[2], {"sources": sources, "positions": positions},
                                    batch_size, progress, null=null)
        full_plain.update(plain_of(subsets[2], answers))
        return (lambda c: scorer.score(c, batches)), full_plain, len(subsets[2]), subsets[2]

    records = staged_search(wrapped.resolved.num_layers, stages, prepare_full, grid["alphas"],
                            search_end - time.perf_counter(), max_harm, seed=seed, progress=progress, gates=gates,
                            full=full_stage, previous=previous["results"] if previous else None,
                            full_capture_seconds=full_capture_seconds, on_skip=budget.skip if budget else None,
                            blocks=blocks)
    return records, full_plain if full_plain else records[-1].plain
