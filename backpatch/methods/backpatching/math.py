"""Back-patching's math as pure functions of tensors, shared by every engine (Hugging Face hooks, the calibration's
short path, a serving engine): how a captured state is combined with the target layer's state (DESIGN section 1,
step 2), and a patch resolved to absolute layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ResolvedPatch", "combine", "gated"]

#: smallest norm a captured state is divided by when ``match_norm`` rescales it (a zero state stays zero)
_NORM_FLOOR = 1e-6


@dataclass(frozen=True)
class ResolvedPatch:
    """A patch with layer indices made non-negative for a concrete model."""

    source: int
    target: int
    scale: float
    mode: str
    positions: str
    match_norm: bool = False
    agreement: float | None = None


def combine(current: torch.Tensor, captured: torch.Tensor, patch: ResolvedPatch) -> torch.Tensor:
    """``add``: ``h + a H``; ``replace``: ``a H``; ``interpolate``: ``(1 - a) h + a H``; with ``match_norm``, ``H``
    first rescaled per position to the norm of ``h``."""
    if patch.match_norm:
        captured = captured * (current.norm(dim=-1, keepdim=True) / captured.norm(dim=-1, keepdim=True)
                               .clamp_min(_NORM_FLOOR))
    if patch.mode == "add":
        return current + patch.scale * captured
    if patch.mode == "replace":
        return patch.scale * captured
    return (1.0 - patch.scale) * current + patch.scale * captured  # interpolate


def gated(current: torch.Tensor, combined: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """The gated blend ``h + g (patched - h)`` per position (``strength`` broadcast over the hidden axis): ``g = 0``
    leaves ``h`` exactly as it was, ``g = 1`` is the full patch."""
    return current + strength * (combined - current)
