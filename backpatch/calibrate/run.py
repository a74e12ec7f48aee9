"""``calibrate()``: search back-patching and contrastive decoding on a validation conflict set, write a preset.

Two searches (see :mod:`.grid`): an explicit grid (every setting on every item, as ``--sources/--targets/...``
ask), or by default the staged coarse-to-fine search of :mod:`.search`, bounded by ``budget_minutes``. Either
way every setting is scored by first answer token (:mod:`.sweep`), and the best few that pass the no-harm rule
are then verified with full ``generate()`` through :func:`backpatch.evaluate.evaluate`; the verified numbers
go into the preset.

No-harm rule (:mod:`backpatch.paired`): on the paired items, the exact 95% upper bound on the loss of audio-only
and of consistent accuracy stays within ``max_harm`` (2 points), on the clean data and on the perturbed
``stress_data`` alike; settings are ranked by the lower bound of their TDR reduction.

The data must not be test data (the organism's shipped examples are its test voices: a warning says so), and a
warning states the standard error that too few conflict items imply (:func:`conflict_count_warning`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..answerability import chance_warning, check_labels
from ..evaluate import answer_items, check_clip_lengths, evaluate, judge, load_conflict_set, metrics
from ..inputs import audio_truncation, truncation_enabled
from ..methods import Attention, Gate, Patch, Steering
from ..methods.contrastive import silence_frame
from ..paired import paired_report
from ..preset import Preset
from ..wrapper import preset_for, wrap
from .budget import Budget, worst_factor
from .grid import Candidate, Setting, _settings, default_grid
from .plots import _plot_band, _plot_heatmap
from .search import StageRecord, clip_subsets, passes_no_harm, rank_key, staged_search, tdr_key
from .sweep import Scorer, prepare_batches
from .writing import _calibrated_preset, _with_patches, candidate_preset

logger = logging.getLogger(__name__)

GRID_KEYS = ("sources", "targets", "scales", "modes", "positions")
#: nested clip subsets of the staged search (coarse, refine, full)
STAGE_FRACTIONS = (0.1, 0.3, 1.0)
METRIC_KEYS = ("tdr", "afr", "other_rate", "audio_only_acc", "consistent_acc")
#: the standard error (at p = 0.5) of a TDR that a calibration set should reach: 3 points
TARGET_SE = 0.03


def tdr_standard_error(n_conflict: int, p: float = 0.5) -> float:
    """sqrt(p (1 - p) / n): the standard error of a rate measured on ``n_conflict`` items (largest at p = 0.5)."""
    return math.sqrt(p * (1 - p) / n_conflict) if n_conflict > 0 else math.inf


def conflicts_for(se: float = TARGET_SE, p: float = 0.5) -> int:
    """How many conflict items give a standard error of ``se`` at ``p``."""
    return math.ceil(p * (1 - p) / se**2)


def conflict_count_warning(n_conflict: int, n_settings_hint: str, n_first_stage: int | None = None) -> str | None:
    """The warning for a conflict count too small for a search among many settings, or ``None``: with a TDR
    standard error above :data:`TARGET_SE` (3 points) the search mostly ranks noise. ``n_first_stage``: the
    conflicts the staged search's first stage sees (it discards most settings on them)."""
    se = tdr_standard_error(n_conflict)
    if se <= TARGET_SE:
        return None
    text = (f"only {n_conflict} conflict items for {n_settings_hint}: a TDR measured on them has a standard error "
            f"of about {100 * se:.1f} points (sqrt(p(1-p)/n) at p = 0.5), so settings closer than about "
            f"{200 * se:.0f} points cannot be told apart; about {conflicts_for()} conflict items give ~3 points")
    if n_first_stage is not None:
        text += (f" (its first stage sees {n_first_stage} of them: {100 * tdr_standard_error(n_first_stage):.1f} "
                 "points)")
    return text


