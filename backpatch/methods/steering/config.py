"""The audio-silence steering setting."""

from __future__ import annotations

from dataclasses import dataclass

from ...validation import check_float, check_layer_range, join

__all__ = ["Steering"]

@dataclass
class Steering:
    """Audio-silence steering (arXiv 2603.06854; docs/design.md, "steering"): ``s`` = the last position's residual
    difference, audio minus null audio, averaged over decoder layers ``layers[0]..layers[1]`` (inclusive) at
    prefill; ``beta * s`` is added to the last decoder layer's output at the last position, at prefill and every
    decode step. The null-audio rows are the contrastive block's (``alpha`` may be 0: the rows then only feed the
    steering), so it costs no second call. ``beta: 0`` is bit-identical to no block."""

    layers: list[int]
    beta: float = 1.0

    def __post_init__(self) -> None:
        self._validate("steering", None)

    def __hash__(self) -> int:
        return hash((tuple(self.layers), self.beta))

    def _validate(self, where: str, origin: str | None) -> None:
        self.layers = check_layer_range(self.layers, join(where, "layers"), origin)
        self.beta = check_float(self.beta, join(where, "beta"), origin)
