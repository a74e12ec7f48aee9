"""Calibration figures: the heatmap of the chosen mode, and the band figure (where back-patching works)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from .grid import Setting


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


def _plot_band(results, num_layers: int, path: Path, plain: dict[str, Any], max_harm: float) -> None:
    """Where back-patching works: per mode and positions, the lowest no-harm TDR over the scales tried at each
    (source, target) cell; cells where every scale harms are marked with a cross, cells not tried are blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .search import passes_no_harm

    panels = sorted({(s.mode, s.positions) for s, _ in results}, key=lambda mp: (mp[1], mp[0]))
    if not panels:
        return
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.0 * rows), squeeze=False, layout="constrained")
    image = None
    for ax, (mode, positions) in zip(axes.flat, panels, strict=False):
        best = np.full((num_layers, num_layers), np.nan)
        harmed = np.zeros((num_layers, num_layers), bool)
        for s, m in results:
            if (s.mode, s.positions) != (mode, positions) or m["tdr"] is None:
                continue
            if passes_no_harm(m, plain, max_harm):
                best[s.source, s.target] = np.nanmin([best[s.source, s.target], m["tdr"]])
            else:
                harmed[s.source, s.target] = True
        image = ax.imshow(best, cmap="viridis_r", vmin=0.0, vmax=1.0, origin="lower", aspect="auto")
        ys, xs = np.nonzero(harmed & np.isnan(best))
        ax.scatter(xs, ys, marker="x", s=14, color="crimson", linewidths=1.0)
        ax.plot([0, num_layers - 1], [0, num_layers - 1], color="grey", linewidth=0.6)
        ax.set_title(f"{mode} @{positions}", fontsize=9)
        ax.set_xlabel("target layer")
        ax.set_ylabel("source layer")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    plain_tdr = "n/a" if plain["tdr"] is None else f"{plain['tdr']:.2f}"
    fig.suptitle(f"No-harm TDR (first token; best scale per cell; x = every scale harms). Plain TDR {plain_tdr}",
                 fontsize=10)
    fig.colorbar(image, ax=axes, label="TDR", shrink=0.8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
