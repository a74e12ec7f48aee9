"""The figures of ``backpatch diagnose``: probes, logit lens, convergence and attention share per layer (solid:
plain, dotted: with the preset), drawn from the assembled report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _series(layers: list[dict], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else r[key] for r in layers], dtype=float)


def _plot(report: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    x = np.arange(len(layers))
    patched = report["preset"] is not None
    chance = report["summary"]["chance_audio_conflict"]
    figures = []

    def finish(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        figures.append(name)

    def with_preset_note(ax, **kwargs):
        if patched:
            ax.plot([], [], ":", color="black", label="dotted: with preset")
        ax.legend(**kwargs)

    def curve(ax, key, label, color, style="-", marker="o"):
        ax.plot(x, _series(layers, key), style, color=color, marker=marker, ms=3, label=label)
        if patched and f"{key}_patched" in layers[0]:
            ax.plot(x, _series(layers, f"{key}_patched"), ":", color=color, marker=marker, ms=2, alpha=0.8)

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, prefix, title in ((axes[0], "probe_audio", "last prompt position"),
                              (axes[1], "probe_audio_span", "mean of audio positions")):
        curve(ax, f"{prefix}_conflict", "audio answer | conflict", "C3")
        curve(ax, f"{prefix}_audio_only", "audio answer | audio-only", "C0")
        curve(ax, f"{prefix}_consistent", "audio answer | consistent", "C2")
        if prefix == "probe_audio":
            curve(ax, "probe_text_conflict", "text answer | conflict", "C7", "--", "s")
        if chance is not None:
            ax.axhline(chance, color="grey", lw=0.8, ls="--", label="chance")
        ax.set_title(f"probe accuracy, {title}", fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("cross-validated accuracy")
    with_preset_note(axes[0], fontsize=7, loc="lower right")
    finish(fig, "probes.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    curve(axes[0], "lens_audio_prob", "audio answer", "C0")
    curve(axes[0], "lens_text_prob", "text answer", "C3")
    curve(axes[0], "lens_audio_prob_audio_only", "audio answer, audio-only prompt", "C2", "--", "s")
    axes[0].set_ylabel("mean probability")
    axes[0].set_ylim(0, 1.02)
    curve(axes[1], "lens_audio_rank", "audio answer", "C0")
    curve(axes[1], "lens_text_rank", "text answer", "C3")
    axes[1].set_yscale("log")
    ticks = [t for t in (1, 2, 3, 5, 10, 20, 50, 100, 1000, 10000) if t <= max(2.0, np.nanmax(
        _series(layers, "lens_audio_rank")) * 1.5)]
    axes[1].set_yticks(ticks, [str(t) for t in ticks])
    axes[1].invert_yaxis()
    axes[1].set_ylabel("mean rank (1 = top), conflict items")
    takeover = report["summary"]["text_takeover_layer"]
    for ax in axes:
        ax.set_xlabel("layer")
        if takeover is not None:
            ax.axvline(takeover, color="grey", lw=0.8, ls="--")
    axes[0].set_title("logit lens at the last prompt position" + (f" (text ahead from layer {takeover})"
                                                                  if takeover is not None else ""), fontsize=10)
    with_preset_note(axes[0], fontsize=7, loc="center right")
    finish(fig, "logit_lens.png")

    fig, ax = plt.subplots(figsize=(9.5, 3.8))
    curve(ax, "convergence", "cosine, same digit", "C4")
    curve(ax, "convergence_baseline", "cosine, different digits", "C7", "--", "s")
    curve(ax, "convergence_nc_acc", "nearest text class mean accuracy", "C1", "-", "^")
    curve(ax, "convergence_cka", "linear CKA of class means", "C9", "-.", "d")
    curve(ax, "convergence_answer", "cosine at the answer position\n(audio-only by audio vs conflict by text)", "C5",
          "--", "v")
    ax.set_xlabel("layer")
    ax.set_title("audio vs text representation of the same digit", fontsize=10)
    # cosines can be well below zero (smol-whisper's answer position: -0.52): never clip a curve
    values = [row[key] for row in report["layers"] for key in row if key.startswith("convergence")
              and isinstance(row[key], (int, float)) and not isinstance(row[key], bool)]
    ax.set_ylim(min([-0.3, *values]) - 0.05, 1.02)
    with_preset_note(ax, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    finish(fig, "convergence.png")

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    curve(ax, "attn_audio", "to audio span | conflict", "C0")
    curve(ax, "attn_text", "to claim word | conflict", "C3")
    curve(ax, "attn_audio_audio_only", "to audio span | audio-only", "C2", "--", "s")
    ax.set_xlabel("layer")
    ax.set_ylabel("attention mass from last prompt position")
    ax.set_title("attention share (mean over heads)", fontsize=10)
    ax.set_ylim(0, 1.02)
    with_preset_note(ax, fontsize=7)
    finish(fig, "attention.png")
    return figures
