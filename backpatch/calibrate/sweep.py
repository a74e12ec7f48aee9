"""The sweep machinery that calibration and diagnostics share: one capture per batch, then a cheap score per setting.

Scoring is by the model's first answer token (greedy argmax at the last prompt position), which is what decides
single-word answers. One unpatched forward per batch yields the plain answers *and* the states of every
candidate source layer; each setting then needs one patched forward, no capture pass and no decoding.

Short path (``layer_states=True``): the unpatched forward also keeps every layer's output and the arguments each
decoder layer was called with. A setting whose earliest target is ``t`` then runs only layers ``t+1 .. N-1``
from the stored layer-``t`` output, patched, plus the final norm and LM head at the last position: layers
``0..t`` are the same for every setting with that target. :class:`Scorer` checks the short path against the
normal engine on the first batch and falls back to the engine if they disagree (a model whose layers need
more than the recorded arguments), so the choice is detected, never assumed per model type.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..engine import (
    Resolved,
    at,
    final_norm,
    final_states,
    generation_session,
    hidden_of,
    position_masks,
    readout,
    resolve,
    select,
)
from ..evaluate import encode_items, judge, metrics
from ..methods.backpatching import ResolvedPatch, combine, gated
from ..methods.contrastive import agreement_signal, contrastive_logits, null_features
from ..methods.gate import gate_strength
from ..wrapper import BackpatchedModel
from .grid import Candidate

logger = logging.getLogger(__name__)

#: the short path must reproduce the engine's first-token logits to this tolerance, else it is not used
SHORT_PATH_ATOL = 1e-4


class _Batch:
    """One batch of items: model inputs, the plain states of every candidate source at each position kind and,
    for the short path, every layer's plain output and call arguments; the plain first-token logits with the audio
    (``main_logits``) and, when contrastive decoding or gates are searched, with null audio (``null_logits``)."""

    def __init__(self, items, inputs, states, masks=None, layer_out=None, layer_args=None, main_logits=None,
                 null_logits=None):
        self.items = items
        self.inputs = inputs
        self.states = states
        self.masks = masks
        self.layer_out = layer_out
        self.layer_args = layer_args
        self.main_logits = main_logits
        self.null_logits = null_logits


@torch.no_grad()
def _first_token_logits(model: nn.Module, inputs: Any) -> torch.Tensor:
    return model(**inputs, use_cache=False).logits[:, -1].float()


def _decode(processor: Any, logits: torch.Tensor) -> list[str]:
    return [processor.decode([int(t)], skip_special_tokens=True) for t in logits.argmax(-1)]


@torch.no_grad()
def _first_token_answers(model: nn.Module, processor: Any, inputs: Any) -> list[str]:
    return _decode(processor, _first_token_logits(model, inputs))


def null_inputs(inputs: Any, feature_keys: tuple[str, ...], null_audio: str, silence: Any) -> dict[str, Any]:
    """The same batch with its audio features replaced by null audio (what contrastive decoding's rows see)."""
    return {key: null_features(key, value, null_audio, silence) if key in feature_keys else value
            for key, value in inputs.items()}


@torch.no_grad()
def capture_batch(resolved: Resolved, inputs: Any, sources: list[int], kinds: set[str], layer_states: bool = False,
                  items=None) -> _Batch:
    """One unpatched forward of ``inputs``: the states of every source layer at every position kind, the plain
    first-token logits and, with ``layer_states``, every layer's output and call arguments (the short path's)."""
    masks = position_masks(inputs["input_ids"], inputs.get("attention_mask"), resolved.audio_token_id, kinds)
    states: dict[tuple[int, str], torch.Tensor] = {}
    layer_out: dict[int, torch.Tensor] = {}
    layer_args: dict[int, tuple] = {}

    def make_hook(layer):
        def hook(_module, _args, output):
            hidden = hidden_of(output)
            if layer in sources:
                for kind, mask in masks.items():
                    states[(layer, kind)] = select(hidden, mask.to(hidden.device)).detach()
            if layer_states:
                layer_out[layer] = hidden.detach()

        return hook

    def make_pre_hook(layer):
        def pre_hook(_module, args, kwargs):
            layer_args[layer] = (args[1:], dict(kwargs))

        return pre_hook

    hooked = range(resolved.num_layers) if layer_states else sources
    handles = [resolved.layers[i].register_forward_hook(make_hook(i)) for i in hooked]
    if layer_states:
        handles += [layer.register_forward_pre_hook(make_pre_hook(i), with_kwargs=True)
                    for i, layer in enumerate(resolved.layers)]
    try:
        main_logits = _first_token_logits(resolved.generator, inputs)
    finally:
        for h in handles:
            h.remove()
    return _Batch(items, inputs, states, masks, layer_out if layer_states else None,
                  layer_args if layer_states else None, main_logits)


@torch.no_grad()
def prepare_batches(wrapped: BackpatchedModel, processor: Any, items, grid, batch_size: int, progress: bool,
                    layer_states: bool = False, null: tuple[str, Any] | None = None):
    """Plain first-token answers and captured source states, one unpatched forward per batch; with ``null``
    (``(null_audio, silence)``) also the plain first-token logits of the null-audio batch."""
    resolved = wrapped.resolved
    batches, plain_answers = [], []
    sources = sorted(set(grid["sources"]))
    kinds = set(grid["positions"])
    for start in tqdm(range(0, len(items), batch_size), desc="capture", unit="batch", disable=not progress):
        chunk = items[start : start + batch_size]
        inputs = encode_items(processor, chunk).to(wrapped.device)
        batch = capture_batch(resolved, inputs, sources, kinds, layer_states, items=chunk)
        plain_answers += _decode(processor, batch.main_logits)
        if null is not None:
            batch.null_logits = _first_token_logits(resolved.generator,
                                                    null_inputs(inputs, resolved.audio_feature_keys, *null))
        batches.append(batch)
    return batches, plain_answers


class Scorer:
    """First-token metrics of candidates on a fixed list of batches (short path when it is exact)."""

    def __init__(self, model: nn.Module, processor: Any, base_preset, null_audio: str, silence: Any,
                 candidate_preset, count_layers: bool = False) -> None:
        self.model, self.processor = model, processor
        self.base_preset, self.null_audio, self.silence = base_preset, null_audio, silence
        #: what the engine needs prepared per model (the silent features of contrastive decoding)
        self._resources = {"contrastive": silence} if silence is not None else {}
        self.candidate_preset = candidate_preset
        self.short_path_ok: bool | None = None  # decided on first use
        #: decoder-layer calls per scored setting (counted when ``count_layers``; tests assert on it)
        self.layer_calls: list[int] = []
        self.count_layers = count_layers
        #: ungated patched first-token logits of recent settings, per batch: every gate and alpha of a setting
        #: reuses them (a step gate patches a row fully or not at all)
        self._patched_cache: dict[tuple, list[torch.Tensor]] = {}

    # -------------------------------------------------------------------------------- engine (reference)
    def _engine_answers(self, candidate: Candidate, batches) -> list[str]:
        preset = self.candidate_preset(self.base_preset, candidate, self.null_audio)
        resolved = resolve(self.model, preset, self.processor)
        answers = []
        for batch in batches:
            # the stored states stand for the capture pass; a gate would need the values measured with them
            settings = {key: value for key, value in resolved.methods.items() if key != "gate"}
            with generation_session(resolved, settings, resources=self._resources, precaptured=batch.states):
                answers += _first_token_answers(resolved.generator, self.processor, batch.inputs)
        return answers

    def _block_answers(self, candidate: Candidate, batches) -> list[str]:
        """First answer tokens of a candidate with an attention or steering block: the whole engine on each batch's
        inputs (no stored states: the blocks change the states a patch would capture)."""
        preset = self.candidate_preset(self.base_preset, candidate, self.null_audio)
        resolved = resolve(self.model, preset, self.processor)
        answers = []
        for batch in batches:
            with generation_session(resolved, resources=self._resources):
                answers += _first_token_answers(resolved.generator, self.processor, batch.inputs)
        return answers

    # -------------------------------------------------------------------------------- short path
    def _short_logits(self, resolved, patch: ResolvedPatch, batch: _Batch, match_norm: bool = False,
                      row_gate: torch.Tensor | None = None) -> torch.Tensor:
        t = patch.target
        hidden = batch.layer_out[t].clone()
        mask = batch.masks[patch.positions].to(hidden.device)
        states = batch.states[(patch.source, patch.positions)].to(device=hidden.device, dtype=hidden.dtype)
        where = at(hidden, mask)
        current = hidden[where]
        if match_norm:
            patch = dataclasses.replace(patch, match_norm=True)
        combined = combine(current, states, patch)
        if row_gate is not None:  # the engine's gated combine, g per row
            strength = row_gate.to(hidden.dtype)[mask.nonzero(as_tuple=True)[0]].unsqueeze(-1)
            combined = gated(current, combined, strength)
        hidden[where] = combined
        for i in range(t + 1, resolved.num_layers):
            args, kwargs = batch.layer_args[i]
            hidden = hidden_of(resolved.layers[i](hidden, *args, **kwargs))
        if self.count_layers:
            self.layer_calls.append(resolved.num_layers - t - 1)
        last = final_states(resolved.text_model, hidden[..., -1:, :], resolved.final_combine)
        return readout(resolved.generator, last)[:, -1]

    def _short_answers(self, candidate: Candidate, batches, match_norm: bool = False) -> list[str]:
        preset = self.candidate_preset(self.base_preset, candidate, self.null_audio)
        resolved = resolve(self.model, preset, self.processor)
        patch = resolved.setting("patches")[0]
        answers = []
        for batch in batches:
            logits = self._short_logits(resolved, patch, batch, match_norm)
            answers += [self.processor.decode([int(t)], skip_special_tokens=True) for t in logits.argmax(-1)]
        return answers

    def _short_path_usable(self, candidate: Candidate, batch: _Batch) -> bool:
        """One batch, both ways: the short path is used only if it gives the engine's logits."""
        preset = self.candidate_preset(self.base_preset, candidate, self.null_audio)
        resolved = resolve(self.model, preset, self.processor)  # one resolve: same text model as the base preset
        if final_norm(resolved.text_model) is None:
            return False
        try:
            short = self._short_logits(resolved, resolved.setting("patches")[0], batch)
        except Exception as exc:  # noqa: BLE001 - any failure means: use the engine for this model
            logger.info("calibration short path unavailable (%s: %s); using the full engine", type(exc).__name__, exc)
            return False
        finally:
            if self.count_layers and self.layer_calls:
                self.layer_calls.pop()
        with generation_session(resolved, {"patches": resolved.setting("patches")}, precaptured=batch.states):
            full = resolved.generator(**batch.inputs, use_cache=False).logits[:, -1]
        diff = float((short - full).abs().max())
        logger.info("calibration short path vs engine: max |logit diff| %.2e", diff)
        return diff <= SHORT_PATH_ATOL

    # -------------------------------------------------------------------------------- gates and contrastive
    def _patched_logits(self, candidate: Candidate, batches, index: int, strength: torch.Tensor | None):
        """First-token logits of ``candidate.setting`` on batch ``index``, each row's patch scaled by ``strength``
        (None: full strength). Ungated logits are cached per setting, and a 0/1 gate picks rows from them."""
        batch = batches[index]
        key = (candidate.setting, id(batches))
        if key not in self._patched_cache:
            if len(self._patched_cache) >= 2:
                self._patched_cache.pop(next(iter(self._patched_cache)))
            self._patched_cache[key] = []
        cached = self._patched_cache[key]
        if index >= len(cached):
            cached.append(self._one_patched(candidate.setting, batch, None))
        ungated = cached[index]
        if strength is None:
            return ungated
        if bool(((strength == 0) | (strength == 1)).all()):
            return torch.where(strength.unsqueeze(-1) == 1, ungated, batch.main_logits)
        return self._one_patched(candidate.setting, batch, strength)

    def _one_patched(self, setting, batch: _Batch, strength: torch.Tensor | None) -> torch.Tensor:
        preset = self.candidate_preset(self.base_preset, Candidate(setting), self.null_audio)
        resolved = resolve(self.model, preset, self.processor)
        if batch.layer_out is not None and self.short_path_ok is None:
            self.short_path_ok = self._short_path_usable(Candidate(setting), batch)
        if batch.layer_out is not None and self.short_path_ok:
            return self._short_logits(resolved, resolved.setting("patches")[0], batch, row_gate=strength).float()
        # the engine on the stored states, each row's patch scaled by the strength measured on the stored logits
        with generation_session(resolved, {"patches": resolved.setting("patches")}, precaptured=batch.states,
                                gate_values=strength):
            return _first_token_logits(resolved.generator, batch.inputs)

    def first_token_logits(self, candidate: Candidate, batches, index: int) -> torch.Tensor:
        """What ``generate()`` with this candidate's preset gives as first-token logits on batch ``index``: the
        gate of each row from the stored plain distributions, the patched logits, then the contrastive combine
        with the stored null-audio logits (the gate re-measured on the patched distribution, as the engine does)."""
        batch = batches[index]
        main, null, gate = batch.main_logits, batch.null_logits, candidate.gate
        if (candidate.alpha or (gate is not None and gate.signal == "audio_gap")) and null is None:
            raise ValueError("scoring contrastive or audio_gap-gated candidates needs the null-audio logits")
        if candidate.patch_agreement is not None and null is None:
            raise ValueError("scoring a patch's agreement guard needs the null-audio logits")
        if candidate.setting is None:
            patched = main
        else:
            strength = gate_strength(gate, main, null) if gate is not None else None
            if candidate.patch_agreement is not None:  # the guard: a 0/1 factor per row, from the same stored logits
                keep = (agreement_signal(main, null) < candidate.patch_agreement).float()
                strength = keep if strength is None else strength * keep
            patched = self._patched_logits(candidate, batches, index, strength)
        if not candidate.alpha:
            return patched
        strength = gate_strength(gate, patched, null) if gate is not None else None
        return contrastive_logits(patched, null, candidate.alpha, strength, candidate.plausibility,
                                  candidate.agreement)

    # -------------------------------------------------------------------------------- entry
    @torch.no_grad()
    def score(self, candidate: Candidate, batches, match_norm: bool = False) -> dict[str, Any]:
        """Metrics of ``candidate`` on ``batches``, with every item's verdict (``verdicts``) for paired statistics."""
        items = [it for b in batches for it in b.items]
        if candidate.has_blocks:  # attention and steering change every pass: the engine on the batch's inputs
            answers = self._block_answers(candidate, batches)
            verdicts = [judge(a, it) for a, it in zip(answers, items, strict=True)]
            return {**metrics(items, verdicts), "verdicts": verdicts}
        mixed = batches[0].main_logits is not None and (candidate.alpha or candidate.gate is not None)
        simple = candidate.setting is not None and not candidate.alpha and batches[0].layer_out is not None
        if simple and self.short_path_ok is None:
            self.short_path_ok = self._short_path_usable(candidate, batches[0])
        if mixed and not match_norm:
            answers = [a for i in range(len(batches))
                       for a in _decode(self.processor, self.first_token_logits(candidate, batches, i))]
        elif simple and self.short_path_ok and candidate.gate is None:
            answers = self._short_answers(candidate, batches, match_norm)
        else:
            if match_norm:
                raise ValueError("norm-matched scoring needs the short path (layer states) and no contrastive alpha")
            answers = self._engine_answers(candidate, batches)
        verdicts = [judge(a, it) for a, it in zip(answers, items, strict=True)]
        return {**metrics(items, verdicts), "verdicts": verdicts}
