"""Attention to audio (MATA, arXiv 2509.18816): the preset's ``attention`` block (docs/design.md, "attention").

In decoder layers ``a..b``, the raw attention scores ``A = q k / sqrt(d)`` of the last query row toward the audio
keys become ``(1 + alpha) A`` (``form: scale``) or ``A + alpha`` (``form: add``), at prefill's last row and at every
decode step, in every head. Both are an additive bias on the scores of that row (``alpha A`` or ``alpha``), and an
additive float mask is what every attention implementation of transformers takes: eager adds it to its scores,
SDPA passes it as ``attn_mask``. So the bias rides in the mask and the model's own attention code does the rest.

How the bias gets there: transformers' attention modules look their function up at call time,
``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)``. backpatch
registers two functions of its own, ``backpatch_sdpa`` and ``backpatch_eager``; while a session is open, each target
layer's attention module gets a shallow copy of its config naming one of them (only that module: the shared
config, the encoders and the causal-mask code keep theirs). The function biases the mask for the call that owns
the session and calls the model's own implementation (transformers' SDPA, or the module file's eager function);
every other call (other threads, plain calls) passes straight through. The modules get their config back when the
call ends, whatever happens; weights are never touched.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...engine import BackpatchRuntimeError, Call, audio_mask, cache_is_static, cache_length
from ...validation import PresetError
from .config import Attention

__all__ = ["AttentionSession", "SUPPORTED_IMPLEMENTATIONS"]

#: attention implementations whose mask argument is an additive float mask (flash attention takes none)
SUPPORTED_IMPLEMENTATIONS = ("eager", "sdpa")

#: id(attention module) -> the session biasing it
_SESSIONS: dict[int, AttentionSession] = {}


def attention_module(layer: nn.Module, index: int) -> nn.Module:
    """The self-attention module of one decoder layer (``self_attn`` in every supported family)."""
    module = getattr(layer, "self_attn", None)
    if module is None:
        found = [m for name, m in layer.named_children() if type(m).__name__.endswith("Attention")]
        module = found[0] if len(found) == 1 else None
    if module is None or not hasattr(module, "config"):
        raise PresetError(f"attention.layers: decoder layer {index} ({type(layer).__name__}) has no self-attention "
                          "module that backpatch can find (expected .self_attn)")
    return module


def _module_eager(module: nn.Module) -> Callable:
    """The eager function of the module's own file (what ``get_interface('eager', default)`` gives it)."""
    function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if function is None:
        raise BackpatchRuntimeError(f"{type(module).__name__} runs eager attention without a module-level "
                                    "eager_attention_forward; the attention block cannot wrap it")
    return function


def _biasing(implementation: str) -> Callable:
    def backpatch_audio_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                  attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> Any:
        if implementation == "eager":
            original = _module_eager(module)
        else:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            original = ALL_ATTENTION_FUNCTIONS[implementation]
        session = _SESSIONS.get(id(module))
        if session is not None and session.hooks.acting():
            attention_mask = session.biased_mask(query, key, attention_mask, kwargs.get("scaling"))
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    return backpatch_audio_attention


def _register() -> None:
    """Register ``backpatch_sdpa`` and ``backpatch_eager`` with transformers (once per process)."""
    from transformers.modeling_utils import AttentionInterface

    for implementation in SUPPORTED_IMPLEMENTATIONS:
        if f"backpatch_{implementation}" not in AttentionInterface._global_mapping:
            AttentionInterface.register(f"backpatch_{implementation}", _biasing(implementation))


