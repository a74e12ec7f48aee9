"""The LM-head readout of a hidden state, written once: final norm (where asked), output embeddings, and the
final logit soft-cap some families apply after the head (Gemma). The gate reads the answer distribution with it,
the calibration's short path and the logit lens of ``diagnose`` read layer states with it; a copy without the
soft-cap would give other logits than the model on Gemma."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["final_norm", "readout", "soft_cap"]

#: attribute names of the norm a text model applies after its last decoder layer
_FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm")


def final_norm(text_model: nn.Module) -> nn.Module | None:
    """The text model's norm after the last decoder layer, or None where it has none that backpatch can find."""
    for name in _FINAL_NORM_NAMES:
        module = getattr(text_model, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def soft_cap(generator: nn.Module) -> float | None:
    """The final logit soft-cap of the generating model's text config (Gemma), or None."""
    config = getattr(generator, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "final_logit_softcapping", None) or None


def _device_of(module: nn.Module) -> torch.device | None:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else None


def readout(generator: nn.Module, hidden: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
    """Logits of ``hidden`` (``[..., H]``) as the model's head gives them: ``norm`` first when given (a layer's
    state through the final norm), then the output embeddings, then the soft-cap. Each step runs on its module's
    device (``device_map`` models)."""
    if norm is not None:
        device = _device_of(norm)
        hidden = norm(hidden.to(device) if device is not None else hidden)
    head = generator.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(generator).__name__} has no output embeddings to read hidden states out with")
    logits = head(hidden.to(head.weight.device))
    cap = soft_cap(generator)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
