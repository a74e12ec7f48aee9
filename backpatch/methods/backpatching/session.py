"""Back-patching's install: prefill-only hooks that capture late states and route them into early layers.

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
(:attr:`backpatch.engine.Architecture.short_path`, checked per call against ``config.layer_types``
and per-layer inputs).

**Two-pass path** (every other family or call). The text-model pre-hook receives the input embeddings, with
the audio features already merged, and runs the capture pass: the same text model, unpatched, without a KV
cache, stopped by an exception right after the deepest source layer; forward hooks on the target layers then
patch the real prefill. Decoder-layer calls: plain + ``(s_max + 1)``. Where the text model merges the audio
itself (it gets ``input_ids``, as in Phi-4-multimodal), the capture waits for the merged embeddings at the
first decoder layer's input and re-enters from there.

On both paths the audio encoder runs once per call: the capture starts from the text model's input or from a
layer's output, never from the top model.

Hooks are owned by the call (:class:`backpatch.engine.CallHooks`); everything a hook keeps (masks, captured
states) lives on its session, one per call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...engine import (
    CACHE_KWARGS,
    LAYER_CACHE_KWARGS,
    BackpatchRuntimeError,
    Call,
    at,
    cache_is_static,
    cache_length,
    first_rows,
    hidden_of,
    outputs_not_recorded,
    position_masks,
    readout,
    select,
    with_hidden,
)
from ..contrastive.math import agreement_signal
from ..gate.math import gate_strength
from .math import ResolvedPatch, combine, gated

__all__ = ["PatchSession"]


class _StopCapture(Exception):
    """Raised after the deepest source layer to end the capture pass early (no later layers, no LM head).

    It carries the session that raised it, and only that session's capture pass catches it."""

    def __init__(self, session: PatchSession) -> None:
        super().__init__("backpatch capture pass stopped")
        self.session = session


