"""The back-patching engine: prefill-only hooks that capture late states and route them into early layers.

One :class:`PatchSession` serves one forward pass of the text-generating module: the prefill of a
``generate()`` call, or one plain forward call. Its hooks are removed the moment the prefill is over, so decode
steps run on an unhooked model. A pre-hook on the generating module reads ``input_ids`` of the prefill and
computes the position masks (after ``generate`` has expanded the batch for beams or ``num_return_sequences``);
a pre-hook on the text model (the parent of the decoder ``ModuleList``) then arms one of two paths, and a
forward hook on the text model removes everything when the prefill returns.

**Short path** (the physical limit, DESIGN section 1: the capture pass and the patched prefill agree up to the
output of the earliest target layer ``t_min``). Layers ``0..t_min`` run once, in the real prefill, and fill
the KV cache that decoding uses. A forward hook on ``L[t_min]`` takes its output and runs the **capture** of
layers ``t_min+1 .. s_max`` itself, calling those layers directly with the arguments the model gave
``L[t_min]`` (recorded by a pre-hook) but without a KV cache; then it patches the ``t_min`` output and hands it
back, and the model continues the prefill from the patched state (later targets have their own hooks).
Decoder-layer calls: plain + ``(s_max - t_min)``. It needs a loop that gives every layer the same arguments
(:attr:`~backpatch._architectures.Architecture.short_path`, checked per call against ``config.layer_types``
and per-layer inputs).

**Two-pass path** (every other family or call). The text-model pre-hook receives the input embeddings, with
the audio features already merged, and runs the capture pass: the same text model, unpatched, without a KV
cache, stopped by an exception right after the deepest source layer; forward hooks on the target layers then
patch the real prefill. Decoder-layer calls: plain + ``(s_max + 1)``. Where the text model merges the audio
itself (it gets ``input_ids``, as in Phi-4-multimodal), the capture waits for the merged embeddings at the
first decoder layer's input and re-enters from there.

On both paths the audio encoder runs once per call: the capture starts from the text model's input or from a
layer's output, never from the top model.

Module hooks are global to the module, so every hook is owned by one call (:class:`CallHooks`): it acts only
while that call is the current one of the running thread, and passes through untouched for any other call, be it
a plain ``generate()`` in another thread, a raw forward from a thread that never used backpatch, or a
``disabled()`` call nested in a patched one (:func:`plain_call`). Everything a hook keeps (masks, captured
states) lives on its session, one per call. A per-model lock still runs one patched call per model at a time
(:func:`model_lock`); it also serializes ``apply()`` blocks and ``unwrap()`` with the calls in flight.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from ._architectures import Resolved, ResolvedPatch
from ._positions import position_masks

__all__ = [
    "BackpatchRuntimeError",
    "CallHooks",
    "PatchSession",
    "generation_session",
    "model_lock",
    "patch_session",
    "plain_call",
]

# Keyword names a text model may receive its KV cache under (transformers 5.x renamed past_key_values to cache).
_CACHE_KWARGS = ("cache", "past_key_values")
# ... and a decoder layer (older layers took it singular).
_LAYER_CACHE_KWARGS = (*_CACHE_KWARGS, "past_key_value")


class BackpatchRuntimeError(RuntimeError):
    """A call that back-patching cannot serve as asked (e.g. no ``input_ids``, a pre-filled cache)."""


class _StopCapture(Exception):
    """Raised after the deepest source layer to end the capture pass early (no later layers, no LM head).

    It carries the session that raised it, and only that session's capture pass catches it."""

    def __init__(self, session: PatchSession) -> None:
        super().__init__("backpatch capture pass stopped")
        self.session = session


# ------------------------------------------------------------------------------------------- call ownership
class _CurrentCall(threading.local):
    #: the :class:`CallHooks` of the back-patched call running in this thread (None: no call, or a plain one)
    hooks: CallHooks | None = None


_CURRENT = _CurrentCall()


