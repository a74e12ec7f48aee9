"""Contrastive decoding's math as pure functions of tensors, shared by every engine: the null audio (silent or zero
features standing in for the clip) and the combine of the two streams' logits, with the gate's per-row strength and
the plausibility constraint (VCD/AAD's guard: only tokens the audio-conditioned distribution finds plausible stay
eligible) and the agreement guard (an answer the audio raised over the text-only stream is kept)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["agreement_signal", "contrastive_logits", "null_features", "silence_frame"]


def silence_frame(processor: Any) -> tuple[torch.Tensor, int]:
    """One frame of the feature extractor's output for a silent clip, and the number of mel bins.

    Log-mel extractors normalize per clip, so silence is one constant frame repeated: broadcasting it over a
    row's frames gives the features of a silent clip of the same length (same feature mask, same number of
    audio tokens).
    """
    extractor = getattr(processor, "feature_extractor", None)
    if extractor is None:
        raise ValueError("null_audio: silence needs a processor with a feature_extractor")
    rate = int(getattr(extractor, "sampling_rate", 16000))
    features = extractor(np.zeros(rate, dtype=np.float32), sampling_rate=rate, return_tensors="pt")
    tensor = next(v for v in features.values() if isinstance(v, torch.Tensor) and v.dim() == 3)
    bins = int(getattr(extractor, "feature_size", tensor.shape[1]))
    frame = tensor[0, :, 0] if tensor.shape[1] == bins else tensor[0, 0, :]
    return frame.float(), bins


def null_features(key: str, value: torch.Tensor, null_audio: str,
                  silence: tuple[torch.Tensor, int] | None) -> torch.Tensor:
    """Audio features ``value`` (forward keyword ``key``) replaced by null audio: zeros, or the silent frame."""
    if null_audio == "zeros":
        return torch.zeros_like(value)
    frame, bins = silence
    frame = frame.to(device=value.device, dtype=value.dtype)
    if value.dim() == 3 and value.shape[1] == bins:
        return frame[None, :, None].expand_as(value).clone()
    if value.dim() == 3 and value.shape[2] == bins:
        return frame[None, None, :].expand_as(value).clone()
    raise ValueError(f"cannot build silence for {key} of shape {tuple(value.shape)}: no axis has {bins} mel bins; "
                     "use null_audio: zeros")


def agreement_signal(main: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """``log p(m | audio) - log p(m | null audio)`` of the audio-conditioned top token ``m``, per row (and position):
    how far the audio raised the answer that the text alone gives. Positive where audio and text agree on it."""
    top = main.argmax(dim=-1, keepdim=True)
    gain = main.float().log_softmax(dim=-1).gather(-1, top) - null.float().log_softmax(dim=-1).gather(-1, top)
    return gain.squeeze(-1)


def contrastive_logits(main: torch.Tensor, null: torch.Tensor, alpha: float, strength: torch.Tensor | None = None,
                       plausibility: float | None = None, agreement: float | None = None) -> torch.Tensor:
    """``(1 + a) l(audio) - a l(null audio)``, with ``a = alpha`` or, gated, ``a = strength * alpha`` per row (and
    position: ``strength`` has the logits' shape less the vocabulary axis). ``plausibility``: tokens with
    ``p(y | audio) < plausibility * max p`` get the lowest logit. ``agreement``: rows whose
    :func:`agreement_signal` is at least this keep the audio-conditioned logits, so the contrastive term cannot
    overturn an answer that the audio raised over the text-only stream."""
    if strength is None:
        combined = (1.0 + alpha) * main - alpha * null
    else:
        scaled = (alpha * strength).to(main.dtype).unsqueeze(-1)
        combined = (1.0 + scaled) * main - scaled * null
    if plausibility is not None:
        probs = main.float().softmax(dim=-1)
        cut = probs < plausibility * probs.amax(dim=-1, keepdim=True)
        combined = combined.masked_fill(cut, torch.finfo(combined.dtype).min)
    if agreement is not None:
        keep = agreement_signal(main, null) >= agreement
        combined = torch.where(keep.unsqueeze(-1), main.to(combined.dtype), combined)
    return combined