def _repeat_kv(key: torch.Tensor, heads: int) -> torch.Tensor:
    rows, kv_heads, length, dim = key.shape
    if kv_heads == heads:
        return key
    return key[:, :, None].expand(rows, kv_heads, heads // kv_heads, length, dim).reshape(rows, heads, length, dim)


class AttentionSession:
    """The attention block's registry wrapper and generator hook for one call; always removed by the caller."""

    def __init__(self, call: Call, block: Attention) -> None:
        resolved, hooks = call.resolved, call.hooks
        first, last = block.layers  # absolute: resolved for this model
        self.resolved = resolved
        self.block = block
        self.hooks = hooks
        self.modules = [attention_module(resolved.layers[i], i) for i in range(first, last + 1)]
        self.implementation = self.modules[0].config._attn_implementation or "eager"
        if self.implementation not in SUPPORTED_IMPLEMENTATIONS:
            raise PresetError(f"attention: the block biases the attention mask, which {self.implementation!r} "
                              "attention does not take; load the model with attn_implementation='sdpa' or 'eager'")
        #: [B, T] audio key positions of the prefill, and how many keys the current forward call should see
        self.audio: torch.Tensor | None = None
        self.keys = 0
        #: attention calls this session biased (one per target layer per forward pass): a deterministic count
        self.biased_calls = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        #: (module, its own config) for the modules whose config this session replaced
        self._configs: list[tuple[nn.Module, Any]] = []

    def install(self) -> None:
        _register()
        self._handles.append(self.hooks.forward_pre_hook(self.resolved.generator, self._on_generator_call,
                                                         with_kwargs=True))
        for module in self.modules:
            own = module.config
            routed = copy.copy(own)
            routed._attn_implementation_internal = f"backpatch_{self.implementation}"  # this module only
            self._configs.append((module, own))
            module.config = routed
            _SESSIONS[id(module)] = self

    def remove(self) -> None:
        """Remove the hook and give the modules their own config back (idempotent)."""
        while self._handles:
            self._handles.pop().remove()
        while self._configs:
            module, own = self._configs.pop()
            module.config = own
            if _SESSIONS.get(id(module)) is self:
                del _SESSIONS[id(module)]

    # --------------------------------------------------------------------------------------------- hooks
    def _on_generator_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise BackpatchRuntimeError("the attention block finds the audio keys from input_ids, but this call has "
                                        "none (inputs_embeds only?); pass input_ids as produced by the processor")
        if self.audio is None:
            if cache_length(kwargs) > 0:
                raise BackpatchRuntimeError("the attention block needs a fresh prefill, but this call continues a "
                                            "non-empty KV cache")
            if cache_is_static(kwargs):
                raise BackpatchRuntimeError("the attention block does not support static (compileable) caches; use "
                                            "the default dynamic cache")
            self.audio = audio_mask(input_ids, self.resolved.audio_token_id)
        self.keys += input_ids.shape[1]

    def _audio_columns(self, rows: int, keys: int, device: torch.device) -> torch.Tensor:
        audio = self.audio.to(device)
        batch = audio.shape[0]
        if rows != batch:
            if max(rows, batch) % min(rows, batch):
                raise BackpatchRuntimeError(f"the attention block saw {rows} rows for a batch of {batch}")
            # more rows: contrastive null rows (the same input_ids) appended after the main rows; fewer: a patch's
            # capture pass, which runs the main rows only after a prefill that set the mask with both
            audio = audio.repeat(rows // batch, 1) if rows > batch else audio[:rows]
        if keys > self.keys:
            raise BackpatchRuntimeError(f"the attention block expected at most {self.keys} keys and got {keys} (a "
                                        "static or pre-filled cache?); use the default dynamic cache")
        # a sliding-window layer's cache keeps only the latest positions: key j is position (self.keys - keys + j)
        positions = torch.arange(self.keys - keys, self.keys, device=device)
        prompt = positions < audio.shape[1]
        columns = torch.zeros(rows, keys, dtype=torch.bool, device=device)
        columns[:, prompt] = audio[:, positions[prompt]]
        return columns

    def biased_mask(self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                    scaling: float | None) -> torch.Tensor:
        """The layer's additive mask plus the bias on the last query row's audio columns, ``[R, H, Q, K]``."""
        rows, heads, queries, dim = query.shape
        keys = key.shape[-2]
        dtype, device = query.dtype, query.device
        lowest = torch.finfo(dtype).min
        if attention_mask is None:  # SDPA's is_causal path: the causal mask, written out
            position = torch.arange(queries, device=device)[:, None] + (keys - queries)
            base = torch.where(torch.arange(keys, device=device)[None] <= position, 0.0, lowest).to(dtype)[None, None]
        elif attention_mask.dtype == torch.bool:
            base = torch.zeros((), dtype=dtype, device=device).masked_fill(~attention_mask[..., :keys], lowest)
        else:
            base = attention_mask[..., :keys].to(dtype)
        columns = self._audio_columns(rows, keys, device)
        alpha = self.block.alpha
        if self.block.form == "add":
            last = alpha * columns[:, None, :].to(torch.float32)
        else:
            scale = scaling if scaling is not None else dim**-0.5
            scores = torch.einsum("rhd,rhkd->rhk", query[:, :, -1].float(), _repeat_kv(key, heads).float()) * scale
            last = alpha * scores * columns[:, None, :]
        bias = torch.zeros(rows, heads, queries, keys, dtype=dtype, device=device)
        bias[:, :, -1, :] = last.to(dtype)
        self.biased_calls += 1
        return base + bias