@contextmanager
def _current(hooks: CallHooks | None) -> Iterator[None]:
    previous = _CURRENT.hooks
    _CURRENT.hooks = hooks
    try:
        yield
    finally:
        _CURRENT.hooks = previous


@contextmanager
def plain_call() -> Iterator[None]:
    """Inside, no backpatch hook acts in this thread: a plain call nested in a back-patched one stays plain."""
    with _current(None):
        yield


class CallHooks:
    """Every hook of one back-patched call, owned by it (the steering-vectors handle pattern).

    A hook registered here runs its function only while this call is the current call of the running thread
    and is not closed; for every other call (other threads, plain calls nested in this one) it returns None
    and changes nothing. :meth:`close` removes every hook registered here and nothing else; it is idempotent.
    """

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.closed = False

    def acting(self) -> bool:
        """True in the thread and call that own these hooks, while they are installed."""
        return _CURRENT.hooks is self and not self.closed

    def forward_hook(self, module: nn.Module, fn: Any) -> torch.utils.hooks.RemovableHandle:
        return self._register(module.register_forward_hook, fn, {})

    def forward_pre_hook(
        self, module: nn.Module, fn: Any, with_kwargs: bool = False
    ) -> torch.utils.hooks.RemovableHandle:
        return self._register(module.register_forward_pre_hook, fn, {"with_kwargs": with_kwargs})

    def _register(self, register: Any, fn: Any, options: dict) -> torch.utils.hooks.RemovableHandle:
        if self.closed:
            raise BackpatchRuntimeError("backpatch: a hook was registered after its call ended; please report this")

        def owned(module: nn.Module, *rest: Any) -> Any:
            # *rest: another thread may see this hook while it is being removed, when torch has already
            # forgotten that it takes kwargs; the check comes first, so that call just passes through.
            if not self.acting():
                return None
            return fn(module, *rest)

        handle = register(owned, **options)
        self._handles.append(handle)
        return handle

    def close(self) -> None:
        self.closed = True
        while self._handles:
            self._handles.pop().remove()


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


def _at(hidden: torch.Tensor, mask: torch.Tensor) -> tuple:
    """Index of the ``mask`` positions. Decoder states are ``[B, T, H]``; Gemma 3n's AltUp states are
    ``[K, B, T, H]`` and every stream is patched."""
    return (slice(None), mask) if hidden.dim() == 4 else (mask,)