class PatchSession:
    """Hooks for one patched prefill; opened by the engine's install loop, which removes them."""

    def __init__(self, call: Call, patches: tuple[ResolvedPatch, ...]) -> None:
        self._call = call
        self.resolved = call.resolved
        #: the preset's patches, resolved for this model
        self.patches = patches
        self.deepest_source = max(p.source for p in patches)
        self.earliest_target = min(p.target for p in patches)
        #: the call that owns this session's hooks: they act for it only (see :class:`CallHooks`)
        self._hooks = call.hooks
        #: contrastive decoding appends a null-audio copy of every row: only the first half is patched
        self._doubled = call.null_rows
        #: source states already captured for this exact batch, keyed by (source layer, positions): a sweep over
        #: targets and scales (calibration) then skips the capture pass and reuses one capture per batch
        self._precaptured = call.precaptured
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._patch_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._masks: dict[str, torch.Tensor] | None = None
        self._captured: dict[int, torch.Tensor] = {}
        #: short path: the (args, kwargs) the model gave layer t_min in this prefill
        self._fork_call: tuple[tuple, dict] | None = None
        #: how many prefills this session patched (0 or 1); a deterministic handle for tests and benchmarks
        self.patched_prefills = 0
        #: which path the patched prefill took: "short", "two-pass", "precaptured" (None: nothing patched yet)
        self.path: str | None = None
        #: the preset's audio-confidence gate (:class:`~backpatch.preset.Gate`), or None (patches at full strength)
        self._gate = call.setting("gate")
        #: the gate's strength per main row in this prefill ([B] floats in [0, 1]); given by the caller with
        #: ``precaptured`` states (calibration), else measured by the capture pass
        self.gate_values: torch.Tensor | None = call.gate_values
        #: patches with an agreement guard need the unpatched answer of every row (main and null-audio stream)
        self._guarded = any(p.agreement is not None for p in patches)
        #: the agreement signal per main row in this prefill ([B] nats: how far the audio raised the unpatched
        #: answer over the null-audio stream); given by the caller with ``precaptured`` states, else measured by
        #: the capture pass. A patch skips the rows where it reaches the patch's ``agreement``.
        self.agreement_values: torch.Tensor | None = call.agreement_values

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
        if cache_length(kwargs) > 0:
            raise BackpatchRuntimeError(
                "back-patching needs a fresh prefill, but this call continues a non-empty KV cache; generate without "
                "passing a filled cache, or run it inside `with model.disabled():`"
            )
        if cache_is_static(kwargs):
            raise BackpatchRuntimeError(
                "back-patching does not support static (compileable) caches yet; use the default dynamic cache "
                "(leave cache_implementation unset)"
            )
        kinds = {p.positions for p in self.patches}
        self._masks = position_masks(input_ids, kwargs.get("attention_mask"), self.resolved.audio_token_id, kinds)
        if self._doubled:
            for mask in self._masks.values():
                mask[input_ids.shape[0] // 2 :] = False

    def _on_text_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._call.capturing or self._masks is None:
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
                    "backpatch.engine.architectures"
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
            if self._guarded and self.agreement_values is None:
                raise BackpatchRuntimeError("patches with an agreement guard and precaptured states need the "
                                            "agreement values too")
            patches = self.patches
            self._captured = {i: self._precaptured[(p.source, p.positions)] for i, p in enumerate(patches)}
            self.path = "precaptured"
        else:
            self._capture(module, args, kwargs)
            self.path = "two-pass"
        for target in sorted({p.target for p in self.patches}):
            hook = self._make_patch_hook(target)
            self._patch_handles.append(self._hooks.forward_hook(self.resolved.layers[target], hook))

    def _on_text_model_done(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._call.capturing or self._masks is None:
            return
        complete = len(self._captured) == len(self.patches)
        self.patched_prefills += 1
        self.remove()
        if not complete:
            raise BackpatchRuntimeError(
                f"the prefill of {type(module).__name__} never gave layer {self.earliest_target} of "
                f"{self.resolved.layers_path} its output, so nothing was captured; does its forward run every "
                "layer in that ModuleList?"
            )

    # ---------------------------------------------------------------------------------------- short path
    def _short_path_fits(self, module: nn.Module, kwargs: dict) -> bool:
        """Whether this prefill can share layers 0..t_min between capture and patched pass (module docstring)."""
        resolved = self.resolved
        if self._measures_answer:  # gate and guard need the unpatched answer: the capture runs every layer
            return False
        if not resolved.short_path or any(kwargs.get(key) is not None for key in resolved.per_layer_inputs):
            return False
        first, last = self.earliest_target, self.deepest_source
        # The layers after t_min get the arguments of L[t_min]: right only where they share its attention type.
        layer_types = getattr(getattr(module, "config", None), "layer_types", None)
        if layer_types is not None and len(set(layer_types[first : last + 1])) > 1:
            return False
        # Contrastive decoding: the short path captures both streams (the batch axis of every layer argument is
        # not known here), so it pays off only when 2 (s - t) layer-rows are fewer than the s + 1 it saves.
        return not self._doubled or 2 * (last - first) <= last + 1

    def _arm_short_path(self) -> None:
        resolved, hooks = self.resolved, self._hooks
        fork = self.earliest_target
        self.path = "short"
        layer = resolved.layers[fork]
        self._patch_handles.append(hooks.forward_pre_hook(layer, self._on_fork_input, with_kwargs=True))
        self._patch_handles.append(hooks.forward_hook(layer, self._on_fork_output))
        for target in sorted({p.target for p in self.patches} - {fork}):
            self._patch_handles.append(hooks.forward_hook(resolved.layers[target], self._make_patch_hook(target)))

    def _on_fork_input(self, _layer: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            raise BackpatchRuntimeError(
                f"layer {self.earliest_target} of {self.resolved.layers_path} does not receive [batch, "
                "tokens, hidden] states first; this architecture needs short_path=False in "
                "backpatch.engine.architectures"
            )
        self._check_length(hidden)
        self._fork_call = (args, kwargs)

    def _on_fork_output(self, _layer: nn.Module, _args: tuple, output: Any) -> Any:
        if self._fork_call is None:  # pragma: no cover - the pre-hook runs first on every call
            return None
        self._captured = self._capture_after_fork(hidden_of(output))
        self._fork_call = None
        return self._patched(self.earliest_target, output)

    def _capture_after_fork(self, hidden: torch.Tensor) -> dict[int, torch.Tensor]:
        """Run layers t_min+1 .. s_max unpatched from the output of layer t_min, without a KV cache, and keep
        only the patched positions of every source layer."""
        resolved, masks = self.resolved, self._masks
        args, kwargs = self._fork_call
        kwargs = {key: None if key in LAYER_CACHE_KWARGS else value for key, value in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured: dict[int, torch.Tensor] = {}
        self._call.capturing = True  # the patch hooks of later targets stay out of the capture
        try:
            with torch.no_grad(), outputs_not_recorded():
                for index in range(self.earliest_target + 1, self.deepest_source + 1):
                    layer = resolved.layers[index]
                    if args:
                        output = layer(hidden, *args[1:], **kwargs)
                    else:
                        output = layer(**{**kwargs, "hidden_states": hidden})
                    hidden = hidden_of(output)
                    for i, patch in enumerate(self.patches):
                        if patch.source == index:
                            captured[i] = select(hidden, masks[patch.positions].to(hidden.device))
        finally:
            self._call.capturing = False
        return captured

    # ------------------------------------------------------------------------------------------- capture
    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Run the text model unpatched up to the deepest source layer and keep only the patched positions."""
        resolved = self.resolved
        masks = self._masks
        deepest = self.deepest_source
        captured: dict[int, torch.Tensor] = {}
        handles = []
        capture_kwargs = dict(kwargs)
        gated = self._measures_answer
        rows = next(iter(masks.values())).shape[0] // 2 if self._doubled else None
        if self._doubled and not gated:
            # The null-audio rows of contrastive decoding are never patched: capture the main rows only.
            rows = next(iter(masks.values())).shape[0] // 2
            masks = {kind: mask[:rows] for kind, mask in masks.items()}
            capture_kwargs = {key: first_rows(key, value, rows) for key, value in capture_kwargs.items()}
            if args:
                args = tuple(first_rows("", value, rows) for value in args)

        def make_hook(layer: int):
            def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
                hidden = hidden_of(output)
                for index, patch in enumerate(self.patches):
                    if patch.source == layer:
                        captured[index] = select(hidden, masks[patch.positions].to(hidden.device)).detach()
                if layer == deepest and not gated:  # the gate needs the answer distribution: run to the end
                    raise _StopCapture(self)

            return hook

        for layer in sorted({p.source for p in self.patches}):
            handles.append(self._hooks.forward_hook(resolved.layers[layer], make_hook(layer)))
        for key in CACHE_KWARGS:
            if key in capture_kwargs:
                capture_kwargs[key] = None
        capture_kwargs.update(use_cache=False, output_hidden_states=False, output_attentions=False)
        self._call.capturing = True
        try:
            output = module(*args, **capture_kwargs)
            if gated:
                self._measure_answer(output, rows)
        except _StopCapture as stop:
            if stop.session is not self:  # pragma: no cover - hooks act for their own call only
                raise
        finally:
            self._call.capturing = False
            for handle in handles:
                handle.remove()
        self._captured = captured
        if len(self._captured) != len(self.patches):
            raise BackpatchRuntimeError(
                f"the capture pass did not reach source layer {deepest} of {resolved.layers_path}; does "
                f"{type(module).__name__}.forward run every layer in that ModuleList?"
            )

    @property
    def _measures_answer(self) -> bool:
        """Whether the capture pass must run to the answer: the gate and the agreement guard read it."""
        return self._gate is not None or self._guarded

    def _measure_answer(self, text_output: Any, rows: int | None) -> None:
        """The gate and the agreement signal per main row from the unpatched text model's output at the last prompt
        position (read out as the model's own head does; with contrastive rows in the batch, rows ``rows:`` are the
        null-audio ones)."""
        last = getattr(text_output, "last_hidden_state", None)
        if last is None:
            last = text_output[0]
        logits = readout(self.resolved.generator, last[:, -1:])[:, -1]
        main, null = (logits, None) if rows is None else (logits[:rows], logits[rows:])
        if self._gate is not None:
            self.gate_values = gate_strength(self._gate, main, null).detach()
        if self._guarded:  # the preset check guarantees the null-audio rows (a contrastive block)
            self.agreement_values = agreement_signal(main, null).detach()

    def _strength(self, patch: ResolvedPatch) -> torch.Tensor | None:
        """Per main row, how strongly ``patch`` acts: the gate's strength, zeroed where its agreement guard holds
        (None: full strength on every row)."""
        strength = self.gate_values
        if patch.agreement is not None:
            keep = (self.agreement_values < patch.agreement).to(torch.float32)
            strength = keep if strength is None else strength.float() * keep.to(strength.device)
        return strength

    def _make_patch_hook(self, target: int):
        def hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
            if self._call.capturing or self._masks is None:
                return None
            return self._patched(target, output)

        return hook

    def _patched(self, target: int, output: Any) -> Any:
        """``output`` of layer ``target`` with every patch aimed at it applied (DESIGN section 1, step 2)."""
        hidden = hidden_of(output)
        patched = hidden.clone()
        for index, patch in enumerate(self.patches):
            if patch.target != target:
                continue
            mask = self._masks[patch.positions].to(hidden.device)
            states = self._captured[index].to(device=hidden.device, dtype=hidden.dtype)
            where = at(patched, mask)
            current = patched[where]
            combined = combine(current, states, patch)
            strength = self._strength(patch)
            if strength is not None:  # per row: h + g (patched - h); g = 0 leaves h exactly as it was
                rows = mask.nonzero(as_tuple=True)[0]
                strength = strength.to(device=hidden.device, dtype=hidden.dtype)[rows].unsqueeze(-1)
                combined = gated(current, combined, strength)
            patched[where] = combined
        return with_hidden(output, patched)
