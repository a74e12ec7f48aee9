"""The attention-to-audio setting (MATA)."""

from __future__ import annotations

from dataclasses import dataclass

from ...validation import check_choice, check_float, check_layer_range, fail, join

__all__ = ["ATTENTION_FORMS", "Attention"]

ATTENTION_FORMS = ("scale", "add")


@dataclass
class Attention:
    """Attention to audio (MATA, arXiv 2509.18816; docs/design.md, "attention"): in decoder layers
    ``layers[0]..layers[1]`` (inclusive), the raw attention scores of the last query row toward the audio keys are
    multiplied by ``1 + alpha`` (``form: scale``, the paper's formula) or raised by ``alpha`` (``form: add``:
    every audio key's weight times ``e^alpha`` before renormalising, whatever the score's sign), at prefill's
    last row and at every decode step; every head. ``alpha: 0`` is bit-identical to no block."""

    layers: list[int]
    alpha: float = 0.1
    form: str = "scale"

    def __post_init__(self) -> None:
        self._validate("attention", None)

    def __hash__(self) -> int:  # calibration candidates may carry one
        return hash((tuple(self.layers), self.alpha, self.form))

    def _validate(self, where: str, origin: str | None) -> None:
        self.layers = check_layer_range(self.layers, join(where, "layers"), origin)
        self.alpha = check_float(self.alpha, join(where, "alpha"), origin)
        if self.alpha < 0:
            raise fail(join(where, "alpha"), f"must be >= 0 (0 turns it off), got {self.alpha}", origin)
        check_choice(self.form, ATTENTION_FORMS, join(where, "form"), origin)