def _row(candidate: Candidate, m: dict[str, Any], plain: dict[str, Any], max_harm: float, bounded: bool = True,
         **extra) -> dict:
    paired = m.get("paired") or {}
    return {"setting": candidate.label(), "patch": asdict(candidate.setting) if candidate.setting else None,
            "alpha": candidate.alpha, "gate": asdict(candidate.gate) if candidate.gate else None,
            **{key: asdict(getattr(candidate, key)) for key in ("attention", "steering") if getattr(candidate, key)},
            "no_harm": passes_no_harm(m, plain, max_harm, bounded), **extra,
            **{k: m[k] for k in METRIC_KEYS},
            "harm_upper": paired.get("harm_upper"), "tdr_reduction": paired.get("tdr_reduction"),
            "tdr_reduction_lower": paired.get("tdr_reduction_lower"), "harm": paired.get("harm")}


def _public(m: dict[str, Any]) -> dict[str, Any]:
    """Metrics without the per-item verdicts (kept for paired statistics, not for the JSON)."""
    return {k: v for k, v in m.items() if k != "verdicts"}


def load_calibration_items(data: str | Path, stress_data: str | Path | None, limit: int | None) -> list:
    """The clean items, then the stress items; a stress item without a ``perturbation`` gets ``"stress"`` so that
    the no-harm rule checks it as its own split."""
    items = load_conflict_set(data, limit)
    if stress_data is not None:
        items += [it if it.perturbation else dataclasses.replace(it, perturbation="stress")
                  for it in load_conflict_set(stress_data, limit)]
    return items


def calibrate(
    model: torch.nn.Module,
    processor: Any,
    data: str | Path,
    out: str | Path,
    base_preset: Preset | str | Path | None = None,
    grid: dict[str, Sequence] | None = None,
    batch_size: int = 32,
    verify_top: int = 3,
    max_new_tokens: int = 16,
    max_harm: float = 0.02,
    name: str | None = None,
    limit: int | None = None,
    progress: bool = True,
    budget_minutes: float = 60.0,
    seed: int = 0,
    truncate: bool | None = None,
    stress_data: str | Path | None = None,
    gates: bool = True,
    full_stage: bool = True,
    resume: str | Path | None = None,
    blocks: bool = True,
) -> dict[str, Any]:
    """Search, verify, and write ``out`` (a preset YAML), ``out`` with ``.png`` (heatmap), ``.band.png`` (staged
    search: no-harm TDR over source x target per mode) and ``.sweep.json``.

    ``grid`` with any of ``sources/targets/scales/modes/positions`` runs that exhaustive grid; without them the
    staged search runs (``alphas`` and ``null_audio`` apply to both). ``base_preset`` supplies the audio span and
    layer path (default: what ``wrap`` would pick, or auto). Returns a summary dict (also in the sweep JSON).

    Clips longer than the model's audio window are refused before any model work, unless ``truncate=True``;
    then the summary, the sweep JSON and the preset's description record which items were cut.

    ``stress_data``: a perturbed validation set (e.g. ``python -m backpatch.organism.perturb build``); its items
    are searched with the clean ones and the no-harm rule must hold on both. ``gates``: the staged search also
    tries the audio-confidence gate on its strongest settings. ``full_stage=False`` skips the staged search's
    first-token stage on every item (the ``generate()`` verification still checks the finalists on every item).
    ``blocks``: the staged search also scores the peer methods' attention and steering grids (a full forward per
    candidate). ``resume``: the ``.sweep.json`` of an earlier staged run on the same data, stress data and seed:
    the settings it scored are reused, not scored again (:func:`previous_results`), so a search its budget cut
    short goes on.
    """
    truncate = truncation_enabled(truncate)
    with audio_truncation(truncate):  # the sweep builds its inputs deep down: it inherits the choice
        return _calibrate(model, processor, data, out, base_preset, grid, batch_size, verify_top, max_new_tokens,
                          max_harm, name, limit, progress, budget_minutes, seed, truncate, stress_data, gates,
                          full_stage, resume, blocks)


