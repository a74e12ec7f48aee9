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

import torch
from torch import nn

from ...engine import CACHE_KWARGS, Call, batch_dim
from ..gate.math import gate_strength
from .config import Contrastive
from .math import contrastive_logits, null_features

__all__ = ["ContrastiveSession"]


class ContrastiveSession:
    """Hooks for one contrastive ``generate()``/forward call; always removed by the caller's ``finally``."""

    def __init__(self, call: Call, config: Contrastive) -> None:
        silence = call.resources.get("contrastive")
        resolved, hooks, gate = call.resolved, call.hooks, call.setting("gate")
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
        cache = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
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
        strength = None
        if self.gate is not None:  # alpha per row and position: g * alpha, g measured on this step's two distributions
            strength = gate_strength(self.gate, main, null)
            self.gate_steps.append(strength[:, -1].detach().cpu())
        combined = contrastive_logits(main, null, alpha, strength, self.config.plausibility, self.config.agreement)
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
