"""Back-patching inside one vLLM worker: forward hooks on every decoder layer of the served text model, and per step
a plan of which requests in the flattened batch are fresh prefills that asked for patches.

The method is the Hugging Face engine's short path (``backpatch.methods.backpatching``, DESIGN section 1): at the
output of a request group's earliest target layer ``t``, layers ``t+1 .. s_max`` run once more on the step's tokens
(the **capture**, from the unpatched state), the source states are taken at the patch positions, and the target
layers' outputs are patched with the same pure :func:`~backpatch.methods.backpatching.combine` the HF engine uses;
the model then goes on from the patched state, so decoding reads the patched KV cache. A vLLM decoder layer returns
``(hidden, residual)``: the residual stream is their sum, and a patch changes ``hidden`` by exactly what it changes
the stream by.

Requests mix freely in one step: plain requests and decode steps are left alone (their tokens do flow through the
capture, whose KV writes the main pass then overwrites with identical values), and each group of patched requests
captures from its own ``t``. A patched request whose prefill is not whole in this step (chunked prefill, a prefix
cache hit) cannot be patched exactly: the plugin turns chunked prefill off and salts patched requests' prefix cache,
and this module refuses such a step with a sentence rather than patch part of a prompt.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine import BackpatchRuntimeError
from ..methods.backpatching import ResolvedPatch, combine
from .settings import RequestSetting

logger = logging.getLogger(__name__)

__all__ = ["CANONICAL_KEY", "COUNTS_ENV", "PatchRuntime", "StepRequest"]

#: a file the counts are written to after each patched step (benchmarks/vllm_serve.py reads a server's there)
COUNTS_ENV = "BACKPATCH_VLLM_COUNTS"
#: where the front end leaves a request's checked setting (:meth:`RequestSetting.canonical`) for the workers
CANONICAL_KEY = "_backpatch"


@dataclass
class StepRequest:
    """One patched fresh prefill in this step: its patches and the flattened-token indices of each position kind."""

    request_id: str
    patches: tuple[ResolvedPatch, ...]
    where: dict[str, torch.Tensor]
    captured: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    @property
    def first_target(self) -> int:
        return min(p.target for p in self.patches)

    @property
    def last_source(self) -> int:
        return max(p.source for p in self.patches)


class PatchRuntime:
    """The hooks of one served model; ``runner`` (the worker's model runner) is set by the plugin before each step,
    ``audio_mask`` by the model's ``embed_input_ids`` (the step's multimodal positions)."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = layers
        self.runner: Any = None
        self.audio_mask: torch.Tensor | None = None
        self.plan: list[StepRequest] = []
        #: deterministic counts for tests and the benchmark: patched prefills and capture layer calls
        self.counts: Counter[str] = Counter()
        self._capturing = False
        self._settings: dict[str, RequestSetting] = {}
        self.handles = [layer.register_forward_hook(self._hook(j), with_kwargs=True) for j, layer in enumerate(layers)]

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()

    # ------------------------------------------------------------------------------------------- the step plan
    def _plan_step(self) -> list[StepRequest]:
        """Which requests of this step are patched fresh prefills (read at layer 0, before anything is patched)."""
        from vllm.forward_context import get_forward_context, is_forward_context_available

        runner = self.runner
        if runner is None or not is_forward_context_available():
            return []
        metadata = get_forward_context().attn_metadata
        if not metadata:
            return []  # a profiling or dummy run
        first = next(iter(metadata.values())) if isinstance(metadata, dict) else metadata
        starts = first.query_start_loc.tolist()
        batch = runner.input_batch
        plan = []
        for i, rid in enumerate(batch.req_ids):
            state = runner.requests[rid]
            setting = self._setting(state.sampling_params.extra_args)
            if not setting.patched:
                continue
            start, end = starts[i], starts[i + 1]
            computed, prompt = int(batch.num_computed_tokens_cpu[i]), state.num_prompt_tokens
            if computed >= prompt:
                continue  # decoding: the patch acted on this request's prefill
            if computed != 0 or end - start != prompt:
                raise BackpatchRuntimeError(
                    f"request {rid}: its prompt ({prompt} tokens) is not prefilled whole in one step ({computed} "
                    f"tokens already computed, {end - start} in this step), so back-patching cannot capture its late "
                    "states exactly; keep chunked prefill off (the backpatch plugin does) and max_num_batched_tokens "
                    "at least max_model_len")
            plan.append(StepRequest(rid, setting.patches, self._positions(start, end, setting.patches)))
        return plan

    def _setting(self, extra_args: dict[str, Any] | None) -> RequestSetting:
        data = (extra_args or {}).get(CANONICAL_KEY)
        if data is None:
            return RequestSetting("plain")
        key = repr(data)
        if key not in self._settings:
            self._settings[key] = RequestSetting.from_canonical(data)
        return self._settings[key]

    def _positions(self, start: int, end: int, patches: tuple[ResolvedPatch, ...]) -> dict[str, torch.Tensor]:
        mask = self.audio_mask  # this step's, set by the model's embed_input_ids before the layers run
        if mask is not None and mask.shape[0] >= end:
            audio = torch.nonzero(mask[start:end].cpu()).flatten() + start
        else:
            audio = torch.empty(0, dtype=torch.long)
        last = torch.tensor([end - 1])
        where = {"audio": audio, "last": last, "audio+last": torch.unique(torch.cat([audio, last]))}
        for patch in patches:
            if patch.positions != "last" and audio.numel() == 0:
                raise BackpatchRuntimeError(f"a patch at positions {patch.positions!r} found no audio positions in "
                                            "this request's prompt: send the audio with the prompt")
        return where

    # ------------------------------------------------------------------------------------------- the hooks
    def _hook(self, j: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if self._capturing:
                return None
            if j == 0:
                self.plan = self._plan_step()
            if not self.plan:
                return None
            return self._at_layer(j, args, kwargs, output)

        return hook

    def _at_layer(self, j: int, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden, residual = output
        starting = [r for r in self.plan if r.first_target == j]
        if starting:
            positions = kwargs.get("positions", args[0] if args else None)
            self._capture(j, positions, hidden, residual, starting)
        targets = [(r, p) for r in self.plan for p in r.patches if p.target == j]
        if not targets:
            return None
        patched = hidden.clone()  # only patched positions change: plain requests stay bit-identical
        for request, patch in targets:
            index = request.where[patch.positions].to(hidden.device)
            current = patched[index] + residual[index]
            state = combine(current, request.captured[(patch.source, patch.positions)], patch)
            patched[index] = (state - residual[index]).to(hidden.dtype)
        if j == max(p.target for r in self.plan for p in r.patches):
            self.counts["patched_prefills"] += len(self.plan)
            self._report_counts()
        return patched, residual

    def _report_counts(self) -> None:
        """Where ``BACKPATCH_VLLM_COUNTS`` names a file, the counts so far (a benchmark reads a server's there)."""
        path = os.environ.get(COUNTS_ENV)
        if path:
            Path(path).write_text(json.dumps(dict(self.counts)))

    def _capture(self, j: int, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor,
                 requests: list[StepRequest]) -> None:
        """Layers ``j+1 .. s_max`` on clones of layer ``j``'s output (vLLM's fused norms write in place), taking each
        source state at its positions; the main pass then recomputes those layers (and their KV) from the patch."""
        last = max(r.last_source for r in requests)
        h, r = hidden.clone(), residual.clone()
        self._capturing = True
        try:
            for k in range(j + 1, last + 1):
                h, r = self.layers[k](positions, h, r)
                self.counts["capture_layer_calls"] += 1
                wanted = [(req, p) for req in requests for p in req.patches if p.source == k]
                if wanted:
                    stream = h + r
                    for req, p in wanted:
                        req.captured[(k, p.positions)] = stream[req.where[p.positions].to(stream.device)].clone()
        finally:
            self._capturing = False
