"""The audio-confidence gate's setting: how strongly the other methods act, per row and step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...validation import check_choice, check_float, fail, join

__all__ = ["GATE_SIGNALS", "Gate", "gate_label"]

GATE_SIGNALS = ("audio_gap", "certainty")


@dataclass
class Gate:
    """Audio-confidence gate: every mitigation in the preset acts per row (and per step) in proportion to how much
    the audio supports the answer (README, "Audio-confidence gate"; design notes in docs/design.md).

    ``signal`` is measured on the unpatched first-token distribution for the patches (one value per row, before
    the patched prefill) and on each step's distributions for contrastive decoding:

    - ``audio_gap``: total variation distance between ``p(y | audio, prompt)`` and ``p(y | null audio, prompt)``,
      in [0, 1]: how far the audio moves the answer from what the prompt alone predicts. Needs the null-audio rows
      of a ``contrastive`` block (its ``alpha`` may be 0: the rows then only feed the gate).
    - ``certainty``: ``exp(-entropy)`` of ``p(y | audio, prompt)``, in (0, 1]: how sure the audio-conditioned
      model is.

    The strength is ``clip((signal - low) / (high - low), 0, 1)`` (a step at ``low`` when ``low == high``): patch
    states become ``h + g * (patched - h)``, contrastive alpha becomes ``g * alpha``. No gate block: every
    mitigation at full strength, bit-identical to a preset without the key.
    """

    signal: str = "audio_gap"
    low: float = 0.1
    high: float = 0.3

    def __post_init__(self) -> None:
        self._validate("gate", None)

    def __hash__(self) -> int:  # calibration keeps candidates (which may carry a gate) in sets and dict keys
        return hash((self.signal, self.low, self.high))

    def _validate(self, where: str, origin: str | None) -> None:
        check_choice(self.signal, GATE_SIGNALS, join(where, "signal"), origin)
        for key in ("low", "high"):
            value = check_float(getattr(self, key), join(where, key), origin)
            if not 0.0 <= value <= 1.0:
                raise fail(join(where, key), f"must be in [0, 1] (the signal's range), got {value}", origin)
            setattr(self, key, value)
        if self.low > self.high:
            raise fail(join(where, "low"), f"low ({self.low}) must not exceed high ({self.high})", origin)

    def strength(self, signal: Any) -> Any:
        """The gate value for a signal (a float or a tensor): 0 below ``low``, 1 from ``high`` on, linear between."""
        if self.high == self.low:
            return (signal >= self.low) * 1.0
        ramp = (signal - self.low) / (self.high - self.low)
        return ramp.clamp(0.0, 1.0) if hasattr(ramp, "clamp") else min(1.0, max(0.0, ramp))




def gate_label(gate: Any) -> str:
    """``gate audio_gap >= 0.2`` (a step) or ``gate certainty 0.3..0.7`` (a ramp): one line, like patch_label."""
    if gate.low == gate.high:
        return f"gate {gate.signal} >= {gate.low:g}"
    return f"gate {gate.signal} {gate.low:g}..{gate.high:g}"
