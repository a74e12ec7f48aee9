"""Answering conflict items, plainly and with a preset, on one engine: the items' clips fitted to the model's audio
window, their prompts framed, and the greedy answers of both columns in batches (the transformers wrapper, or an
engine that takes waveforms, such as :class:`backpatch.vllm.engine.VllmEngine`). :mod:`backpatch.evaluate` turns the
answers into metrics."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .audio_io import fit_to_window, load_audio
from .inputs import audio_window_seconds, build_inputs, decode_new_tokens, framed, sampling_rate_of, truncation_enabled
from .items import ConflictItem

__all__ = ["answer_items", "encode_items", "item_waves"]


def item_waves(processor: Any, items: Sequence[ConflictItem], truncate: bool | None = None) -> list:
    """The items' clips at the processor's rate, fitted to its audio window.

    A clip longer than the model's audio window raises :class:`AudioTooLongError` naming the item, unless
    ``truncate`` (default: off, or the :func:`backpatch.inputs.audio_truncation` setting in force)."""
    rate, limit, cut = sampling_rate_of(processor), audio_window_seconds(processor), truncation_enabled(truncate)
    return [fit_to_window(load_audio(item.audio, rate), rate, limit, cut,
                          f"the clip of item {item.id} ({item.audio.name})")[0] for item in items]


def encode_items(processor: Any, items: Sequence[ConflictItem], truncate: bool | None = None,
                 instruction: str | None = None, instruction_role: str = "user", waves: list | None = None) -> Any:
    """Model inputs for a batch of conflict items: their clips (:func:`item_waves`, or ``waves`` already loaded)
    and their prompts, framed by ``instruction`` when given."""
    waves = item_waves(processor, items, truncate) if waves is None else waves
    prompts = [framed(item.prompt, instruction, instruction_role, item.system) for item in items]
    return build_inputs(processor, waves, [p for p, _ in prompts], truncate=truncation_enabled(truncate),
                        system=[s for _, s in prompts])


def _batches(items: Sequence[ConflictItem], batch_size: int) -> list[Sequence[ConflictItem]]:
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


@torch.no_grad()
def answer_items(
    wrapped: Any,
    processor: Any,
    items: Sequence[ConflictItem],
    batch_size: int = 32,
    max_new_tokens: int = 16,
    progress: bool = True,
    truncate: bool | None = None,
    gates: list | None = None,
    plain_answers: Sequence[str] | None = None,
    backpatched: bool = True,
    instruction: str | None = None,
    instruction_role: str = "user",
    mitigate: bool = True,
) -> tuple[list[str], list[str]]:
    """Plain and back-patched greedy answers for ``items`` (same inputs for both, batched); ``truncate`` as in
    :func:`encode_items`. With a gated preset, ``gates`` (a list) receives each item's gate strengths:
    ``{"patch": g or None, "contrastive_first_step": g or None}``. ``plain_answers``: the plain answers of these
    items from an earlier run with the same settings (they do not depend on the preset): not generated again.
    ``backpatched=False``: the plain answers only (the second list is empty). ``instruction``: the second column's
    prompts carry it (:func:`backpatch.inputs.framed`); the plain column keeps the items' own prompts, so the
    paired statistics measure what the framing (and the preset) change. ``mitigate=False``: the second column
    is generated without the preset (prompt framing alone)."""
    plain: list[str] = []
    patched: list[str] = []
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False)
    if plain_answers is not None and len(plain_answers) != len(items):
        raise ValueError(f"plain_answers has {len(plain_answers)} answers for {len(items)} items")
    for batch in tqdm(_batches(items, batch_size), desc="evaluate", unit="batch", disable=not progress):
        waves = item_waves(processor, batch, truncate)  # loaded once: a framed second column reuses them
        if getattr(wrapped, "takes_waveforms", False):  # another engine (vLLM): waveforms and prompts, not tensors
            known = plain_answers[len(plain) : len(plain) + len(batch)] if plain_answers is not None else None
            plain += known or wrapped.answer(processor, waves, [it.prompt for it in batch],
                                             [it.system for it in batch], max_new_tokens, mitigate=False)
            if backpatched:
                framings = [framed(it.prompt, instruction, instruction_role, it.system) for it in batch]
                patched += wrapped.answer(processor, waves, [p for p, _ in framings], [s for _, s in framings],
                                          max_new_tokens, mitigate=mitigate)
                if gates is not None:
                    gates += [None] * len(batch)
            continue
        inputs = encode_items(processor, batch, truncate=truncate, waves=waves).to(wrapped.device)
        length = inputs["input_ids"].shape[1]
        if plain_answers is not None:
            plain += plain_answers[len(plain) : len(plain) + len(batch)]
        else:
            with wrapped.disabled():
                plain += decode_new_tokens(processor, wrapped.generate(**inputs, **kwargs), length)
        if not backpatched:
            continue
        if instruction:
            inputs = encode_items(processor, batch, truncate, instruction, instruction_role,
                                  waves=waves).to(wrapped.device)
            length = inputs["input_ids"].shape[1]
        with wrapped.disabled() if not mitigate else contextlib.nullcontext():
            patched += decode_new_tokens(processor, wrapped.generate(**inputs, **kwargs), length)
        if gates is not None:
            gates += _gate_rows(wrapped.last_gate() if mitigate else None, len(batch))
    return plain, patched


def _gate_rows(report: dict | None, rows: int) -> list[dict | None]:
    """Per row of one call: the patch gate and the contrastive gate of the first generated token."""
    if report is None:
        return [None] * rows
    patch, steps = report["patch"], report["contrastive"]
    return [{"patch": patch[r] if patch else None, "contrastive_first_step": steps[r][0] if steps else None}
            for r in range(rows)]
