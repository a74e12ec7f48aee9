"""Turning a chosen candidate into the preset file that calibration writes (with its provenance)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..methods import Contrastive, Patch
from ..preset import AudioSpan, Calibration, Match, ModelFacts, Preset
from .grid import Candidate
from .provenance import portable_name, sha256_of


def _none(preset: Preset) -> dict:
    """Every method's section of ``preset`` unset: a candidate's preset holds its own settings and no others (a
    gated base preset would otherwise keep a gate without the rows it reads)."""
    return {method.key: None for method, _ in preset.methods()}


def _with_patches(preset: Preset, patches: list[Patch], contrastive: Contrastive | None = None) -> Preset:
    """``preset``'s facts (layers, audio span, match) with only ``patches`` and ``contrastive``."""
    return preset.with_sections({**_none(preset), "patches": list(patches), "contrastive": contrastive})


def candidate_preset(base: Preset, candidate: Candidate, null_audio: str) -> Preset:
    return base.with_sections({**_none(base), **candidate.sections(null_audio)})


def _calibrated_preset(wrapped, model, candidate, report, data, name, n_settings, seconds, null_audio,
                       no_harm, search: str = "", searched: str = "back-patching, contrastive decoding and both",
                       stress_report: dict | None = None, harm_upper: float | None = None,
                       not_calibrated: list[str] | None = None, harm: dict | None = None,
                       command: str | None = None, family_harm: Sequence[str] = ()) -> Preset:
    before, after = report["plain"], report["backpatched"]
    metric_values = {}
    for prefix, source_report in (("", report), ("perturbed_", stress_report)):
        if source_report is None:
            continue
        for key in ("tdr", "afr", "other_rate", "audio_only_acc", "consistent_acc"):
            for suffix, source in (("before", source_report["plain"]), ("after", source_report["backpatched"])):
                if source[key] is not None:
                    metric_values[f"{prefix}{key}_{suffix}"] = float(source[key])
    metric_values["n_conflict"] = int(before["n_conflict"])
    if harm_upper is not None:
        metric_values["harm_upper_bound"] = float(harm_upper)
    for split, kinds in (harm or {}).items():  # per split and control kind: what the demo marks with "!"
        prefix = "" if split == "clean" else f"{split}_"
        for kind, bound in kinds.items():
            if bound.get("upper") is not None:
                metric_values[f"{prefix}{kind}_acc_harm_upper"] = float(bound["upper"])
    config = model.config
    name_or_path = getattr(config, "_name_or_path", "") or ""
    glob = f"*{Path(name_or_path).parent.name}/{Path(name_or_path).name}*" if name_or_path else None
    base = wrapped.preset
    family_note = f" (point loss per perturbation family: {', '.join(family_harm)})" if family_harm else ""
    description = (
        f"Calibrated by `backpatch calibrate` on {portable_name(data)} ({before['n_conflict']} conflicts): "
        f"{n_settings} settings ({searched}{search}) scored by first answer token, "
        f"the best no-harm ones verified with full greedy "
        f"generate; chosen {candidate.label()}. TDR {before['tdr']} -> {after['tdr']}, audio-only "
        f"{before['audio_only_acc']} -> {after['audio_only_acc']}, consistent {before['consistent_acc']} -> "
        f"{after['consistent_acc']} (on {portable_name(data)})"
        f"{'' if no_harm else '; WARNING: fails the no-harm rule'}{family_note}."
    )
    if stress_report is not None:
        sp, sb = stress_report["plain"], stress_report["backpatched"]
        description += (f" Perturbed validation ({portable_name(stress_report['data'])}): "
                        f"TDR {sp['tdr']} -> {sb['tdr']}, "
                        f"audio-only {sp['audio_only_acc']} -> {sb['audio_only_acc']}, consistent "
                        f"{sp['consistent_acc']} -> {sb['consistent_acc']}.")
    if harm_upper is not None:
        description += f" Paired 95% upper bound on any control accuracy loss: {harm_upper:g}."
    description += f" Run time {seconds:.0f} s."
    if not_calibrated:
        description = ("NOT CALIBRATED: " + " ".join(f"{w[0].upper()}{w[1:]}." for w in not_calibrated) + " "
                       + description)
    return Preset.from_sections(
        candidate.sections(null_audio),
        name=name,
        description=description,
        match=base.match or Match(model_type=config.model_type, name_or_path=glob),
        model=ModelFacts(layers=wrapped.resolved.layers_path, num_layers=wrapped.resolved.num_layers),
        audio_span=base.audio_span or AudioSpan(token_id=wrapped.resolved.audio_token_id),
        calibration=Calibration(status="uncalibrated" if not_calibrated else "calibrated",
                                data=portable_name(data), data_sha256=sha256_of(data), metrics=metric_values,
                                command=command),
    )


