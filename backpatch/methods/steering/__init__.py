"""Audio-silence steering: ``beta`` times the last position's residual difference, audio minus null audio (averaged
over layers ``a..b``), added to the last layer's output at every step. Its config, install (:mod:`.session`) and
registry entry live here; it reads the null-audio rows that contrastive decoding brings."""

from __future__ import annotations

import dataclasses
from typing import Any

from ...controls import Control
from ...registry import LayerSpace, Method, register_method
from ...validation import fail
from ..blocks import block_layers, middle_third
from .config import Steering
from .session import SteeringSession

#: the calibration's betas (the reimplementation's 0.5..1.5 and beyond, to 8: digits chose 4 when 4 was the edge),
#: on the middle third of the layers and on the second half
STEERING_BETAS = (0.5, 1.0, 2.0, 4.0, 8.0)

__all__ = ["METHOD", "STEERING_BETAS", "AudioSilenceSteering", "Steering", "SteeringSession"]


class AudioSilenceSteering(Method):
    key = "steering"
    title = "audio-silence steering"
    section_order = 3
    session_cls = SteeringSession
    config_cls = Steering
    order = 40  # last: it reads the answer's pass, after patches, and skips a patch's capture pass

    def acts(self, config: Any) -> bool:
        return config.beta != 0

    def needs_null_rows(self, config: Any) -> bool:
        return config.beta != 0

    def check(self, preset: Any, config: Any, origin: str | None) -> None:
        if preset.contrastive is None:
            raise fail("steering", "steering compares the residual with and without the audio, so it needs the "
                       "null-audio rows of a contrastive block; add `contrastive: {alpha: 0.0}` (rows for the "
                       "steering only)", origin)

    def resolve(self, config: Any, space: LayerSpace) -> Steering:
        return dataclasses.replace(config, layers=list(space.span(config.layers, "steering.layers")))

    def controls(self, config: Any, num_layers: int) -> list[Control]:
        layers = block_layers(config, num_layers)
        return [Control("steering_beta", "Audio-silence steering beta (0 = off)",
                        info=f"layers {layers[0]}..{layers[1]} (the preset's, else the middle third)")]

    def control_values(self, config: Any, num_layers: int) -> dict[str, Any]:
        return {"steering_beta": config.beta if config is not None else 0.0}

    def from_controls(self, values: dict[str, Any], base: Any, num_layers: int) -> Steering | None:
        if values["steering_beta"] == 0:
            return None
        return Steering(layers=block_layers(base, num_layers), beta=values["steering_beta"])

    def calibration_grid(self, num_layers: int) -> list[Steering]:
        third = middle_third(num_layers)
        late = [num_layers // 2, num_layers - 1]
        return [Steering(layers=layers, beta=beta) for layers in (third, late) for beta in STEERING_BETAS]

    def label(self, config: Any) -> str:
        return f"steering b={config.beta:g}"

    def details(self, config: Any) -> list[str]:
        return [f"steering {config.layers[0]}..{config.layers[1]} beta {config.beta:g}"]

    def summary(self, config: Any) -> str:
        return f"audio-silence steering β {config.beta:g}"


METHOD = register_method(AudioSilenceSteering())