def _select(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """States at ``mask`` positions (of every AltUp stream)."""
    return hidden[_at(hidden, mask)]


def _first_rows(key: str, value: Any, rows: int) -> Any:
    """``value`` cut to its first ``rows`` batch rows when it carries the doubled batch (else unchanged)."""
    from ._contrastive import batch_dim

    if isinstance(value, dict):  # masks some models prepare per attention type ({"full_attention": ...})
        return {k: _first_rows(k, v, rows) for k, v in value.items()}
    if not isinstance(value, torch.Tensor):
        return value
    dim = batch_dim(key, value)
    if dim is None or value.shape[dim] != 2 * rows:
        return value
    return value.narrow(dim, 0, rows)


#: smallest norm a captured state is divided by when ``match_norm`` rescales it (a zero state stays zero)
_NORM_FLOOR = 1e-6


def _combine(current: torch.Tensor, captured: torch.Tensor, patch: ResolvedPatch) -> torch.Tensor:
    if patch.match_norm:
        captured = captured * (current.norm(dim=-1, keepdim=True) / captured.norm(dim=-1, keepdim=True)
                               .clamp_min(_NORM_FLOOR))
    if patch.mode == "add":
        return current + patch.scale * captured
    if patch.mode == "replace":
        return patch.scale * captured
    return (1.0 - patch.scale) * current + patch.scale * captured  # interpolate


@contextmanager
def _outputs_not_recorded() -> Iterator[None]:
    """Keep transformers' output recorders (``output_hidden_states``/``output_attentions``) out of the layer
    calls of a short-path capture: they belong to no forward pass the user asked for."""
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


def _cache_length(kwargs: dict[str, Any]) -> int:
    for key in _CACHE_KWARGS:
        cache = kwargs.get(key)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    return 0


def _cache_is_static(kwargs: dict[str, Any]) -> bool:
    return any(getattr(kwargs.get(key), "is_compileable", False) for key in _CACHE_KWARGS)


class PatchSession:
    """Hooks for one patched prefill; always used through :func:`generation_session`, which removes them."""

    def __init__(
        self,
        resolved: Resolved,
        precaptured: dict[tuple[int, str], torch.Tensor] | None = None,
        doubled: bool = False,
        *,
        hooks: CallHooks,
        gate: Any = None,
        gate_values: torch.Tensor | None = None,
    ) -> None:
        self.resolved = resolved
        #: the call that owns this session's hooks: they act for it only (see :class:`CallHooks`)
        self._hooks = hooks
        #: contrastive decoding appends a null-audio copy of every row: only the first half is patched
        self._doubled = doubled
        #: source states already captured for this exact batch, keyed by (source layer, positions): a sweep over
        #: targets and scales (calibration) then skips the capture pass and reuses one capture per batch
        self._precaptured = precaptured
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._patch_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._masks: dict[str, torch.Tensor] | None = None
        self._captured: dict[int, torch.Tensor] = {}
        self._capturing = False
        #: short path: the (args, kwargs) the model gave layer t_min in this prefill
        self._fork_call: tuple[tuple, dict] | None = None
        #: how many prefills this session patched (0 or 1); a deterministic handle for tests and benchmarks
        self.patched_prefills = 0
        #: which path the patched prefill took: "short", "two-pass", "precaptured" (None: nothing patched yet)
        self.path: str | None = None
        #: the preset's audio-confidence gate (:class:`~backpatch.preset.Gate`), or None (patches at full strength)
        self._gate = gate
        #: the gate's strength per main row in this prefill ([B] floats in [0, 1]); given by the caller with
        #: ``precaptured`` states (calibration), else measured by the capture pass
        self.gate_values: torch.Tensor | None = gate_values

    # ------------------------------------------------------------------------------------------ install
    def install(self) -> None:
        r, hooks = self.resolved, self._hooks
        self._handles.append(hooks.forward_pre_hook(r.generator, self._on_generator_call, with_kwargs=True))
        self._handles.append(hooks.forward_pre_hook(r.text_model, self._on_text_model_call, with_kwargs=True))
        self._handles.append(hooks.forward_hook(r.text_model, self._on_text_model_done))

    def remove(self) -> None:
        """Remove this session's hooks (idempotent). Its state is dropped: a later hook call finds no masks."""
        while self._patch_handles or self._handles:
            (self._patch_handles or self._handles).pop().remove()
        self._captured = {}
        self._masks = None
        self._fork_call = None

    # --------------------------------------------------------------------------------------------- hooks
    def _on_generator_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._masks is not None:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise BackpatchRuntimeError(
                "back-patching finds audio positions from input_ids, but this call has none (inputs_embeds only?); "
                "pass input_ids as produced by the processor"
            )
        if _cache_length(kwargs) > 0:
            raise BackpatchRuntimeError(
                "back-patching needs a fresh prefill, but this call continues a non-empty KV cache; generate without "
                "passing a filled cache, or run it inside `with model.disabled():`"
            )
        if _cache_is_static(kwargs):
            raise BackpatchRuntimeError(
                "back-patching does not support static (compileable) caches yet; use the default dynamic cache "
                "(leave cache_implementation unset)"
            )
        kinds = {p.positions for p in self.resolved.patches}
        self._masks = position_masks(input_ids, kwargs.get("attention_mask"), self.resolved.audio_token_id, kinds)
        if self._doubled:
            for mask in self._masks.values():
                mask[input_ids.shape[0] // 2 :] = False

    def _on_text_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._capturing or self._masks is None:
            return
        if not any(bool(m.any()) for m in self._masks.values()):
            self.remove()  # no row has audio: nothing to patch, leave the whole call untouched
            return
        if self._precaptured is None and self._short_path_fits(module, kwargs):
            self._arm_short_path()
            return
        if kwargs.get("inputs_embeds") is not None:
            self._check_length(kwargs["inputs_embeds"])
            self._capture_then_arm(module, args, kwargs)
            return
        # The text model merges the audio itself (Phi-4-multimodal: it gets input_ids and audio features). Wait
        # for the merged embeddings, which are the first decoder layer's input, so the encoder still runs once.
        text_args, text_kwargs = args, kwargs

        def on_first_layer(_layer: nn.Module, layer_args: tuple) -> None:
            self._handles.remove(handle)
            handle.remove()
            hidden = layer_args[0] if layer_args else None
            if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
                raise BackpatchRuntimeError(
                    f"{type(module).__name__} was called without inputs_embeds and its first decoder layer does not "
                    "receive [batch, tokens, hidden] embeddings; this architecture needs an entry in "
                    "backpatch._architectures"
                )
            self._check_length(hidden)
            reentry_args = text_args[1:] if text_args and isinstance(text_args[0], torch.Tensor) else text_args
            reentry_kwargs = {**text_kwargs, "input_ids": None, "inputs_embeds": hidden}
            self._capture_then_arm(module, reentry_args, reentry_kwargs)

        handle = self._hooks.forward_pre_hook(self.resolved.layers[0], on_first_layer)
        self._handles.append(handle)

    def _check_length(self, embeds: torch.Tensor) -> None:
        mask_shape = next(iter(self._masks.values())).shape
        if tuple(embeds.shape[:2]) != tuple(mask_shape):
            raise BackpatchRuntimeError(
                f"the text model received {tuple(embeds.shape[:2])} embeddings for {tuple(mask_shape)} input ids, so "
                "positions in input_ids do not map to decoder positions. Let the processor expand the audio "
                "placeholder (one token per audio embedding; e.g. Qwen2-Audio's legacy single-token path expands "
                "it inside the model); prefill chunking is not supported either"
            )

    def _capture_then_arm(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._precaptured is not None:
            if self._gate is not None and self.gate_values is None:
                raise BackpatchRuntimeError("a gated preset with precaptured states needs the gate values too")
            patches = self.resolved.patches
            self._captured = {i: self._precaptured[(p.source, p.positions)] for i, p in enumerate(patches)}
            self.path = "precaptured"
        else:
            self._capture(module, args, kwargs)
            self.path = "two-pass"
        for target in sorted({p.target for p in self.resolved.patches}):
            hook = self._make_patch_hook(target)
            self._patch_handles.append(self._hooks.forward_hook(self.resolved.layers[target], hook))

    def _on_text_model_done(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._capturing or self._masks is None:
            return
        complete = len(self._captured) == len(self.resolved.patches)
        self.patched_prefills += 1
        self.remove()
        if not complete:
            raise BackpatchRuntimeError(
                f"the prefill of {type(module).__name__} never gave layer {self.resolved.earliest_target} of "
                f"{self.resolved.layers_path} its output, so nothing was captured; does its forward run every "
                "layer in that ModuleList?"
            )

    # ---------------------------------------------------------------------------------------- short path
    def _short_path_fits(self, module: nn.Module, kwargs: dict) -> bool:
        """Whether this prefill can share layers 0..t_min between capture and patched pass (module docstring)."""
        resolved = self.resolved
        if self._gate is not None:  # the gate needs the unpatched answer distribution: the capture runs every layer
            return False
        if not resolved.short_path or any(kwargs.get(key) is not None for key in resolved.per_layer_inputs):
            return False
        first, last = resolved.earliest_target, resolved.deepest_source
        # The layers after t_min get the arguments of L[t_min]: right only where they share its attention type.
        layer_types = getattr(getattr(module, "config", None), "layer_types", None)
        if layer_types is not None and len(set(layer_types[first : last + 1])) > 1:
            return False
        # Contrastive decoding: the short path captures both streams (the batch axis of every layer argument is
        # not known here), so it pays off only when 2 (s - t) layer-rows are fewer than the s + 1 it saves.
        return not self._doubled or 2 * (last - first) <= last + 1

    def _arm_short_path(self) -> None:
        resolved, hooks = self.resolved, self._hooks
        fork = resolved.earliest_target
        self.path = "short"
        layer = resolved.layers[fork]
        self._patch_handles.append(hooks.forward_pre_hook(layer, self._on_fork_input, with_kwargs=True))
        self._patch_handles.append(hooks.forward_hook(layer, self._on_fork_output))
        for target in sorted({p.target for p in resolved.patches} - {fork}):
            self._patch_handles.append(hooks.forward_hook(resolved.layers[target], self._make_patch_hook(target)))

    def _on_fork_input(self, _layer: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            raise BackpatchRuntimeError(
                f"layer {self.resolved.earliest_target} of {self.resolved.layers_path} does not receive [batch, "
                "tokens, hidden] states first; this architecture needs short_path=False in backpatch._architectures"
            )
        self._check_length(hidden)
        self._fork_call = (args, kwargs)

    def _on_fork_output(self, _layer: nn.Module, _args: tuple, output: Any) -> Any:
        if self._fork_call is None:  # pragma: no cover - the pre-hook runs first on every call
            return None
        self._captured = self._capture_after_fork(_hidden(output))
        self._fork_call = None
        return self._patched(self.resolved.earliest_target, output)

    def _capture_after_fork(self, hidden: torch.Tensor) -> dict[int, torch.Tensor]:
        """Run layers t_min+1 .. s_max unpatched from the output of layer t_min, without a KV cache, and keep
        only the patched positions of every source layer."""
        resolved, masks = self.resolved, self._masks
        args, kwargs = self._fork_call
        kwargs = {key: None if key in _LAYER_CACHE_KWARGS else value for key, value in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured: dict[int, torch.Tensor] = {}
        self._capturing = True  # the patch hooks of later targets stay out of the capture
        try:
            with torch.no_grad(), _outputs_not_recorded():
                for index in range(resolved.earliest_target + 1, resolved.deepest_source + 1):
                    layer = resolved.layers[index]
                    if args:
                        output = layer(hidden, *args[1:], **kwargs)
                    else:
                        output = layer(**{**kwargs, "hidden_states": hidden})
                    hidden = _hidden(output)
                    for i, patch in enumerate(resolved.patches):
                        if patch.source == index:
                            captured[i] = _select(hidden, masks[patch.positions].to(hidden.device))
        finally:
            self._capturing = False
        return captured

    # ------------------------------------------------------------------------------------------- capture
    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Run the text model unpatched up to the deepest source layer and keep only the patched positions."""
        resolved = self.resolved
        masks = self._masks
        deepest = resolved.deepest_source
        captured: dict[int, torch.Tensor] = {}
        handles = []
        capture_kwargs = dict(kwargs)
        gated = self._gate is not None
        rows = next(iter(masks.values())).shape[0] // 2 if self._doubled else None
        if self._doubled and not gated:
            # The null-audio rows of contrastive decoding are never patched: capture the main rows only.
            rows = next(iter(masks.values())).shape[0] // 2
            masks = {kind: mask[:rows] for kind, mask in masks.items()}
            capture_kwargs = {key: _first_rows(key, value, rows) for key, value in capture_kwargs.items()}
            if args:
                args = tuple(_first_rows("", value, rows) for value in args)

        def make_hook(layer: int):
            def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
                hidden = _hidden(output)
                for index, patch in enumerate(resolved.patches):
                    if patch.source == layer:
                        captured[index] = _select(hidden, masks[patch.positions].to(hidden.device)).detach()
                if layer == deepest and not gated:  # the gate needs the answer distribution: run to the end
                    raise _StopCapture(self)

            return hook

        for layer in sorted({p.source for p in resolved.patches}):
            handles.append(self._hooks.forward_hook(resolved.layers[layer], make_hook(layer)))
        for key in _CACHE_KWARGS:
            if key in capture_kwargs:
                capture_kwargs[key] = None
        capture_kwargs.update(use_cache=False, output_hidden_states=False, output_attentions=False)
        self._capturing = True
        try:
            output = module(*args, **capture_kwargs)
            if gated:
                self.gate_values = self._measure_gate(output, rows)
        except _StopCapture as stop:
            if stop.session is not self:  # pragma: no cover - hooks act for their own call only
                raise
        finally:
            self._capturing = False
            for handle in handles:
                handle.remove()
        self._captured = captured
        if len(self._captured) != len(resolved.patches):
            raise BackpatchRuntimeError(
                f"the capture pass did not reach source layer {deepest} of {resolved.layers_path}; does "
                f"{type(module).__name__}.forward run every layer in that ModuleList?"
            )

    def _measure_gate(self, text_output: Any, rows: int | None) -> torch.Tensor:
        """The gate per main row from the unpatched text model's output at the last prompt position (the LM head
        applied to it; with contrastive rows in the batch, rows ``rows:`` are the null-audio ones)."""
        from ._gate import gate_strength

        last = getattr(text_output, "last_hidden_state", None)
        if last is None:
            last = text_output[0]
        generator = self.resolved.generator
        head = generator.get_output_embeddings()
        logits = head(last[:, -1:].to(head.weight.device))[:, -1]
        config = generator.config.get_text_config() if hasattr(generator.config, "get_text_config") else None
        cap = getattr(config, "final_logit_softcapping", None)
        if cap:  # Gemma: the model's own logits are soft-capped after the head
            logits = torch.tanh(logits / cap) * cap
        if rows is None:
            return gate_strength(self._gate, logits, None).detach()
        return gate_strength(self._gate, logits[:rows], logits[rows:]).detach()

    def _make_patch_hook(self, target: int):
        def hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
            if self._capturing or self._masks is None:
                return None
            return self._patched(target, output)

        return hook

    def _patched(self, target: int, output: Any) -> Any:
        """``output`` of layer ``target`` with every patch aimed at it applied (DESIGN section 1, step 2)."""
        hidden = _hidden(output)
        patched = hidden.clone()
        for index, patch in enumerate(self.resolved.patches):
            if patch.target != target:
                continue
            mask = self._masks[patch.positions].to(hidden.device)
            states = self._captured[index].to(device=hidden.device, dtype=hidden.dtype)
            at = _at(patched, mask)
            current = patched[at]
            combined = _combine(current, states, patch)
            if self.gate_values is not None:  # per row: h + g (patched - h); g = 0 leaves h exactly as it was
                rows = mask.nonzero(as_tuple=True)[0]
                strength = self.gate_values.to(device=hidden.device, dtype=hidden.dtype)[rows].unsqueeze(-1)
                combined = current + strength * (combined - current)
            patched[at] = combined
        return _with_hidden(output, patched)


# ------------------------------------------------------------------------------------------------ locking
class _ModelLock:
    """A lock per model that also refuses same-thread re-entry (which would stack two sessions' hooks).

    ``blocks`` is a second, reentrant lock for ``apply()`` blocks, which replace ``generate`` on the module
    itself: two blocks on one model in different threads run one after the other, not interleaved."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self.blocks = threading.RLock()

    @contextmanager
    def hold(self, nested: str = "") -> Iterator[None]:
        """Wait for the model's patched call in flight (if any) to end, then hold the model."""
        if self._owner == threading.get_ident():
            raise BackpatchRuntimeError(
                nested or "a back-patched call on this model is already running in this thread (nested "
                "generate()); nested back-patched calls on one model are not supported"
            )
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None


_LOCKS: weakref.WeakKeyDictionary[nn.Module, _ModelLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(module: nn.Module) -> _ModelLock:
    """The lock shared by every wrapper and ``apply()`` of this module: one patched call at a time."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(module)
        if lock is None:
            lock = _LOCKS[module] = _ModelLock()
        return lock


@contextmanager
def patch_session(
    resolved: Resolved, precaptured: dict[tuple[int, str], torch.Tensor] | None = None
) -> Iterator[PatchSession]:
    """Install a session's hooks for the duration of one call; they are gone afterwards, whatever happens."""
    with generation_session(resolved, precaptured=precaptured) as (session, _):
        yield session


class _Sessions(tuple):
    """``(patch session, contrastive session)`` as before, plus ``.attention`` and ``.steering`` (the sessions of
    those blocks, or None)."""

    attention: Any = None
    steering: Any = None


@contextmanager
def generation_session(
    resolved: Resolved,
    contrastive: Any = None,
    silence: Any = None,
    precaptured: dict[tuple[int, str], torch.Tensor] | None = None,
    gate: Any = None,
    gate_values: torch.Tensor | None = None,
    attention: Any = None,
    steering: Any = None,
) -> Iterator[tuple[PatchSession | None, Any]]:
    """Back-patching, contrastive decoding and attention-to-audio hooks for one call, under the model's lock.

    ``attention`` (a :class:`~backpatch.preset.Attention` block, alpha > 0) biases the attention of the resolved
    layers (:mod:`backpatch._attention`); it acts in every pass of the call, capture passes included.
    ``steering`` (a :class:`~backpatch.preset.Steering` block, beta != 0) reads the contrastive block's null rows
    (which then ride along even at alpha 0) and steers the last layer's output (:mod:`backpatch._steering`).

    ``gate`` (a :class:`~backpatch.preset.Gate`) scales both per row; its ``audio_gap`` signal needs the null-audio
    rows, which then ride along even at contrastive ``alpha: 0``. ``gate_values`` go with ``precaptured``.

    The contrastive hooks go on first, so that the patch session sees the doubled batch and patches only the
    main rows. All hooks belong to this call in this thread (:class:`CallHooks`); everything is removed on exit,
    whatever happens, each step even if an earlier one fails.
    """
    from ._attention import AttentionSession
    from ._contrastive import ContrastiveSession
    from ._steering import SteeringSession

    with model_lock(resolved.generator).hold(), ExitStack() as stack:
        hooks = CallHooks()
        stack.callback(hooks.close)  # last: whatever a session may have missed
        use_steering = steering is not None and steering.beta != 0 and resolved.steering_layers is not None
        needs_null = (gate is not None and gate.signal == "audio_gap") or use_steering
        use_contrastive = contrastive is not None and (contrastive.alpha > 0 or needs_null)
        cs = ContrastiveSession(resolved, contrastive, silence, hooks, gate=gate) if use_contrastive else None
        ps = (PatchSession(resolved, precaptured, doubled=use_contrastive, hooks=hooks, gate=gate,
                           gate_values=gate_values) if resolved.patches else None)
        use_attention = attention is not None and attention.alpha > 0 and resolved.attention_layers is not None
        ats = AttentionSession(resolved, attention, hooks) if use_attention else None
        if use_steering and cs is None:
            raise BackpatchRuntimeError("steering needs the null-audio rows of a contrastive block")
        sts = (SteeringSession(resolved, steering, hooks, lambda: ps is not None and ps._capturing)
               if use_steering else None)
        if cs is not None:
            stack.callback(cs.remove)
        if ps is not None:
            stack.callback(ps.remove)
        if ats is not None:
            stack.callback(ats.remove)
        if sts is not None:
            stack.callback(sts.remove)
        stack.enter_context(_current(hooks))
        if cs is not None:
            cs.install()
        if ats is not None:  # after the contrastive pre-hook: it sees the rows the attention will see
            ats.install()
        if ps is not None:
            ps.install()
        if sts is not None:
            sts.install()
        sessions = _Sessions((ps, cs))
        sessions.attention, sessions.steering = ats, sts
        yield sessions
