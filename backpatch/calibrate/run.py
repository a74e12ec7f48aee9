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
warning states the standard error that too few conflict items imply (:func:`.data.conflict_count_warning`).

This module only runs the steps in order; each lives in its own module: the data and its warnings
(:mod:`.data`), running the search on the model (:mod:`.run_search`), resuming an earlier run (:mod:`.resume`),
the ``generate()`` verification and its plain answers (:mod:`.verify`), the sweep rows and what was searched
(:mod:`.report`), the figures (:mod:`.plots`) and the preset (:mod:`.writing`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..answerability import chance_warning, check_labels
from ..evaluate import check_clip_lengths, check_system_turns
from ..inputs import audio_truncation, truncation_enabled
from ..methods import Patch
from ..methods.contrastive import silence_frame
from ..preset import Preset
from ..registry import registered_methods
from ..wrapper import preset_for, wrap
from .budget import Budget
from .data import (
    _warn_about_data,
    conflict_count_warning,
    conflicts_for,
    load_calibration_items,
    tdr_standard_error,
)
from .grid import default_grid
from .holdout import leave_one_family_out
from .plots import _plot_band, _plot_heatmap
from .provenance import portable_name
from .report import METRIC_KEYS, _kinds, _public, _row, _searched
from .resume import candidate_of_row, plain_differs, previous_results
from .run_search import STAGE_FRACTIONS, _grid_sweep, _plain_metrics, _staged, selection_stage
from .search import clip_subsets, family_losses, passes_no_harm, rank_key, tdr_key, verification_failures
from .sweep import Scorer
from .verify import _plain_answers_within, _verified_plain, _verify_finalists
from .writing import _calibrated_preset, _with_patches, candidate_preset

logger = logging.getLogger(__name__)

# moved to the modules above (issue 26) and still imported from here by the scripts and tests
__all__ = ["STAGE_FRACTIONS", "calibrate", "candidate_of_row", "conflict_count_warning", "conflicts_for",
           "load_calibration_items", "plain_differs", "previous_results", "selection_stage", "tdr_standard_error"]
__all__ += ["_plain_metrics", "_row", "_warn_about_data"]

GRID_KEYS = ("sources", "targets", "scales", "modes", "positions")


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
    command: str | None = None,
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
    the settings it scored are reused, not scored again (:func:`.resume.previous_results`), so a search its budget cut
    short goes on. ``command``: the command recorded in the preset's provenance (the CLI passes its own command
    line; by default, this call with its data arguments).
    """
    truncate = truncation_enabled(truncate)
    if command is None:
        given = {"data": portable_name(data), "out": portable_name(out), "stress_data": stress_data and
                 portable_name(stress_data), "grid": grid, "seed": seed, "budget_minutes": budget_minutes,
                 "max_harm": max_harm, "limit": limit}
        command = "backpatch.calibrate.calibrate(model, processor, " + ", ".join(
            f"{k}={v!r}" for k, v in given.items() if v is not None) + ")"
    with audio_truncation(truncate):  # the sweep builds its inputs deep down: it inherits the choice
        return _calibrate(model, processor, data, out, base_preset, grid, batch_size, verify_top, max_new_tokens,
                          max_harm, name, limit, progress, budget_minutes, seed, truncate, stress_data, gates,
                          full_stage, resume, blocks, command)


def _calibrate(model, processor, data, out, base_preset, grid, batch_size, verify_top, max_new_tokens, max_harm,
               name, limit, progress, budget_minutes, seed, truncate, stress_data=None, gates=True,
               full_stage=True, resume=None, blocks=True, command=None) -> dict[str, Any]:
    started = time.perf_counter()
    budget_s = budget_minutes * 60.0
    out = Path(out)
    items = load_calibration_items(data, stress_data, limit)
    truncated = check_clip_lengths(items, processor, truncate)
    check_system_turns(items, processor)
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
        record = _grid_sweep(wrapped, processor, items, grid, scorer, batch_size, search_end, max_harm, progress,
                             null)
        if not record.results:
            raise ValueError(f"the time budget ({budget_minutes:g} min) ran out before any setting was scored; "
                             "raise --budget-minutes")
        plain = record.plain
        results, bounded = record.results, True
        sweep_rows = [_row(c, m, plain, max_harm) for c, m in results]
        n_settings = len(results)
        search_info = {"kind": "grid", "budget_minutes": budget_minutes, "truncated": record.truncated}
        patch_results = [(c.setting, m) for c, m in results if c.alpha == 0]
        heat_plain = plain
    sweep_seconds = time.perf_counter() - started
    # does the rule predict harm on a kind of speech it did not check? (perturbed data with 2+ families only)
    holdout = leave_one_family_out(chosen_stage if staged else record, max_harm)
    for r in records if staged else [record]:
        if r.truncated:
            budget.skip(f"{r.truncated} of {len(r.results) - r.reused + r.truncated} settings of the {r.name} stage")
    cut = bool(budget.skipped)

    eligible = sorted((r for r in results if passes_no_harm(r[1], plain, max_harm, bounded)),
                      key=lambda r: rank_key(r[1]))
    candidates = eligible[:verify_top] or sorted(results, key=lambda r: rank_key(r[1]))[:1]
    verified = _verify_finalists(model, wrapped, processor, candidates, items, paths, verify_plain, budget,
                                 grid["null_audio"], batch_size, max_new_tokens, limit, progress, truncate, max_harm)
    failures = [verification_failures(v[4], max_harm) for v in verified]
    good = [v for v, failed in zip(verified, failures, strict=True) if not failed]
    if not good:
        logger.warning("no verified setting passes the no-harm rule; writing the best-ranked one, marked as harmful "
                       "(%s)", "; ".join(f"{v[0].label()}: {', '.join(failed)}"
                                         for v, failed in zip(verified, failures, strict=True)))
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
        ["plausibility guards", "agreement guards"] if any(grid["alphas"]) and staged else []) + (
        ["audio-confidence gates", "patch agreement guards"] if gates else []) + (
        [m.title for m in registered_methods() if m.calibration_grid(num_layers)] if blocks and staged else [])
    skipped = budget.skipped + [f"{kind} (the budget ran out before it)" for kind in planned
                                if kind not in _kinds(scored_candidates) and cut]
    how = f"; staged coarse-to-fine search, budget {budget_minutes:g} min" if staged else ""
    if skipped:
        how += f"; cut short by the budget: {'; '.join(skipped)}"
    preset = _calibrated_preset(wrapped, model, best, best_report, data, name or out.stem, n_settings,
                                total_seconds, grid["null_audio"], no_harm=bool(good), search=how,
                                searched=_searched(scored_candidates), stress_report=best_stress,
                                harm_upper=best_paired["harm_upper"], not_calibrated=not_calibrated,
                                harm=best_paired["harm"], command=command,
                                family_harm=family_losses(best_paired, max_harm))
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
        "chosen_paired": best_paired, "leave_one_family_out": holdout,
        "short_path": scorer.short_path_ok,
        "n_conflict": n_conflict, "tdr_standard_error": round(tdr_standard_error(n_conflict), 4),
        "data_warning": data_warning,
        **({"truncated_audio": truncated} if truncated is not None else {}),
        "verified": [{"setting": s.label(), "proxy": _public(p), "plain": r["plain"], "backpatched": r["backpatched"],
                      **({"perturbed": {"plain": st["plain"], "backpatched": st["backpatched"]}} if st else {}),
                      "paired": pr, "no_harm": not failed, "family_losses": family_losses(pr, max_harm)}
                     for (s, p, r, st, pr), failed in zip(verified, failures, strict=True)],
        "sweep": sweep_rows,
    }
    out.with_suffix(".sweep.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary
