"""Calibration: sweep back-patching (source x target x scale x mode x positions) and contrastive decoding
(alpha, alone and combined with the best patch settings) on a validation conflict set, write a preset.

The sweep scores every setting by the model's first answer token (greedy argmax at the last prompt position),
which is what decides single-word answers, and reuses work: one unpatched forward per batch yields the plain
answers *and* the states of every candidate source layer, and each setting then needs one patched forward
(no capture pass, no decoding). The best few settings that pass the no-harm rule are then verified with full
``generate()`` through :func:`backpatch.evaluate.evaluate`; the verified numbers go into the preset.

No-harm rule: audio-only and consistent accuracy each within ``max_harm`` (2 points) of plain.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ._architectures import resolve
from ._contrastive import silence_frame
from ._engine import _hidden, _select, generation_session
from ._positions import position_masks
from .evaluate import encode_items, evaluate, judge, load_conflict_set, metrics
from .preset import AudioSpan, Calibration, Contrastive, Match, ModelFacts, Patch, Preset, patch_label
from .wrapper import BackpatchedModel, preset_for, wrap

__all__ = ["Candidate", "Setting", "calibrate", "default_grid", "passes_no_harm"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setting:
    source: int
    target: int
    scale: float
    mode: str
    positions: str

    def patch(self) -> Patch:
        return Patch(self.source, self.target, self.scale, self.mode, self.positions)

    def label(self) -> str:
        return patch_label(self)


@dataclass(frozen=True)
class Candidate:
    """What a preset applies: an optional patch setting and an optional contrastive alpha."""

    setting: Setting | None
    alpha: float = 0.0

    def label(self) -> str:
        parts = ([self.setting.label()] if self.setting else []) + ([f"contrastive a={self.alpha:g}"] if self.alpha
                                                                     else [])
        return " + ".join(parts) or "plain"


def default_grid(num_layers: int) -> dict[str, list]:
    """Late half as sources, early half as targets; add at three scales, replace at 1; audio and last."""
    half = num_layers // 2
    return {
        "sources": list(range(half, num_layers)),
        "targets": list(range(0, half)),
        "scales": [0.5, 1.0, 2.0],
        "modes": ["add", "replace"],
        "positions": ["audio", "last"],
        # contrastive decoding, alone and combined with the best patch settings (empty list: patches only)
        "alphas": [1.0, 2.0, 4.0],
        "null_audio": "silence",
    }


def _settings(grid: dict[str, list]) -> list[Setting]:
    out = []
    for s, t, mode, positions in itertools.product(grid["sources"], grid["targets"], grid["modes"], grid["positions"]):
        if s <= t:
            continue
        scales = [1.0] if mode == "replace" and 1.0 in grid["scales"] else grid["scales"]
        out += [Setting(s, t, float(a), mode, positions) for a in scales]
    return out


def passes_no_harm(candidate: dict[str, Any], plain: dict[str, Any], max_harm: float = 0.02) -> bool:
    """Audio-only and consistent accuracy each within ``max_harm`` of plain (missing kinds do not count)."""
    for key in ("audio_only_acc", "consistent_acc"):
        if plain[key] is not None and candidate[key] is not None and candidate[key] < plain[key] - max_harm - 1e-9:
            return False
    return True


def _tdr_key(m: dict[str, Any]) -> float:
    return m["tdr"] if m["tdr"] is not None else 1.0


class _Batch:
    """One batch of items: model inputs, and the plain states of every candidate source at each position kind."""

    def __init__(self, items, inputs, states):
        self.items = items
        self.inputs = inputs
        self.states = states


@torch.no_grad()
def _first_token_answers(model: torch.nn.Module, processor: Any, inputs: Any) -> list[str]:
    logits = model(**inputs).logits[:, -1]
    return [processor.decode([int(t)], skip_special_tokens=True) for t in logits.argmax(-1)]


@torch.no_grad()
def _prepare(wrapped: BackpatchedModel, processor: Any, items, grid, batch_size: int, progress: bool):
    """Plain first-token answers and captured source states, one unpatched forward per batch."""
    resolved = wrapped.resolved
    batches, plain_answers = [], []
    sources = sorted(set(grid["sources"]))
    kinds = set(grid["positions"])
    for start in tqdm(range(0, len(items), batch_size), desc="capture", unit="batch", disable=not progress):
        chunk = items[start : start + batch_size]
        inputs = encode_items(processor, chunk).to(wrapped.device)
        masks = position_masks(inputs["input_ids"], inputs.get("attention_mask"), resolved.audio_token_id, kinds)
        states: dict[tuple[int, str], torch.Tensor] = {}

        def make_hook(layer, masks=masks, states=states):
            def hook(_module, _args, output):
                hidden = _hidden(output)
                for kind, mask in masks.items():
                    states[(layer, kind)] = _select(hidden, mask.to(hidden.device)).detach()

            return hook

        handles = [resolved.layers[s].register_forward_hook(make_hook(s)) for s in sources]
        try:
            plain_answers += _first_token_answers(resolved.generator, processor, inputs)
        finally:
            for h in handles:
                h.remove()
        batches.append(_Batch(chunk, inputs, states))
    return batches, plain_answers


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
) -> dict[str, Any]:
    """Sweep, verify, and write ``out`` (a preset YAML), ``out`` with ``.png`` (heatmap) and ``.sweep.json``.

    ``base_preset`` supplies the audio span and layer path (default: what ``wrap`` would pick, or auto).
    Returns a summary dict (also saved in the sweep JSON).
    """
    started = time.perf_counter()
    out = Path(out)
    items = load_conflict_set(data, limit)
    # The base preset only contributes facts (layer path, audio span, match); its patches are replaced.
    base_preset = preset_for(model, base_preset, fallback=Preset(patches=[Patch(source=1, target=0)],
                                                                 name=name or out.stem))
    wrapped = wrap(model, _with_patches(base_preset, [Patch(source=1, target=0)]), processor=processor)
    num_layers = wrapped.resolved.num_layers
    grid = {**default_grid(num_layers), **(grid or {})}
    if grid["alphas"] and grid["null_audio"] == "silence" and getattr(processor, "feature_extractor", None) is None:
        raise ValueError("contrastive calibration with null_audio silence needs a processor with a feature extractor")
    grid["sources"] = [s + num_layers if s < 0 else s for s in grid["sources"]]
    grid["targets"] = [t + num_layers if t < 0 else t for t in grid["targets"]]
    settings = _settings(grid)
    if not settings:
        raise ValueError("the calibration grid is empty: every source must be later than some target")
    logger.info("calibrating %d settings on %d items", len(settings), len(items))

    batches, plain_answers = _prepare(wrapped, processor, items, grid, batch_size, progress)
    plain = metrics(items, [judge(a, it) for a, it in zip(plain_answers, items, strict=True)])
    silence = silence_frame(processor) if grid["alphas"] and grid["null_audio"] == "silence" else None

    def score(candidate: Candidate) -> dict[str, Any]:
        preset = _candidate_preset(wrapped.preset, candidate, grid["null_audio"])
        resolved = resolve(model, preset, processor)
        answers = []
        for batch in batches:
            with generation_session(resolved, preset.contrastive, silence, precaptured=batch.states):
                answers += _first_token_answers(resolved.generator, processor, batch.inputs)
        return metrics(items, [judge(a, it) for a, it in zip(answers, items, strict=True)])

    results = [(Candidate(s), score(Candidate(s))) for s in tqdm(settings, desc="sweep patches", unit="setting",
                                                                  disable=not progress)]
    best_patches = [c.setting for c, m in sorted(results, key=lambda r: _tdr_key(r[1]))
                    if passes_no_harm(m, plain, max_harm)][:3]
    contrastive = [Candidate(s, float(a)) for a in grid["alphas"] if a > 0 for s in (None, *best_patches)]
    results += [(c, score(c)) for c in tqdm(contrastive, desc="sweep contrastive", unit="setting",
                                            disable=not progress)]
    sweep_seconds = time.perf_counter() - started

    eligible = sorted((r for r in results if passes_no_harm(r[1], plain, max_harm)), key=lambda r: _tdr_key(r[1]))
    candidates = eligible[:verify_top] or sorted(results, key=lambda r: _tdr_key(r[1]))[:1]
    verified = []
    for candidate, proxy in candidates:
        preset = _candidate_preset(wrapped.preset, candidate, grid["null_audio"])
        report = evaluate(wrap(model, preset, processor=processor), processor, data, batch_size=batch_size,
                          max_new_tokens=max_new_tokens, limit=limit, progress=progress)
        verified.append((candidate, proxy, report))
    good = [v for v in verified if passes_no_harm(v[2]["backpatched"], v[2]["plain"], max_harm)]
    if not good:
        logger.warning("no verified setting passes the no-harm rule; writing the lowest-TDR one, marked as harmful")
    best, _, best_report = min(good or verified, key=lambda v: _tdr_key(v[2]["backpatched"]))
    total_seconds = time.perf_counter() - started

    heatmap = out.with_suffix(".png")
    patch_results = [(c.setting, m) for c, m in results if c.alpha == 0]
    shown = best.setting or min(patch_results, key=lambda r: _tdr_key(r[1]))[0]
    _plot_heatmap(patch_results, shown, num_layers, heatmap, plain)
    preset = _calibrated_preset(wrapped, model, best, best_report, data, name or out.stem, len(results),
                                total_seconds, grid["null_audio"], no_harm=bool(good))
    preset.to_yaml(out)
    summary = {
        "preset": str(out), "heatmap": str(heatmap), "data": str(data), "n_items": len(items),
        "n_settings": len(results), "grid": grid,
        "sweep_seconds": round(sweep_seconds, 1), "total_seconds": round(total_seconds, 1),
        "plain_first_token": plain, "chosen": best.label(), "no_harm": bool(good),
        "verified": [{"setting": s.label(), "proxy": p, "plain": r["plain"], "backpatched": r["backpatched"]}
                     for s, p, r in verified],
        "sweep": [{"setting": c.label(), "patch": asdict(c.setting) if c.setting else None, "alpha": c.alpha,
                   "no_harm": passes_no_harm(m, plain, max_harm),
                   **{k: m[k] for k in ("tdr", "afr", "other_rate", "audio_only_acc", "consistent_acc")}}
                  for c, m in results],
    }
    out.with_suffix(".sweep.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


def _with_patches(preset: Preset, patches: list[Patch], contrastive: Contrastive | None = None) -> Preset:
    return dataclasses.replace(preset, patches=list(patches), contrastive=contrastive)


def _candidate_preset(base: Preset, candidate: Candidate, null_audio: str) -> Preset:
    contrastive = Contrastive(alpha=candidate.alpha, null_audio=null_audio) if candidate.alpha else None
    return _with_patches(base, [candidate.setting.patch()] if candidate.setting else [], contrastive)


def _calibrated_preset(wrapped, model, candidate, report, data, name, n_settings, seconds, null_audio,
                       no_harm) -> Preset:
    before, after = report["plain"], report["backpatched"]
    metric_values = {}
    for key in ("tdr", "afr", "other_rate", "audio_only_acc", "consistent_acc"):
        for suffix, source in (("before", before), ("after", after)):
            if source[key] is not None:
                metric_values[f"{key}_{suffix}"] = float(source[key])
    metric_values["n_conflict"] = float(before["n_conflict"])
    config = model.config
    name_or_path = getattr(config, "_name_or_path", "") or ""
    glob = f"*{Path(name_or_path).parent.name}/{Path(name_or_path).name}*" if name_or_path else None
    base = wrapped.preset
    description = (
        f"Calibrated by `backpatch calibrate` on {Path(data).name} ({before['n_conflict']} conflicts): "
        f"{n_settings} settings (back-patching, contrastive decoding and both) scored by first answer token, "
        f"the best no-harm ones verified with full greedy "
        f"generate; chosen {candidate.label()}. TDR {before['tdr']} -> {after['tdr']}, audio-only "
        f"{before['audio_only_acc']} -> {after['audio_only_acc']}, consistent {before['consistent_acc']} -> "
        f"{after['consistent_acc']} (validation){'' if no_harm else '; WARNING: fails the no-harm rule'}. "
        f"Run time {seconds:.0f} s."
    )
    return Preset(
        name=name,
        description=description,
        match=base.match or Match(model_type=config.model_type, name_or_path=glob),
        model=ModelFacts(layers=wrapped.resolved.layers_path, num_layers=wrapped.resolved.num_layers),
        audio_span=base.audio_span or AudioSpan(token_id=wrapped.resolved.audio_token_id),
        patches=[candidate.setting.patch()] if candidate.setting else [],
        contrastive=Contrastive(alpha=candidate.alpha, null_audio=null_audio) if candidate.alpha else None,
        calibration=Calibration(status="calibrated", data=str(data), metrics=metric_values),
    )


def _plot_heatmap(results, best: Setting, num_layers: int, path: Path, plain: dict[str, Any]) -> None:
    """TDR (first-token sweep) over source x target for the chosen mode, scale and positions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = {(s.source, s.target): m["tdr"] for s, m in results
             if (s.mode, s.scale, s.positions) == (best.mode, best.scale, best.positions)}
    sources = sorted({s for s, _ in cells})
    targets = sorted({t for _, t in cells})
    grid = np.full((len(sources), len(targets)), np.nan)
    for (s, t), tdr in cells.items():
        if tdr is not None:
            grid[sources.index(s), targets.index(t)] = tdr
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 0.6 * len(targets)), max(2.5, 1.2 + 0.45 * len(sources))))
    image = ax.imshow(grid, cmap="viridis_r", vmin=0.0, vmax=1.0, aspect="auto")
    for i, j in itertools.product(range(len(sources)), range(len(targets))):
        if not np.isnan(grid[i, j]):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if grid[i, j] > 0.5 else "black")
    if best.source in sources and best.target in targets:
        ax.add_patch(plt.Rectangle((targets.index(best.target) - 0.5, sources.index(best.source) - 0.5), 1, 1,
                                   fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(len(targets)), targets)
    ax.set_yticks(range(len(sources)), sources)
    ax.set_xlabel("target layer")
    ax.set_ylabel("source layer")
    plain_tdr = "n/a" if plain["tdr"] is None else f"{plain['tdr']:.2f}"
    ax.set_title(f"TDR, {best.mode} x{best.scale:g} @{best.positions} (plain {plain_tdr}; {num_layers} layers)",
                 fontsize=9)
    fig.colorbar(image, ax=ax, label="TDR (first token)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
