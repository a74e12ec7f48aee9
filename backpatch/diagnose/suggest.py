"""The suggested preset of ``backpatch diagnose``: candidate layers read off the curves, a small first-token sweep
over them, and the preset written from the best setting.

The sweep is calibration's machinery (:mod:`backpatch.calibrate.sweep`): one capture per batch
(:func:`~backpatch.calibrate.sweep.prepare_batches`), each setting scored by :class:`~backpatch.calibrate.sweep.Scorer`,
and the no-harm rule of :func:`~backpatch.calibrate.search.passes_no_harm`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from ..calibrate.grid import Candidate, Setting
from ..calibrate.provenance import portable_name, sha256_of
from ..calibrate.search import passes_no_harm
from ..calibrate.sweep import Scorer, prepare_batches
from ..calibrate.writing import candidate_preset
from ..engine import Resolved
from ..evaluate import ConflictItem, judge, metrics
from ..methods import Patch
from ..methods.backpatching import uncalibrated_patch
from ..preset import AudioSpan, Calibration, Match, ModelFacts, Preset
from ..wrapper import wrap

#: (mode, scale, positions) tried from the latest well-probed source into the early targets: the digits
#: organism's best no-harm setting (last-token replace), a gentler add at the last token, classic audio-span add
EARLY_COMBOS = (("replace", 1.0, "last"), ("add", 1.0, "last"), ("add", 1.0, "audio"))


def _best_probe_source(layers: list[dict], num_layers: int) -> int:
    """The latest layer whose conflict probe accuracy is within 0.05 of the best (the last layer without probes)."""
    scores = [(row["layer"], row["probe_audio_conflict"]) for row in layers[1:] if row["probe_audio_conflict"]
              is not None]
    if not scores:
        return num_layers - 1
    best = max(p for _, p in scores)
    return max(layer for layer, p in scores if p >= best - 0.05)


def _sweep_settings(layers: list[dict], num_layers: int) -> list[Setting]:
    """A handful of settings read off the curves, of the two kinds that worked on the organisms.

    Early targets (layer 0 and the first quarter, where the audio is read in) from the latest layer where the
    audio answer is still decodable under conflict, and from the last layer; and the gentle kind: a small ``add`` at
    the audio span, the uncalibrated presets' rule (:func:`~backpatch.methods.backpatching.uncalibrated_patch`:
    round(0.9 N) into N/2) and its neighbours from the last layer and into the first quarter. On smol-whisper strong
    or far-back patches wrecked the answers while small audio-span adds from late layers into the middle helped most.
    """
    last, early = num_layers - 1, sorted({0, num_layers // 4})
    out = [Setting(s, t, scale, mode, positions) for s in sorted({_best_probe_source(layers, num_layers), last})
           for t in early if s > t for mode, scale, positions in EARLY_COMBOS]
    rule = uncalibrated_patch(num_layers)
    out += [Setting(s, t, rule.scale, rule.mode, rule.positions) for s in sorted({rule.source, last})
            for t in sorted({rule.target, num_layers // 4}) if s > t]
    return list(dict.fromkeys(out))


def _sweep(
    model: nn.Module, processor: Any, base: Preset, items: Sequence[ConflictItem], layers: list[dict],
    batch_size: int, max_harm: float, progress: bool,
) -> tuple[list[dict], dict, Any]:
    """First-token metrics of a handful of settings: one capture per batch, then calibration's :class:`Scorer`."""
    settings = _sweep_settings(layers, len(layers))
    sources = sorted({s.source for s in settings})
    probe_preset = Preset(patches=[Patch(source=max(sources), target=min(s.target for s in settings))],
                          name=base.name, model=base.model, audio_span=base.audio_span, match=base.match)
    wrapped = wrap(model, probe_preset, processor=processor)
    grid = {"sources": sources, "positions": sorted({s.positions for s in settings})}
    batches, plain_answers = prepare_batches(wrapped, processor, list(items), grid, batch_size, progress)
    plain = metrics(items, [judge(a, it) for a, it in zip(plain_answers, items, strict=True)])
    # no contrastive candidates here, so no null audio is ever built
    scorer = Scorer(model, processor, wrapped.preset, "silence", None, candidate_preset)
    rows = []
    for setting in tqdm(settings, desc="suggestion sweep", unit="setting", disable=not progress):
        m = scorer.score(Candidate(setting), batches)
        rows.append({"setting": setting.label(), "patch": setting.patch(), "metrics": m,
                     "no_harm": passes_no_harm(m, plain, max_harm)})
    return rows, plain, wrapped.resolved


