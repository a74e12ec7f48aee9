"""The audio-confidence gate: not a mitigation of its own, it scales the others (patches and contrastive decoding)
per row and step by how much the audio supports the answer. Its config, math and registry entry live here; the
methods it scales read it from the call (``call.setting("gate")``)."""

from __future__ import annotations

from typing import Any

from ...controls import Control, ControlError
from ...registry import Method, register_method
from ...validation import PresetError, fail
from .config import GATE_SIGNALS, Gate, gate_label
from .math import gate_signal, gate_strength

__all__ = ["GATE_SIGNALS", "METHOD", "Gate", "GateMethod", "gate_label", "gate_signal", "gate_strength"]


class GateMethod(Method):
    key = "gate"
    title = "audio-confidence gate"
    section_order = 4
    config_cls = Gate
    standalone = False
    order = 0  # installs nothing: the methods it scales read it

    def check(self, preset: Any, config: Any, origin: str | None) -> None:
        if preset.attention is not None or preset.steering is not None:
            raise fail("gate", "the audio-confidence gate scales patches and contrastive decoding; it does not yet "
                       "act on attention or steering blocks: drop the gate or those blocks", origin)
        if config.signal == "audio_gap" and preset.contrastive is None:
            raise fail("gate.signal", "audio_gap compares the answer with and without the audio, so it needs the "
                       "null-audio rows of a contrastive block; add `contrastive: {alpha: 0.0}` (rows for the gate "
                       "only) or use signal: certainty", origin)

    def needs_null_rows(self, config: Any) -> bool:
        return config.signal == "audio_gap"

    def controls(self, config: Any, num_layers: int) -> list[Control]:
        return [Control("gate_on", "Audio-confidence gate on", "switch",
                        info="scales the patches and contrastive alpha by how much the audio supports the answer: "
                        "none below low, full from high on (a step when low = high)"),
                Control("gate_signal", "Gate signal", "choice", GATE_SIGNALS),
                Control("gate_low", "Gate low (0 to 1)"),
                Control("gate_high", "Gate high (0 to 1)")]

    def control_values(self, config: Any, num_layers: int) -> dict[str, Any]:
        """The preset's gate, else the schema's default thresholds, switched off."""
        gate = config or Gate()
        return {"gate_on": config is not None, "gate_signal": gate.signal, "gate_low": gate.low,
                "gate_high": gate.high}

    def from_controls(self, values: dict[str, Any], base: Any, num_layers: int) -> Gate | None:
        if not values["gate_on"]:
            return None
        try:
            return Gate(signal=values["gate_signal"], low=values["gate_low"], high=values["gate_high"])
        except PresetError as exc:
            raise ControlError(f"These gate controls do not make a valid gate: {exc}") from None

    def label(self, config: Any) -> str:
        return "gate"

    def details(self, config: Any) -> list[str]:
        return [gate_label(config)]

    def summary(self, config: Any) -> str:
        return f"audio-confidence {gate_label(config)}"


METHOD = register_method(GateMethod())
