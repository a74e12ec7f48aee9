"""Audio-aware contrastive decoding (AAD, arXiv 2506.07233), KV-cached: one forward per step for both streams.

``logits = (1 + alpha) * l(y | audio, prompt) - alpha * l(y | null audio, prompt)`` cancels what the text alone
would predict. The public AAD code recomputes the null-audio stream over the whole sequence at every step; here
the null stream rides along as extra batch rows: a pre-hook on the text-generating module appends a copy of every
row with the audio features replaced by null audio (silence, or zeros), so the prefill fills one KV cache for
both streams and every decode step is one forward of 2B rows. A forward hook folds the 2B rows back into B
combined rows before ``generate`` sees them, so greedy, sampling, beam search and streamers work unchanged.
Beam search reorders the cache with B-row indices; the session maps them onto both halves. When the call ends
the cache is cut back to the B main rows (it may be returned to the user).

Combining in the forward hook rather than in a ``LogitsProcessor`` means every decoding strategy, and
``output_logits``, see the contrastive logits as the model's logits; processors then apply as usual.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ._architectures import Resolved
from ._engine import CallHooks
from .preset import Contrastive

__all__ = ["ContrastiveSession", "null_features", "silence_frame"]

_CACHE_KWARGS = ("cache", "past_key_values")
_NOT_BATCHED = frozenset({"cache_position", "logits_to_keep"})


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


def batch_dim(key: str, value: torch.Tensor) -> int | None:
    """The batch axis of a forward keyword tensor, or None when it has none."""
    if key in _NOT_BATCHED or value.dim() == 0:
        return None
    return 1 if key == "position_ids" and value.dim() == 3 else 0  # M-RoPE position ids are [3 or 4, B, T]


class ContrastiveSession:
    """Hooks for one contrastive ``generate()``/forward call; always removed by the caller's ``finally``."""

    def __init__(
        self,
        resolved: Resolved,
        config: Contrastive,
        silence: tuple[torch.Tensor, int] | None,
        hooks: CallHooks,
        gate: Any = None,
    ) -> None:
        if config.null_audio == "silence" and silence is None:
            raise ValueError("null_audio: silence needs the processor: wrap(model, preset, processor=processor)")
        self.resolved = resolved
        #: the call that owns these hooks: they act for it only (other threads' calls pass through)
        self._hooks = hooks
        self.config = config
        self.silence = silence
        self.rows: int | None = None
        #: forward calls of the generating module during this session (both streams batched: one per step)
        self.forward_calls = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._cache = None
        #: the preset's audio-confidence gate, or None (alpha at full strength on every row and step)
        self.gate = gate
        #: with a gate: its strength per row at the last position of every forward call (one [B] tensor per step)
        self.gate_steps: list[torch.Tensor] = []

    def install(self) -> None:
        generator = self.resolved.generator
        self._handles.append(self._hooks.forward_pre_hook(generator, self._double, with_kwargs=True))
        self._handles.append(self._hooks.forward_hook(generator, self._combine))

    def remove(self) -> None:
        """Remove the hooks and cut the cache back to the main rows (idempotent)."""
        while self._handles:
            self._handles.pop().remove()
        cache, self._cache = self._cache, None
        if cache is not None:
            if "reorder_cache" in vars(cache):
                del cache.reorder_cache
            if self.rows is not None and cache.get_seq_length() > 0:
                cache.reorder_cache(torch.arange(self.rows))  # keep only the main stream's rows

    # ---------------------------------------------------------------------------------------------- hooks
    def _null(self, key: str, value: torch.Tensor) -> torch.Tensor:
        return null_features(key, value, self.config.null_audio, self.silence)

    def _double(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            kwargs = {"input_ids": args[0], **kwargs}
            args = ()
        input_ids = kwargs.get("input_ids")
        reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if reference is None:
            raise ValueError("contrastive decoding needs input_ids or inputs_embeds")
        if self.rows is None:
            self.rows = reference.shape[0]
            self._adopt_cache(kwargs)
        elif reference.shape[0] != self.rows:
            raise RuntimeError(f"contrastive decoding: batch changed from {self.rows} to {reference.shape[0]} rows")
        self.forward_calls += 1
        doubled = {}
        for key, value in kwargs.items():
            dim = batch_dim(key, value) if isinstance(value, torch.Tensor) else None
            if dim is None:
                doubled[key] = value
                continue
            other = self._null(key, value) if key in self.resolved.audio_feature_keys else value
            doubled[key] = torch.cat([value, other], dim=dim)
        return args, doubled

    def _adopt_cache(self, kwargs: dict) -> None:
        cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
        if cache is None or not hasattr(cache, "reorder_cache"):
            return
        self._cache = cache
        rows = self.rows
        original = type(cache).reorder_cache

        def reorder_both_streams(beam_idx: torch.LongTensor) -> None:
            beam_idx = beam_idx.to(torch.long)
            original(cache, torch.cat([beam_idx, beam_idx + rows]))

        cache.reorder_cache = reorder_both_streams

    def _combine(self, module: nn.Module, args: tuple, output: Any) -> Any:
        rows, alpha = self.rows, self.config.alpha
        logits = output.logits
        main, null = logits[:rows], logits[rows:]
        if self.gate is None:
            combined = (1.0 + alpha) * main - alpha * null
        else:  # alpha per row and position: g * alpha, g measured on this step's two distributions
            from ._gate import gate_strength

            strength = gate_strength(self.gate, main, null)
            self.gate_steps.append(strength[:, -1].detach().cpu())
            scaled = (alpha * strength).to(main.dtype).unsqueeze(-1)
            combined = (1.0 + scaled) * main - scaled * null
        if self.config.plausibility is not None:
            probs = main.float().softmax(dim=-1)
            cut = probs < self.config.plausibility * probs.amax(dim=-1, keepdim=True)
            combined = combined.masked_fill(cut, torch.finfo(combined.dtype).min)
        for field in _output_fields(output):
            value = output[field]
            if field == "logits":
                output[field] = combined
            elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 2 * rows:
                output[field] = value[:rows]
            elif isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
                output[field] = tuple(v[:rows] if v.dim() > 0 and v.shape[0] == 2 * rows else v for v in value)
        return output


def _output_fields(output: Any) -> list[str]:
    if is_dataclass(output):
        return [f.name for f in fields(output) if getattr(output, f.name, None) is not None]
    return list(output.keys())
