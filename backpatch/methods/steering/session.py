"""Audio-silence steering (arXiv 2603.06854): the preset's ``steering`` block (docs/design.md, "steering").

``s = mean over layers a..b of (h_audio - h_null)`` at the last prompt position, measured at prefill; then
``beta * s`` is added to the last decoder layer's output at the last position of every main row, at prefill and at
every decode step. ``h_null`` comes from the null-audio rows that contrastive decoding already rides in the batch
(:mod:`backpatch.methods.contrastive`: rows ``B..2B-1`` copy rows ``0..B-1`` with the audio features replaced), so the
steering costs no second call; the null rows themselves are never steered.

The states are those of the pass that produces the answer: a back-patching capture pass (which may run some
layers twice) is skipped, and layer ``i``'s state is read as layer ``i+1``'s input, that is after any patch aimed at
layer ``i``. The last layer's own output is read just before it is steered.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...engine import BackpatchRuntimeError, Call, hidden_of, with_hidden
from .config import Steering

__all__ = ["SteeringSession"]


class SteeringSession:
    """The steering block's hooks for one call; always removed by the caller."""

    def __init__(self, call: Call, block: Steering) -> None:
        self.resolved = call.resolved
        self.block = block
        self.hooks = call.hooks
        #: True while a capture pass runs (a back-patching one: its states are not the answer's)
        self.capturing = lambda: call.capturing
        self.first, self.last = block.layers  # absolute: resolved for this model
        #: last-position states of the steering layers in this prefill, [..., 2B, H] (float32)
        self.states: dict[int, torch.Tensor] = {}
        #: the steering vector per main row, [..., B, H]; set at the prefill's last layer
        self.vector: torch.Tensor | None = None
        #: forward passes steered (prefill and decode steps): a deterministic count for tests
        self.steered = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def install(self) -> None:
        layers = self.resolved.layers
        final = len(layers) - 1
        for index in range(self.first, min(self.last, final - 1) + 1):
            self._handles.append(self.hooks.forward_pre_hook(layers[index + 1], self._reader(index),
                                                             with_kwargs=True))
        self._handles.append(self.hooks.forward_hook(layers[final], self._steer))

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    # --------------------------------------------------------------------------------------------- hooks
    def _keep(self, index: int, hidden: torch.Tensor) -> None:
        if hidden.shape[-3] % 2:
            raise BackpatchRuntimeError("steering expects the null-audio rows of contrastive decoding in the batch")
        self.states[index] = hidden[..., -1, :].detach().float().clone()

    def _reader(self, index: int):
        def read(_layer: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.capturing() or self.vector is not None:
                return None
            hidden = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(hidden, torch.Tensor):
                raise BackpatchRuntimeError(f"steering: decoder layer {index + 1} does not receive the hidden states "
                                            "first; this architecture cannot be steered yet")
            self._keep(index, hidden)
            return None

        return read

    def _steer(self, _layer: nn.Module, _args: tuple, output: Any) -> Any:
        if self.capturing():
            return None
        hidden = hidden_of(output)
        rows = hidden.shape[-3] // 2
        if self.vector is None:
            final = len(self.resolved.layers) - 1
            if self.last == final:
                self._keep(final, hidden)
            missing = [i for i in range(self.first, self.last + 1) if i not in self.states]
            if missing:
                raise BackpatchRuntimeError(f"steering: the prefill never gave layers {missing} their states")
            diffs = [self.states[i][..., :rows, :] - self.states[i][..., rows:, :] for i in range(self.first,
                                                                                                  self.last + 1)]
            self.vector = torch.stack(diffs).mean(0)
            self.states = {}
        steered = hidden.clone()
        steered[..., :rows, -1, :] += (self.block.beta * self.vector).to(device=hidden.device, dtype=hidden.dtype)
        self.steered += 1
        return with_hidden(output, steered)
