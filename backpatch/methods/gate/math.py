"""The audio-confidence gate's math as pure functions of logits (the preset's ``gate`` block; docs/design.md).

Why a gate: back-patching and contrastive decoding push every answer toward the audio pathway. Where the model
hears the audio well that undoes text dominance; where it hears it poorly (unfamiliar voices, noise, natural
speech) the push turns correct answers into audio guesses. The gate measures, per row, how much the audio
supports the answer, from distributions the engine computes anyway, and scales each mitigation by it.
"""

from __future__ import annotations

import torch

from .config import Gate

__all__ = ["gate_signal", "gate_strength"]


def gate_signal(signal: str, main_logits: torch.Tensor, null_logits: torch.Tensor | None) -> torch.Tensor:
    """The signal over the last axis (the vocabulary) of ``[..., V]`` logits: one value per row (and position).

    ``audio_gap``: total variation distance between the audio-conditioned and the null-audio distribution, in [0, 1].
    ``certainty``: ``exp(-entropy)`` of the audio-conditioned distribution, in (0, 1] (1: one token has all mass).
    """
    log_p = main_logits.float().log_softmax(dim=-1)
    if signal == "certainty":
        return torch.exp((log_p.exp() * log_p).sum(dim=-1))
    if null_logits is None:
        raise ValueError("the audio_gap gate needs the null-audio logits (a contrastive block)")
    return 0.5 * (log_p.exp() - null_logits.float().softmax(dim=-1)).abs().sum(dim=-1)


def gate_strength(gate: Gate, main_logits: torch.Tensor, null_logits: torch.Tensor | None) -> torch.Tensor:
    """The gate value in [0, 1] per row (and position) for these logits (``Gate.strength`` of the signal)."""
    return gate.strength(gate_signal(gate.signal, main_logits, null_logits))
