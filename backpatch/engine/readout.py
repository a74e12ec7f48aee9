"""The LM-head readout of a hidden state, written once: final norm (where asked), output embeddings, and the
final logit soft-cap some families apply after the head (Gemma). The gate reads the answer distribution with it,
the calibration's short path and the logit lens of ``diagnose`` read layer states with it; a copy without the
soft-cap would give other logits than the model on Gemma."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FINAL_COMBINES", "final_norm", "final_states", "readout", "soft_cap"]

#: attribute names of the norm a text model applies after its last decoder layer
_FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm")


def final_norm(text_model: nn.Module) -> nn.Module | None:
    """The text model's norm after the last decoder layer, or None where it has none that backpatch can find."""
    for name in _FINAL_NORM_NAMES:
        module = getattr(text_model, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def _altup_streams(text_model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Gemma 3n: its decoder layers carry ``K`` AltUp streams ``[K, B, T, H]``; after the last layer the text model
    projects streams 1..K-1 back, matches their magnitude to stream 0's and averages all K (as
    ``Gemma3nTextModel.forward`` does before its norm)."""
    first = hidden[0]
    target = torch.mean(first**2, dim=-1, keepdim=True) ** 0.5
    streams = [first]
    for i in range(1, hidden.shape[0]):
        projected = text_model.altup_unembed_projections[i - 1](hidden[i]).to(dtype=first.dtype,
                                                                              device=target.device)
        magnitude = torch.sqrt(torch.mean(projected**2, dim=-1, keepdim=True).clamp(min=1e-5))
        streams.append(projected * target / magnitude)
    return torch.mean(torch.stack(streams), dim=0)


#: name -> what a family's text model does between its last decoder layer and its final norm (the architecture
#: table names one per family in ``Architecture.final_combine``)
FINAL_COMBINES = {"altup": _altup_streams}


def final_states(text_model: nn.Module, hidden: torch.Tensor, combine: str | None = None) -> torch.Tensor:
    """The last decoder layer's output as the head sees it: the family's combine (``combine``), then the final
    norm: what a calibration's short path, which runs the last layers itself, must apply before :func:`readout`."""
    if combine is not None:
        hidden = FINAL_COMBINES[combine](text_model, hidden)
    norm = final_norm(text_model)
    return norm(hidden) if norm is not None else hidden


def soft_cap(generator: nn.Module) -> float | None:
    """The final logit soft-cap of the generating model's text config (Gemma), or None."""
    config = getattr(generator, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "final_logit_softcapping", None) or None


def _device_of(module: nn.Module) -> torch.device | None:
    """Where ``module`` computes: its first parameter that is not on the meta device (a disk-offloaded module of a
    ``device_map`` model holds meta parameters until accelerate's hook loads them); None to leave inputs be."""
    for parameter in module.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return None


def _to(hidden: torch.Tensor, module: nn.Module) -> torch.Tensor:
    device = _device_of(module)
    return hidden.to(device) if device is not None else hidden


def readout(generator: nn.Module, hidden: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
    """Logits of ``hidden`` (``[..., H]``) as the model's head gives them: ``norm`` first when given (a layer's
    state through the final norm), then the output embeddings, then the soft-cap. Each step runs on its module's
    device (``device_map`` models)."""
    if norm is not None:
        hidden = norm(_to(hidden, norm))
    head = generator.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(generator).__name__} has no output embeddings to read hidden states out with")
    logits = head(_to(hidden, head))
    cap = soft_cap(generator)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
