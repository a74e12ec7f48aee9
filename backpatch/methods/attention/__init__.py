"""Attention to audio (MATA): in decoder layers ``a..b`` the last query row's raw scores toward the audio keys are
scaled or raised, at prefill and every decode step. Its config, install (:mod:`.session`: a mask bias through
attention functions registered with transformers) and registry entry live here."""

from __future__ import annotations

import dataclasses
from typing import Any

from ...controls import Control
from ...registry import LayerSpace, Method, register_method
from ..blocks import block_layers, middle_third
from .config import ATTENTION_FORMS, Attention
from .session import SUPPORTED_IMPLEMENTATIONS, AttentionSession, attention_module

#: the calibration's grid (form, alpha): MATA's alpha (its paper's 0.1 and larger; the additive form's e^alpha boost),
#: on MATA's intermediate layers (the middle third)
ATTENTION_GRID = (("scale", 0.1), ("scale", 0.3), ("scale", 1.0), ("add", 0.5), ("add", 1.0), ("add", 2.0))

__all__ = ["ATTENTION_FORMS", "ATTENTION_GRID", "METHOD", "SUPPORTED_IMPLEMENTATIONS", "Attention", "AttentionSession",
           "AttentionToAudio", "attention_module"]


class AttentionToAudio(Method):
    key = "attention"
    title = "attention to audio"
    section_order = 2
    session_cls = AttentionSession
    config_cls = Attention
    order = 20  # after the contrastive rows are appended (it biases them as the model sees them), before patches

    def acts(self, config: Any) -> bool:
        return config.alpha > 0

    def resolve(self, config: Any, space: LayerSpace) -> Attention:
        return dataclasses.replace(config, layers=list(space.span(config.layers, "attention.layers")))

    def controls(self, config: Any, num_layers: int) -> list[Control]:
        layers = block_layers(config, num_layers)
        return [Control("attention_alpha", "Attention to audio alpha (MATA; 0 = off)", minimum=0.0,
                        info=f"layers {layers[0]}..{layers[1]} (the preset's, else the middle third)")]

    def control_values(self, config: Any, num_layers: int) -> dict[str, Any]:
        return {"attention_alpha": config.alpha if config is not None else 0.0}

    def from_controls(self, values: dict[str, Any], base: Any, num_layers: int) -> Attention | None:
        """The preset's layers and form are kept (else MATA's middle third, scaled)."""
        if values["attention_alpha"] == 0:
            return None
        return Attention(layers=block_layers(base, num_layers), alpha=values["attention_alpha"],
                         form=base.form if base is not None else "scale")

    def calibration_grid(self, num_layers: int) -> list[Attention]:
        third = middle_third(num_layers)
        return [Attention(layers=third, alpha=alpha, form=form) for form, alpha in ATTENTION_GRID]

    def label(self, config: Any) -> str:
        return f"attention a={config.alpha:g}"

    def details(self, config: Any) -> list[str]:
        return [f"attention to audio {config.layers[0]}..{config.layers[1]} {config.form} alpha {config.alpha:g}"]

    def summary(self, config: Any) -> str:
        return f"attention to audio α {config.alpha:g}"


METHOD = register_method(AttentionToAudio())