def _calibrate(model, processor, data, out, base_preset, grid, batch_size, verify_top, max_new_tokens, max_harm,
               name, limit, progress, budget_minutes, seed, truncate, stress_data=None, gates=True,
               full_stage=True, resume=None, blocks=True) -> dict[str, Any]:
    started = time.perf_counter()
    budget_s = budget_minutes * 60.0
    out = Path(out)
    items = load_calibration_items(data, stress_data, limit)
    truncated = check_clip_lengths(items, processor, truncate)
    label_warning = check_labels(items, processor)  # raises when the model can write none of the labels
    if label_warning:
        logger.warning("calibration data: %s", label_warning)
    _warn_about_data(data)
    # The base preset only contributes facts (layer path, audio span, match); its patches are replaced.
    base_preset = preset_for(model, base_preset, fallback=Preset(patches=[Patch(source=1, target=0)],
                                                                 name=name or out.stem))
    wrapped = wrap(model, _with_patches(base_preset, [Patch(source=1, target=0)]), processor=processor)
    num_layers = wrapped.resolved.num_layers
    grid = dict(grid or {})
    staged = not any(key in grid for key in GRID_KEYS)
    previous = previous_results(resume, data, stress_data, seed, len(items), staged) if resume else None
    n_conflict = sum(1 for it in items if it.kind == "conflict")
    first_stage = clip_subsets(items, STAGE_FRACTIONS, seed)[0] if staged else None
    data_warning = conflict_count_warning(
        n_conflict, "the staged search" if staged else "an exhaustive grid",
        sum(1 for it in first_stage if it.kind == "conflict") if first_stage else None)
    if data_warning:
        logger.warning("calibration data: %s", data_warning)
    grid = {**default_grid(num_layers), **grid}
    gates = gates and staged
    needs_null = bool(grid["alphas"]) or gates
    if needs_null and grid["null_audio"] == "silence" and getattr(processor, "feature_extractor", None) is None:
        raise ValueError("contrastive calibration with null_audio silence needs a processor with a feature extractor")
    silence = silence_frame(processor) if needs_null and grid["null_audio"] == "silence" else None
    scorer = Scorer(model, processor, wrapped.preset, grid["null_audio"], silence, candidate_preset)
    null = (grid["null_audio"], silence) if needs_null else None
    # the verification's plain answers first: they serve every finalist, and their time prices the verification
    budget = Budget(budget_s, started)
    paths = [path for path in (data, stress_data) if path is not None]
    verify_plain = _plain_answers_within(budget, needs_null, wrapped, processor, paths, limit, batch_size,
                                         max_new_tokens, progress, truncate)
    budget.plain_seconds = time.perf_counter() - started
    search_end = budget.search_deadline(needs_null)

    if staged:
        grid.update(sources=list(range(1, num_layers)), targets=list(range(num_layers - 1)),
                    positions=["audio", "last"], modes=["add", "interpolate", "replace"])
        records, plain = _staged(wrapped, processor, items, grid, scorer, batch_size, search_end, max_harm, seed,
                                 progress, null, gates, full_stage, previous, budget, blocks)
        chosen_stage = selection_stage(records)
        if chosen_stage is None:
            raise ValueError(f"the time budget ({budget_minutes:g} min) ran out before any setting was scored; "
                             "raise --budget-minutes")
        results, plain, bounded = chosen_stage.results, chosen_stage.plain, chosen_stage.bounded
        sweep_rows = [_row(c, m, r.plain, max_harm, r.bounded, stage=r.name, n_items=r.n_items) for r in records
                      for c, m in r.results]
        n_settings = sum(len(r.results) for r in records)
        search_info = {"kind": "staged", "budget_minutes": budget_minutes, "seed": seed, "gates": gates,
                       "resumed_from": str(resume) if resume else None,
                       "stages": [{"name": r.name, "n_items": r.n_items, "n_settings": len(r.results),
                                   "truncated": r.truncated, "reused": r.reused, "seconds": r.seconds,
                                   "harm_rule": "upper bound"
                                   if r.bounded else "point loss",
                                   "plain": {k: r.plain[k] for k in METRIC_KEYS}} for r in records]}
        patch_results = [(c.setting, m) for c, m in records[0].results if c.alpha == 0]
        heat_plain = records[0].plain
    else:
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
        if not record.results:
            raise ValueError(f"the time budget ({budget_minutes:g} min) ran out before any setting was scored; "
                             "raise --budget-minutes")
        results, bounded = record.results, True
        sweep_rows = [_row(c, m, plain, max_harm) for c, m in results]
        n_settings = len(results)
        search_info = {"kind": "grid", "budget_minutes": budget_minutes, "truncated": record.truncated}
        patch_results = [(c.setting, m) for c, m in results if c.alpha == 0]
        heat_plain = plain
    sweep_seconds = time.perf_counter() - started
    for r in records if staged else [record]:
        if r.truncated:
            budget.skip(f"{r.truncated} of {len(r.results) - r.reused + r.truncated} settings of the {r.name} stage")
    cut = bool(budget.skipped)

    eligible = sorted((r for r in results if passes_no_harm(r[1], plain, max_harm, bounded)),
                      key=lambda r: rank_key(r[1]))
    candidates = eligible[:verify_top] or sorted(results, key=lambda r: rank_key(r[1]))[:1]
    verified = []
    for candidate, proxy in tqdm(candidates, desc="verify with generate()", unit="setting", disable=not progress):
        estimate = budget.estimate(candidate)
        if verified and not budget.fits(estimate):  # the first was reserved for; the others only if they fit
            budget.skip(f"the generate() verification of {candidate.label()} (about {estimate:.0f} s, "
                        f"{max(0.0, budget.left()):.0f} s left)")
            continue
        began = time.perf_counter()
        preset = candidate_preset(wrapped.preset, candidate, grid["null_audio"])
        wrapped_candidate = wrap(model, preset, processor=processor)
        reports = [evaluate(wrapped_candidate, processor, path, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            limit=limit, progress=progress, truncate=truncate, max_harm=max_harm,
                            plain_answers=verify_plain[k]) for k, path in enumerate(paths)]
        budget.learn(candidate, time.perf_counter() - began)
        verdicts = {column: [row[f"{column}_follows"] for report in reports for row in report["items"]]
                    for column in ("plain", "backpatched")}
        paired = paired_report(items, verdicts["plain"], verdicts["backpatched"])
        verified.append((candidate, proxy, reports[0], reports[1] if len(reports) > 1 else None, paired))
    good = [v for v in verified if v[4]["harm_upper"] is None or v[4]["harm_upper"] <= max_harm + 1e-9]
    if not good:
        logger.warning("no verified setting passes the no-harm rule; writing the best-ranked one, marked as harmful")
    best, _, best_report, best_stress, best_paired = min(
        good or verified, key=lambda v: (-(v[4]["tdr_reduction_lower"] or 0.0), tdr_key(v[2]["backpatched"])))
    # Data the model does not hear, or answers that never name a label, calibrate nothing: the preset then says so
    # (status uncalibrated) instead of claiming a calibration
    not_calibrated = [w for w in (label_warning, chance_warning(items, _verified_plain(verified))) if w]
    if best_report["plain"]["tdr"] is None or best_report["backpatched"]["tdr"] is None:
        not_calibrated.append("no conflict item was answered with its audio or its text label (TDR undefined), so no "
                              "setting was scored on real answers; check the model's answers with backpatch eval")
    for warning in not_calibrated:
        logger.warning("calibration: %s", warning)
    total_seconds = time.perf_counter() - started

    heatmap = out.with_suffix(".png")
    shown = best.setting or min(patch_results, key=lambda r: tdr_key(r[1]))[0]
    _plot_heatmap(patch_results, shown, num_layers, heatmap, heat_plain)
    band = None
    if staged:
        band = out.with_suffix(".band.png")
        _plot_band(patch_results, num_layers, band, heat_plain, max_harm)
    scored_candidates = [c for r in (records if staged else [record]) for c, _ in r.results]
    planned = ["back-patching"] + (["contrastive decoding", "both"] if any(grid["alphas"]) else []) + (
        ["audio-confidence gates"] if gates else []) + (
        ["attention to audio", "audio-silence steering"] if blocks and staged else [])
    skipped = budget.skipped + [f"{kind} (the budget ran out before it)" for kind in planned
                                if kind not in _kinds(scored_candidates) and cut]
    how = f"; staged coarse-to-fine search, budget {budget_minutes:g} min" if staged else ""
    if skipped:
        how += f"; cut short by the budget: {'; '.join(skipped)}"
    preset = _calibrated_preset(wrapped, model, best, best_report, data, name or out.stem, n_settings,
                                total_seconds, grid["null_audio"], no_harm=bool(good), search=how,
                                searched=_searched(scored_candidates), stress_report=best_stress,
                                harm_upper=best_paired["harm_upper"], not_calibrated=not_calibrated,
                                harm=best_paired["harm"])
    if truncated is not None and truncated["n"]:
        preset = dataclasses.replace(preset, description=f"{preset.description} {truncated['n']} items' clips were "
                                     f"cut to their first {truncated['limit_s']:g} s (--truncate-audio).")
    preset.to_yaml(out)
    summary = {
        "preset": str(out), "heatmap": str(heatmap), "band": str(band) if band else None, "data": str(data),
        "n_items": len(items), "n_settings": n_settings, "grid": grid, "search": search_info,
        "sweep_seconds": round(sweep_seconds, 1), "total_seconds": round(total_seconds, 1),
        "plain_first_token": _public(plain), "chosen": best.label(), "no_harm": bool(good),
        "status": preset.calibration.status, "warnings": not_calibrated,
        "stress_data": str(stress_data) if stress_data is not None else None, "max_harm": max_harm,
        "searched": _searched(scored_candidates), "skipped": skipped, "budget": budget.summary(),
        "chosen_paired": best_paired,
        "short_path": scorer.short_path_ok,
        "n_conflict": n_conflict, "tdr_standard_error": round(tdr_standard_error(n_conflict), 4),
        "data_warning": data_warning,
        **({"truncated_audio": truncated} if truncated is not None else {}),
        "verified": [{"setting": s.label(), "proxy": _public(p), "plain": r["plain"], "backpatched": r["backpatched"],
                      **({"perturbed": {"plain": st["plain"], "backpatched": st["backpatched"]}} if st else {}),
                      "paired": pr} for s, p, r, st, pr in verified],
        "sweep": sweep_rows,
    }
    out.with_suffix(".sweep.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


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


def candidate_of_row(row: dict[str, Any]) -> Candidate:
    """The candidate a sweep row (:func:`_row`) describes."""
    return Candidate(Setting(**row["patch"]) if row.get("patch") else None, float(row.get("alpha") or 0.0),
                     Gate(**row["gate"]) if row.get("gate") else None,
                     Attention(**row["attention"]) if row.get("attention") else None,
                     Steering(**row["steering"]) if row.get("steering") else None)


def plain_differs(earlier: dict[str, Any] | None, plain: dict[str, Any]) -> bool:
    """Whether an earlier run's plain metrics on the same items differ from these (another model, dtype or
    preset): its scores cannot be reused then."""
    return bool(earlier) and any(earlier.get(k) is not None and plain[k] is not None
                                 and abs(earlier[k] - plain[k]) > 1e-3
                                 for k in ("tdr", "audio_only_acc", "consistent_acc"))


def previous_results(sweep: str | Path, data: str | Path, stress_data: str | Path | None, seed: int,
                     n_items: int, staged: bool = True) -> dict[str, dict]:
    """``results``: per stage, the candidates an earlier staged run scored and their metrics (paired harm and
    TDR-reduction bounds included, per-item verdicts not), read from its ``.sweep.json``. Its stages used the same clip
    subsets only if it ran on the same data, stress data, seed and item count: anything else is refused."""
    path = Path(sweep)
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--resume {path}: cannot read it as a calibration .sweep.json ({err})") from err
    if not staged:
        raise ValueError("--resume continues the staged search; it does not apply to an explicit grid "
                         "(--sources/--targets/...): drop one of them")
    if not isinstance(earlier, dict) or (earlier.get("search") or {}).get("kind") != "staged":
        raise ValueError(f"--resume {path}: not the .sweep.json of a staged calibration search")
    wanted = {"data": str(data), "stress_data": str(stress_data) if stress_data is not None else None,
              "seed": seed, "n_items": n_items}
    found = {"data": earlier.get("data"), "stress_data": earlier.get("stress_data"),
             "seed": earlier["search"].get("seed"), "n_items": earlier.get("n_items")}
    differ = [f"{key} {found[key]!r} there, {wanted[key]!r} here" for key in wanted if found[key] != wanted[key]]
    if differ:
        raise ValueError(f"--resume {path}: that run used other data, so its stages scored other items ("
                         + "; ".join(differ) + "); resume with the same --data, --stress-data, --seed and --limit")
    out: dict[str, dict[Candidate, dict[str, Any]]] = {}
    for row in earlier.get("sweep", []):
        candidate = candidate_of_row(row)
        paired = {key: row.get(key) for key in ("harm", "harm_upper", "tdr_reduction", "tdr_reduction_lower")}
        m = {**{key: row.get(key) for key in METRIC_KEYS}, "paired": paired if row.get("harm") else None}
        out.setdefault(row["stage"], {})[candidate] = m
    logger.info("resuming from %s: %s", path, ", ".join(f"{len(v)} {k}" for k, v in out.items()))
    stages = earlier["search"].get("stages", [])
    return {"results": out, "sizes": {stage["name"]: stage["n_items"] for stage in stages},
            "plain": {stage["name"]: stage.get("plain") for stage in stages}}


def _warn_about_data(data: str | Path) -> None:
    """Calibrating on test data makes every later number on it optimistic: say so for the organism's examples."""
    from .. import organism

    try:
        shipped = Path(data).resolve() == Path(organism.examples_path()).resolve()
    except OSError:  # pragma: no cover - an unreadable path failed in load_conflict_set already
        shipped = False
    if shipped:
        logger.warning("calibration data %s is the organism's shipped examples, which are its test voices: numbers "
                       "measured on them after tuning on them are optimistic; calibrate on a validation split instead",
                       data)


def _verified_plain(verified) -> dict[str, Any]:
    """Plain metrics over every verified item (clean and stress), from the first verification."""
    reports = [r for r in verified[0][2:4] if r is not None]
    return metrics_of_reports(reports)


def metrics_of_reports(reports) -> dict[str, Any]:
    """The plain audio-only accuracy and count over several eval reports (what the chance check needs)."""
    n = sum(r["plain"]["n_audio_only"] for r in reports)
    right = sum(round((r["plain"]["audio_only_acc"] or 0.0) * r["plain"]["n_audio_only"]) for r in reports)
    return {"n_audio_only": n, "audio_only_acc": right / n if n else None}


def _plain_metrics(items, answers) -> dict[str, Any]:
    verdicts = [judge(a, it) for a, it in zip(answers, items, strict=True)]
    return {**metrics(items, verdicts), "verdicts": verdicts}


def _paired(m: dict[str, Any], record: StageRecord) -> dict[str, Any]:
    m["paired"] = paired_report(record.items, record.plain["verdicts"], m["verdicts"])
    return m


def _searched(candidates: Sequence[Candidate]) -> str:
    """What the search really scored, for the preset's description: only the kinds it got to."""
    kinds = _kinds(candidates)
    return ", ".join(kinds[:-1]) + (" and " if len(kinds) > 1 else "") + kinds[-1] if kinds else "nothing"


def _kinds(candidates: Sequence[Candidate]) -> list[str]:
    kinds = []
    if any(c.setting is not None and not c.alpha and not c.has_blocks for c in candidates):
        kinds.append("back-patching")
    if any(c.setting is None and c.alpha and not c.has_blocks for c in candidates):
        kinds.append("contrastive decoding")
    if any(c.setting is not None and c.alpha and not c.has_blocks for c in candidates):
        kinds.append("both")
    if any(c.gate is not None for c in candidates):
        kinds.append("audio-confidence gates")
    if any(c.attention is not None for c in candidates):
        kinds.append("attention to audio")
    if any(c.steering is not None for c in candidates):
        kinds.append("audio-silence steering")
    if any(c.has_blocks and (c.setting is not None or c.alpha or None not in (c.attention, c.steering))
           for c in candidates):
        kinds.append("the blocks combined with the other methods")
    return kinds


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
