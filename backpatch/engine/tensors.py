"""Shapes and cache facts every method's hooks need: where a layer's hidden states are in its output, which axis of
a forward keyword is the batch, how long the KV cache already is. No method math lives here."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = [
    "CACHE_KWARGS",
    "LAYER_CACHE_KWARGS",
    "at",
    "batch_dim",
    "cache_is_static",
    "cache_length",
    "first_rows",
    "hidden_of",
    "outputs_not_recorded",
    "select",
    "with_hidden",
]

#: keyword names a text model may receive its KV cache under (transformers 5.x renamed past_key_values to cache)
CACHE_KWARGS = ("cache", "past_key_values")
#: ... and a decoder layer (older layers took it singular)
LAYER_CACHE_KWARGS = (*CACHE_KWARGS, "past_key_value")
#: forward keywords that carry no batch axis
_NOT_BATCHED = frozenset({"cache_position", "logits_to_keep"})


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden states of a decoder layer's output (a tensor, or the first element of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden states replaced (same container type)."""
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


def at(hidden: torch.Tensor, mask: torch.Tensor) -> tuple:
    """Index of the ``mask`` positions. Decoder states are ``[B, T, H]``; Gemma 3n's AltUp states are
    ``[K, B, T, H]`` and every stream is patched."""
    return (slice(None), mask) if hidden.dim() == 4 else (mask,)


def select(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """States at ``mask`` positions (of every AltUp stream)."""
    return hidden[at(hidden, mask)]


def batch_dim(key: str, value: torch.Tensor) -> int | None:
    """The batch axis of a forward keyword tensor, or None when it has none."""
    if key in _NOT_BATCHED or value.dim() == 0:
        return None
    return 1 if key == "position_ids" and value.dim() == 3 else 0  # M-RoPE position ids are [3 or 4, B, T]


def first_rows(key: str, value: Any, rows: int) -> Any:
    """``value`` cut to its first ``rows`` batch rows when it carries the doubled batch (main + null-audio rows)."""
    if isinstance(value, dict):  # masks some models prepare per attention type ({"full_attention": ...})
        return {k: first_rows(k, v, rows) for k, v in value.items()}
    if not isinstance(value, torch.Tensor):
        return value
    dim = batch_dim(key, value)
    if dim is None or value.shape[dim] != 2 * rows:
        return value
    return value.narrow(dim, 0, rows)


def cache_length(kwargs: dict[str, Any]) -> int:
    """Tokens already in the KV cache a forward call was given (0: a fresh prefill)."""
    for key in CACHE_KWARGS:
        cache = kwargs.get(key)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    return 0


def cache_is_static(kwargs: dict[str, Any]) -> bool:
    return any(getattr(kwargs.get(key), "is_compileable", False) for key in CACHE_KWARGS)


@contextmanager
def outputs_not_recorded() -> Iterator[None]:
    """Keep transformers' output recorders (``output_hidden_states``/``output_attentions``) out of layer calls that
    belong to no forward pass the user asked for (a capture pass)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - transformers without context-variable output capture
        yield
        return
    token = _active_collector.set(None)
    try:
        yield
    finally:
        _active_collector.reset(token)
