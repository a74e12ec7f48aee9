"""``diagnose()``: the entry of ``backpatch diagnose``. Picks the preset, runs the passes, analyses them, suggests a
preset, and writes ``report.json``, ``report.md``, ``suggested_preset.yaml`` and the figures into ``out_dir``."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from torch import nn

from ..evaluate import check_clip_lengths, check_system_turns, load_conflict_set
from ..inputs import audio_truncation, truncation_enabled
from ..methods import Patch
from ..preset import Preset, PresetError
from ..wrapper import preset_for, wrap
from .analysis import first_token_metrics, layer_rows
from .passes import record_runs
from .plots import _plot
from .report import _assemble, _markdown
from .suggest import suggest_preset

logger = logging.getLogger(__name__)


def diagnose(
    model: nn.Module,
    processor: Any,
    data: str | Path,
    out_dir: str | Path,
    preset: Preset | str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
    *,
    sweep: bool = True,
    max_harm: float = 0.02,
    truncate: bool | None = None,
) -> dict[str, Any]:
    """Run the layer-wise diagnostics on a conflict set and write the report to ``out_dir``.

    ``preset`` (a :class:`Preset`, bundled name or YAML path; default: the bundled preset matching the model)
    gives the back-patched curves and the layer path / audio span; without one only plain curves are drawn.
    Works on fp16/bf16 models (states are cast to float32 on the CPU as they are collected) and on models
    dispatched with ``device_map``. Returns the report (also written as ``report.json``).

    Clips longer than the model's audio window are refused before any model work, naming every such item,
    unless ``truncate=True``; then ``report["truncated_audio"]`` (and a line of ``report.md``) says which were cut.
    """
    truncate = truncation_enabled(truncate)
    items = load_conflict_set(data, limit)
    truncated = check_clip_lengths(items, processor, truncate)
    check_system_turns(items, processor)
    with audio_truncation(truncate):  # the suggestion sweep builds its inputs deep down: it inherits the choice
        return _diagnose(model, processor, data, out_dir, preset, limit, batch_size, progress, sweep, max_harm,
                         items, truncated)


def _diagnose(model, processor, data, out_dir, preset, limit, batch_size, progress, sweep, max_harm, items,
              truncated) -> dict[str, Any]:
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        chosen = preset_for(model, preset)
    except PresetError:
        if preset is not None:
            raise
        logger.warning("no bundled preset matches this model; the back-patched curves are skipped")
        chosen = None
    # the layers are studied with back-patching alone: contrastive decoding, the gate and the peer blocks are left out
    has_patches = chosen is not None and bool(chosen.patches)
    if has_patches:
        base = dataclasses.replace(chosen, contrastive=None, gate=None, attention=None, steering=None)
    else:  # resolve needs some patch; it only supplies layers and the audio span then
        base = Preset(patches=[Patch(source=1, target=0)], **({"name": chosen.name, "match": chosen.match,
                      "model": chosen.model, "audio_span": chosen.audio_span} if chosen is not None else {}))
    others = [key for key in ("contrastive", "gate", "attention", "steering")
              if chosen is not None and getattr(chosen, key) is not None]
    if others:
        logger.info("diagnose shows back-patching only; the preset's %s %s ignored", " and ".join(others),
                    "is" if len(others) == 1 else "are")
    wrapped = wrap(model, base, processor=processor)
    resolved = wrapped.resolved

    runs = record_runs(wrapped, model, processor, items, batch_size, progress, has_patches)
    layers = layer_rows(runs, items, resolved.num_layers, progress, has_patches)
    first_token = first_token_metrics(runs, items)
    sweep_rows, suggested = suggest_preset(model, processor, base, resolved, items, layers, data, batch_size,
                                           max_harm, progress, sweep)
    suggested.to_yaml(out_dir / "suggested_preset.yaml")

    report = _assemble(model, data, items, chosen if has_patches else None, layers, first_token, sweep_rows,
                       suggested, batch_size, limit, started)
    if truncated is not None:
        report["truncated_audio"] = truncated
    figures = _plot(report, out_dir)
    report["figures"] = figures
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(_markdown(report), encoding="utf-8")
    logger.info("diagnostics written to %s in %.0f s", out_dir, time.perf_counter() - started)
    return report