def _suggest(rows: list[dict], plain: dict, base: Preset, resolved: Resolved, model: nn.Module, data: str,
             n_items: int) -> Preset:
    def key(r: dict) -> tuple[float, float]:
        m = r["metrics"]
        return (m["tdr"] if m["tdr"] is not None else 1.0, -(m["afr"] or 0.0))

    eligible = sorted((r for r in rows if r["no_harm"]), key=key)
    best = eligible[0] if eligible else sorted(rows, key=key)[0]
    m = best["metrics"]
    improves = plain["tdr"] is not None and m["tdr"] is not None and m["tdr"] < plain["tdr"]
    verdict = ("lowers first-token TDR" if improves else "does NOT lower first-token TDR (no setting did)")
    harm = "passes" if best["no_harm"] else "FAILS"
    description = (
        f"Suggested by `backpatch diagnose` on {Path(data).name} ({n_items} items): late sources where the audio "
        "answer stays decodable under conflict into early targets, and gentle audio-span adds from late layers into "
        f"the middle; best of {len(rows)} first-token settings, {verdict}: "
        f"TDR {plain['tdr']} -> {m['tdr']}, audio-only {plain['audio_only_acc']} -> {m['audio_only_acc']}, "
        f"consistent {plain['consistent_acc']} -> {m['consistent_acc']}; {harm} the no-harm rule. First-token "
        "proxy only: run `backpatch calibrate` (verified with generate) before relying on it."
    )
    values = {}
    for name in ("tdr", "afr", "audio_only_acc", "consistent_acc"):
        for suffix, source in (("before", plain), ("after", m)):
            if source[name] is not None:
                values[f"{name}_{suffix}"] = float(source[name])
    config = model.config
    return Preset(
        patches=[best["patch"]],
        name=f"{base.name}-suggested" if base.name and base.name != "custom" else "suggested",
        description=description,
        match=base.match or Match(model_type=config.model_type),
        model=ModelFacts(layers=resolved.layers_path, num_layers=resolved.num_layers),
        audio_span=base.audio_span or AudioSpan(token_id=resolved.audio_token_id),
        calibration=Calibration(status="uncalibrated", data=portable_name(data), data_sha256=sha256_of(data),
                                metrics=values),
    )


def _unswept(layers: list[dict], base: Preset, resolved: Resolved, model: nn.Module) -> Preset:
    """The suggestion without a sweep: the uncalibrated presets' rule, measured to do no harm on both organisms."""
    return Preset(patches=[uncalibrated_patch(resolved.num_layers)],
                  name="suggested", description="Suggested by `backpatch diagnose` without a sweep.",
                  match=base.match or Match(model_type=model.config.model_type),
                  model=ModelFacts(layers=resolved.layers_path, num_layers=resolved.num_layers),
                  audio_span=base.audio_span or AudioSpan(token_id=resolved.audio_token_id))


def suggest_preset(
    model: nn.Module, processor: Any, base: Preset, resolved: Resolved, items: Sequence[ConflictItem],
    layers: list[dict], data: str | Path, batch_size: int, max_harm: float, progress: bool, sweep: bool = True,
) -> tuple[list[dict], Preset]:
    """The sweep rows (empty without ``sweep``) and the suggested preset."""
    if not sweep:
        return [], _unswept(layers, base, resolved, model)
    rows, plain, sweep_resolved = _sweep(model, processor, base, items, layers, batch_size, max_harm, progress)
    return rows, _suggest(rows, plain, base, sweep_resolved, model, str(data), len(items))
