"""The ``generate()`` verification of a calibration's finalists, and the plain answers it compares them with.

The search scores settings by first answer token; the finalists are then checked with full greedy ``generate()``
through :func:`backpatch.evaluate.evaluate`, and these are the numbers the preset records. The plain answers do not
depend on the finalist, so they are generated once, before the search (:func:`_plain_answers_within`): their time
prices every verification (:mod:`.budget`), and a budget that cannot hold them and one verification stops the run
after one batch. Each finalist is verified only if its estimate fits what is left (:func:`_verify_finalists`).
"""

from __future__ import annotations

import math
import time
from typing import Any

from tqdm.auto import tqdm

from ..evaluate import answer_items, evaluate, load_conflict_set
from ..paired import paired_report
from ..wrapper import wrap
from .budget import Budget, worst_factor
from .writing import candidate_preset


def _plain_answers_within(budget: Budget, null_rows: bool, wrapped, processor, paths, limit, batch_size: int,
                          max_new_tokens: int, progress: bool, truncate) -> dict[int, list[str]]:
    """The verification's plain answers per data file. The first batch is timed alone: when the whole set and one
    verification (:func:`.budget.worst_factor` times as long) cannot fit the budget, the run stops there, after
    one batch, with the budget it would need."""
    sets = [load_conflict_set(path, limit) for path in paths]
    n_batches = sum(math.ceil(len(items) / batch_size) for items in sets)
    began = time.perf_counter()
    first = answer_items(wrapped, processor, sets[0][:batch_size], batch_size, max_new_tokens, False, truncate,
                         backpatched=False)[0]
    projected = (time.perf_counter() - began) * n_batches * (1.0 + worst_factor(null_rows))
    if projected > budget.left():
        need = (budget.seconds - budget.left() + projected) / 60
        raise ValueError(f"the time budget ({budget.seconds / 60:g} min) cannot hold the generate() verification: its "
                         f"plain answers and one verification would take about {projected / 60:.1f} min on these "
                         f"{sum(map(len, sets))} items; raise --budget-minutes to at least {need:.0f} (the search "
                         "needs more on top), or verify on fewer items (--limit)")
    out = {}
    for k, items in enumerate(sets):
        rest = items[batch_size:] if k == 0 else items
        answers = answer_items(wrapped, processor, rest, batch_size, max_new_tokens, progress, truncate,
                               backpatched=False)[0] if rest else []
        out[k] = (first if k == 0 else []) + answers
    return out


def _verify_finalists(model, wrapped, processor, candidates, items, paths, verify_plain, budget: Budget,
                      null_audio: str, batch_size: int, max_new_tokens: int, limit, progress: bool, truncate,
                      max_harm: float) -> list[tuple]:
    """``(candidate, proxy metrics, clean report, stress report or None, paired report)`` per verified finalist, in
    the order given: the first always (its verification was reserved for), the others only if their estimate fits
    the budget left; what is skipped is named in ``budget``."""
    verified = []
    for candidate, proxy in tqdm(candidates, desc="verify with generate()", unit="setting", disable=not progress):
        estimate = budget.estimate(candidate)
        if verified and not budget.fits(estimate):  # the first was reserved for; the others only if they fit
            budget.skip(f"the generate() verification of {candidate.label()} (about {estimate:.0f} s, "
                        f"{max(0.0, budget.left()):.0f} s left)")
            continue
        began = time.perf_counter()
        preset = candidate_preset(wrapped.preset, candidate, null_audio)
        wrapped_candidate = wrap(model, preset, processor=processor)
        reports = [evaluate(wrapped_candidate, processor, path, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            limit=limit, progress=progress, truncate=truncate, max_harm=max_harm,
                            plain_answers=verify_plain[k]) for k, path in enumerate(paths)]
        budget.learn(candidate, time.perf_counter() - began)
        verdicts = {column: [row[f"{column}_follows"] for report in reports for row in report["items"]]
                    for column in ("plain", "backpatched")}
        paired = paired_report(items, verdicts["plain"], verdicts["backpatched"])
        verified.append((candidate, proxy, reports[0], reports[1] if len(reports) > 1 else None, paired))
    return verified


def _verified_plain(verified) -> dict[str, Any]:
    """Plain metrics over every verified item (clean and stress), from the first verification."""
    reports = [r for r in verified[0][2:4] if r is not None]
    return metrics_of_reports(reports)


def metrics_of_reports(reports) -> dict[str, Any]:
    """The plain audio-only accuracy and count over several eval reports (what the chance check needs)."""
    n = sum(r["plain"]["n_audio_only"] for r in reports)
    right = sum(round((r["plain"]["audio_only_acc"] or 0.0) * r["plain"]["n_audio_only"]) for r in reports)
    return {"n_audio_only": n, "audio_only_acc": right / n if n else None}
