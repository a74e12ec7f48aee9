"""The default calibration search: coarse to fine on growing, nested item subsets, within a time budget.

Stage 1 scores the coarse band grid (:func:`.grid.band_grid`) on a small subset of clips; stage 2 re-scores the
best no-harm settings on a larger subset together with their neighbours (half/double scale, source or target one
layer away) and contrastive decoding (each alpha alone and with the two best patches); stage 3 scores the best
few of stage 2 on every item. Subsets are whole clips (all items of a clip together), seeded, nested. This is
successive halving: most settings are discarded on little data, the few that matter are measured on all of it.

Budget: stage 1 may use up to 40% of ``budget_s``, stage 2 up to 65%, stage 3 up to 85% (the rest is for the
``generate()`` verification); a stage that reaches its share stops and says so (``truncated`` in the record).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from .grid import Candidate, Setting, band_grid, refinements

logger = logging.getLogger(__name__)

STAGE_SHARES = (0.40, 0.65, 0.85)


def passes_no_harm(candidate: dict[str, Any], plain: dict[str, Any], max_harm: float = 0.02) -> bool:
    """Audio-only and consistent accuracy each within ``max_harm`` of plain (missing kinds do not count)."""
    for key in ("audio_only_acc", "consistent_acc"):
        if plain[key] is not None and candidate[key] is not None and candidate[key] < plain[key] - max_harm - 1e-9:
            return False
    return True


def tdr_key(m: dict[str, Any]) -> float:
    return m["tdr"] if m["tdr"] is not None else 1.0


@dataclass
class StageRecord:
    """What one stage scored, on how many items, and whether the budget cut it short."""

    name: str
    n_items: int
    plain: dict[str, Any]
    results: list[tuple[Candidate, dict[str, Any]]] = field(default_factory=list)
    truncated: int = 0
    seconds: float = 0.0


def clip_subsets(items: Sequence[Any], fractions: Sequence[float], seed: int = 0) -> list[list[Any]]:
    """Nested item subsets made of whole clips (every item of a clip together), in a seeded order; the last
    fraction 1.0 is all items. Each subset lists the previous one's items first."""
    clips: dict[Any, list[Any]] = {}
    for item in items:
        clips.setdefault(item.audio, []).append(item)
    order = list(clips)
    random.Random(seed).shuffle(order)
    out = []
    for fraction in fractions:
        n = max(1, round(len(order) * fraction))
        out.append([it for key in order[:n] for it in clips[key]])
    return out


def _run_stage(record: StageRecord, candidates: Sequence[Candidate], score: Callable[[Candidate], dict],
               deadline: float, max_harm: float, progress: bool) -> None:
    started = time.perf_counter()
    bar = tqdm(candidates, desc=f"calibrate {record.name} ({record.n_items} items)", unit="setting",
               disable=not progress)
    best = None
    for i, candidate in enumerate(bar):
        if time.perf_counter() > deadline:
            record.truncated = len(candidates) - i
            logger.warning("calibration %s: time budget reached, %d of %d settings not scored", record.name,
                           record.truncated, len(candidates))
            break
        m = score(candidate)
        record.results.append((candidate, m))
        if passes_no_harm(m, record.plain, max_harm) and (best is None or tdr_key(m) < tdr_key(best[1])):
            best = (candidate, m)
            bar.set_postfix_str(f"best {candidate.label()} TDR {m['tdr']}")
    bar.close()
    record.seconds = round(time.perf_counter() - started, 1)


def ranked(record: StageRecord, max_harm: float, patches_only: bool | None = None) -> list[Candidate]:
    """Candidates of a stage that pass the no-harm rule, lowest TDR first."""
    rows = [(c, m) for c, m in record.results if passes_no_harm(m, record.plain, max_harm)]
    if patches_only is not None:
        rows = [(c, m) for c, m in rows if (c.alpha == 0) == patches_only]
    return [c for c, _ in sorted(rows, key=lambda r: tdr_key(r[1]))]


def staged_search(
    num_layers: int,
    stage_scorers: Sequence[Callable[[Candidate], dict]],
    full_stage: Callable[[list[Candidate]], tuple[Callable[[Candidate], dict], dict[str, Any], int]],
    alphas: Sequence[float],
    budget_s: float,
    max_harm: float = 0.02,
    keep: tuple[int, int, int] = (16, 8, 6),
    seed: int = 0,
    progress: bool = True,
) -> list[StageRecord]:
    """Run the three stages. ``stage_scorers[k]`` is ``(score, plain metrics, n_items)`` of stage ``k``'s subset;
    ``full_stage(finalists)`` prepares the last stage for just the finalists (only their source layers are
    captured on the full set)."""
    started = time.perf_counter()
    deadlines = [started + share * budget_s for share in STAGE_SHARES]
    coarse = [Candidate(s) for s in band_grid(num_layers)]
    random.Random(seed).shuffle(coarse)  # a budget cut then drops a random, not a systematic, part of the grid
    records = [StageRecord(name, n, plain) for name, (_, plain, n) in zip(("coarse", "refine"), stage_scorers,
                                                                          strict=True)]
    _run_stage(records[0], coarse, stage_scorers[0][0], deadlines[0], max_harm, progress)

    best1 = ranked(records[0], max_harm)[: keep[0]]
    settings: list[Setting] = [c.setting for c in best1 if c.setting is not None]
    neighbours = [Candidate(s) for s in refinements(settings[: keep[1]], num_layers)]
    top_patches = [c.setting for c in best1[:2]]
    contrastive = [Candidate(s, float(a)) for a in alphas if a > 0 for s in (None, *top_patches)]
    _run_stage(records[1], [*best1, *neighbours, *contrastive], stage_scorers[1][0], deadlines[1], max_harm,
               progress)

    finalists = ranked(records[1], max_harm, patches_only=True)[: keep[2]]
    finalists += ranked(records[1], max_harm, patches_only=False)[: max(2, keep[2] // 2)]
    if not finalists:  # nothing passed: measure the lowest-TDR settings anyway, so the report shows why
        finalists = [c for c, _ in sorted(records[1].results, key=lambda r: tdr_key(r[1]))[: keep[2]]]
    score, plain, n_items = full_stage(finalists)
    records.append(StageRecord("full", n_items, plain))
    _run_stage(records[2], finalists, score, deadlines[2], max_harm, progress)
    return records
