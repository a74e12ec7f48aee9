"""The recording passes of ``backpatch diagnose``: one forward per batch (plain, and again back-patched), with hooks
that keep per layer only what the analyses read (mean audio state, last-prompt state, claim-word state, attention
shares from the last prompt position, logit-lens probabilities and ranks).

Also here: where the claim word sits in each prompt (token offsets counted from the end, so they map onto left-padded
batches), which token ids can start an answer word, and the switch to eager attention for the run.

Why our own hooks rather than ``output_hidden_states``: Hugging Face records hidden states with hooks whose
order relative to the engine's patch hooks is an implementation detail. We read layer ``i``'s output as the
*input* of layer ``i + 1`` (and the last layer's output directly; it is never a patch target because source >
target), which is after any patch applied at layer ``i``, whatever the hook order. The tests check this.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..engine import Resolved, audio_mask, final_norm, hidden_of, last_prompt_mask, readout
from ..evaluate import ConflictItem, encode_items
from ..inputs import chat_texts
from ..wrapper import BackpatchedModel

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ item geometry
def _claim_char_span(rendered: str, prompt: str, claim: str) -> tuple[int, int] | None:
    start = rendered.rfind(prompt)
    base, text = (start, prompt) if start >= 0 else (0, rendered)
    match = re.search(rf"(?<!\w){re.escape(claim)}(?!\w)", text, flags=re.IGNORECASE)
    if match is None:
        return None
    return base + match.start(), base + match.end()


def _claim_tail_offsets(processor: Any, item: ConflictItem) -> list[tuple[int, int]] | None:
    """``(position, token id)`` of the claim word's tokens, positions counted from the end of the prompt
    (``-1`` = last token); the ids let the caller check the mapping against the processor's ``input_ids``.

    Counting from the end maps onto left-padded batches no matter how many tokens the processor expanded the
    audio placeholder into (the claim comes after it). ``None`` when the prompt has no claim or it is not found.
    """
    if item.kind == "audio_only" or not item.text_answer:
        return None
    tokenizer = getattr(processor, "tokenizer", processor)
    (rendered,) = chat_texts(processor, [item.prompt])
    span = _claim_char_span(rendered, item.prompt, item.text_answer)
    if span is None:
        return None
    try:
        enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
        return _claim_tail_offsets_by_search(tokenizer, rendered, item.text_answer)
    offsets = enc["offset_mapping"]
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < span[1] and b > span[0]]
    if not hits:
        return None
    n = len(offsets)
    return [(i - n, int(enc["input_ids"][i])) for i in hits]


def _claim_tail_offsets_by_search(tokenizer: Any, rendered: str, claim: str) -> list[tuple[int, int]] | None:
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    for variant in (" " + claim, claim, " " + claim.capitalize(), claim.capitalize()):
        needle = tokenizer(variant, add_special_tokens=False)["input_ids"]
        if not needle:
            continue
        for start in range(len(ids) - len(needle), -1, -1):
            if ids[start : start + len(needle)] == needle:
                return [(start + j - len(ids), int(needle[j])) for j in range(len(needle))]
    return None


def _answer_token_ids(tokenizer: Any, word: str | None) -> list[int]:
    """Token ids that can start ``word`` as an answer (bare, after a space, capitalised), unknown-token excluded."""
    if not word:
        return []
    unk = getattr(tokenizer, "unk_token_id", None)
    ids: list[int] = []
    for variant in (word, " " + word, word.capitalize(), " " + word.capitalize()):
        encoded = tokenizer(variant, add_special_tokens=False)["input_ids"]
        if encoded and encoded[0] != unk and encoded[0] not in ids:
            ids.append(int(encoded[0]))
    return ids


# --------------------------------------------------------------------------------------------- recording
@dataclass
class _Run:
    """Everything recorded in one pass (plain or back-patched), per layer and item, on the CPU in float32."""

    audio_mean: list[list[torch.Tensor]] = field(default_factory=list)  # [layer][batch] -> [B, H]
    last: list[list[torch.Tensor]] = field(default_factory=list)
    claim: list[list[torch.Tensor]] = field(default_factory=list)
    attn_audio: list[list[torch.Tensor]] = field(default_factory=list)  # [layer][batch] -> [B]
    attn_text: list[list[torch.Tensor]] = field(default_factory=list)
    lens: dict[str, list[list[torch.Tensor]]] = field(default_factory=dict)
    answers: list[str] = field(default_factory=list)

    def init(self, num_layers: int) -> None:
        for name in ("audio_mean", "last", "claim", "attn_audio", "attn_text"):
            setattr(self, name, [[] for _ in range(num_layers)])
        self.lens = {k: [[] for _ in range(num_layers)] for k in ("audio_prob", "text_prob", "audio_rank",
                                                                   "text_rank")}

    def stacked(self, name: str) -> torch.Tensor:
        rows = self.lens[name] if name in self.lens else getattr(self, name)
        return torch.stack([torch.cat(r) for r in rows])


def _attention_module(layer: nn.Module) -> nn.Module | None:
    for name in ("self_attn", "attention", "attn", "self_attention"):
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    for module in layer.modules():
        if module is not layer and type(module).__name__.endswith("Attention"):
            return module
    return None


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    hidden = args[0] if args else kwargs.get("hidden_states")
    return hidden if isinstance(hidden, torch.Tensor) else None


def _main_stream(hidden: torch.Tensor) -> torch.Tensor:
    """``[B, T, H]``; Gemma 3n's AltUp states ``[K, B, T, H]`` are read from their first (main) stream."""
    return hidden[0] if hidden.dim() == 4 else hidden


class _Recorder:
    """Forward hooks that reduce each layer's output and attention to what the analyses need, right away.

    Keeping only the mean audio state, the last-position state and the claim state per layer (not ``[B, T, H]``)
    is what lets a 7B model with long audio run in ordinary memory.
    """

    def __init__(self, resolved: Resolved, attn_modules: list[nn.Module | None], lm_head: nn.Module | None) -> None:
        self.resolved = resolved
        self.attn_modules = attn_modules
        self.lm_head = lm_head
        self.masks: dict[str, torch.Tensor] = {}
        self.last_index: torch.Tensor | None = None
        self.claim_index: torch.Tensor | None = None
        self.reduced: dict[int, dict[str, torch.Tensor]] = {}
        self.attention: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.attention_missing = False

    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, claim_mask: torch.Tensor) -> None:
        last = last_prompt_mask(input_ids, attention_mask)
        self.masks = {"audio": audio_mask(input_ids, self.resolved.audio_token_id), "claim": claim_mask}
        self.last_index = last.float().argmax(dim=1)
        # the representative claim token is its last one (in a causal model it has seen the whole word)
        positions = torch.arange(input_ids.shape[1]).expand_as(claim_mask)
        self.claim_index = torch.where(claim_mask, positions, torch.full_like(positions, -1)).amax(dim=1)
        self.reduced.clear()
        self.attention.clear()

    def _reduce(self, layer: int, hidden: torch.Tensor) -> None:
        hidden = _main_stream(hidden)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        audio = self.masks["audio"].to(hidden.device)
        counts = audio.sum(1, keepdim=True).clamp_min(1).to(torch.float32)
        audio_mean = (hidden.to(torch.float32) * audio.unsqueeze(-1)).sum(1) / counts
        audio_mean[~audio.any(1)] = float("nan")
        claim_index = self.claim_index.to(hidden.device)
        claim = hidden[rows, claim_index.clamp_min(0)].to(torch.float32)
        claim[claim_index < 0] = float("nan")
        self.reduced[layer] = {
            "audio_mean": audio_mean.cpu(),
            "last_device": hidden[rows, self.last_index.to(hidden.device)].detach(),
            "claim": claim.cpu(),
        }

    def _attention(self, layer: int, output: Any) -> None:
        weights = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
        if not isinstance(weights, torch.Tensor) or weights.dim() != 4:
            self.attention_missing = True
            return
        rows = torch.arange(weights.shape[0], device=weights.device)
        row = weights[rows, :, self.last_index.to(weights.device)].to(torch.float32).mean(1)  # [B, T]
        audio = self.masks["audio"].to(row.device)
        claim = self.masks["claim"].to(row.device)
        text = (row * claim).sum(1)
        text[~claim.any(1)] = float("nan")
        self.attention[layer] = ((row * audio).sum(1).cpu(), text.cpu())

    @contextmanager
    def hooks(self) -> Iterator[None]:
        handles = []
        layers = self.resolved.layers
        n = len(layers)

        def make_pre(layer: int):
            def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                hidden = _layer_input(args, kwargs)
                if hidden is not None:
                    self._reduce(layer, hidden.detach())

            return pre_hook

        def last_hook(_module: nn.Module, _args: tuple, output: Any) -> None:
            self._reduce(n - 1, hidden_of(output).detach())

        def make_attn(layer: int):
            def attn_hook(_module: nn.Module, _args: tuple, output: Any) -> None:
                self._attention(layer, output)

            return attn_hook

        def head_pre_hook(_module: nn.Module, args: tuple) -> tuple | None:
            # Only the last prompt position's logits are needed; left padding puts it at the end of every row.
            if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 3:
                return (args[0][:, -1:], *args[1:])
            return None

        try:
            # Layer i's output is read at layer i+1's input: after any patch applied at layer i (see module doc).
            for i in range(1, n):
                handles.append(layers[i].register_forward_pre_hook(make_pre(i - 1), with_kwargs=True))
            handles.append(layers[n - 1].register_forward_hook(last_hook))
            for i, module in enumerate(self.attn_modules):
                if module is not None:
                    handles.append(module.register_forward_hook(make_attn(i)))
            if self.lm_head is not None:
                handles.append(self.lm_head.register_forward_pre_hook(head_pre_hook))
            yield
        finally:
            for handle in handles:
                handle.remove()


@contextmanager
def _eager_attention(model: nn.Module) -> Iterator[bool]:
    """Attention weights exist only with the eager implementation: switch to it for the block, then restore."""
    previous = getattr(model.config, "_attn_implementation", None)
    switched = False
    if previous != "eager" and hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("eager")
            switched = True
        except (ValueError, NotImplementedError, AttributeError) as exc:
            logger.warning("could not switch to eager attention (%s); attention shares will be missing", exc)
    try:
        yield switched
    finally:
        if switched and previous is not None:
            model.set_attn_implementation(previous)


# ------------------------------------------------------------------------------------------------ passes
def _batches(n: int, size: int) -> list[range]:
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


@torch.no_grad()
def _record(
    call: Any, recorder: _Recorder, run: _Run, inputs: Any, claim_mask: torch.Tensor, lens: Any, answer_ids: Any,
    processor: Any,
) -> None:
    recorder.prepare(inputs["input_ids"].cpu(), inputs.get("attention_mask"), claim_mask)
    with recorder.hooks():
        output = call(inputs)
    n = len(run.audio_mean)
    missing = [i for i in range(n) if i not in recorder.reduced]
    if missing:
        raise RuntimeError(f"decoder layers {missing} were not reached; is {recorder.resolved.layers_path} the full "
                           "decoder stack?")
    for i in range(n):
        reduced = recorder.reduced[i]
        run.audio_mean[i].append(reduced["audio_mean"])
        run.last[i].append(reduced["last_device"].to("cpu", torch.float32))
        run.claim[i].append(reduced["claim"])
        batch = reduced["claim"].shape[0]
        audio_share, text_share = recorder.attention.get(i, (torch.full((batch,), float("nan")),) * 2)
        run.attn_audio[i].append(audio_share)
        run.attn_text[i].append(text_share)
        for key, value in lens(reduced["last_device"], answer_ids).items():
            run.lens[key][i].append(value)
    logits = output.logits[:, -1].to(torch.float32)
    run.answers += [processor.decode([int(t)], skip_special_tokens=True) for t in logits.argmax(-1)]


def _lens_fn(generator: nn.Module, norm: nn.Module | None):
    """The model's readout (final norm, LM head, soft-cap) on ``[B, H]`` states: probability (summed over the
    answer's start tokens) and best 1-based rank of the audio and the text answer."""

    def lens(states: torch.Tensor, answer_ids: tuple[list[list[int]], list[list[int]]]) -> dict[str, torch.Tensor]:
        logits = readout(generator, states.unsqueeze(1), norm)[:, 0].to(torch.float32).cpu()
        probs = logits.softmax(-1)
        out = {}
        for name, ids_per_row in zip(("audio", "text"), answer_ids, strict=True):
            prob = torch.full((len(ids_per_row),), float("nan"))
            rank = torch.full((len(ids_per_row),), float("nan"))
            for b, ids in enumerate(ids_per_row):
                if ids:
                    prob[b] = probs[b, ids].sum()
                    rank[b] = min(int((logits[b] > logits[b, i]).sum()) + 1 for i in ids)
            out[f"{name}_prob"], out[f"{name}_rank"] = prob, rank
        return out

    return lens


def record_runs(
    wrapped: BackpatchedModel, model: nn.Module, processor: Any, items: Sequence[ConflictItem], batch_size: int,
    progress: bool, has_patches: bool,
) -> dict[str, _Run]:
    """The plain pass (and, with patches, the back-patched pass) over ``items``, batch by batch, in eager attention.
    Returns ``{"plain": run, "backpatched": run}`` (the second empty without patches)."""
    resolved = wrapped.resolved
    num_layers = resolved.num_layers
    tokenizer = getattr(processor, "tokenizer", processor)
    tails = [_claim_tail_offsets(processor, it) for it in items]
    lost = sum(1 for it, t in zip(items, tails, strict=True) if it.kind != "audio_only" and t is None)
    if lost:
        logger.warning("the claim word was not found in %d prompts; they have no text-side states", lost)
    cache: dict[str | None, list[int]] = {}

    def ids_for(word: str | None) -> list[int]:
        if word not in cache:
            cache[word] = _answer_token_ids(tokenizer, word)
        return cache[word]

    head = resolved.generator.get_output_embeddings() if hasattr(resolved.generator, "get_output_embeddings") \
        else None
    if head is None:
        raise ValueError(f"{type(resolved.generator).__name__} has no output embeddings; the logit lens needs one")
    norm = final_norm(resolved.text_model)
    if norm is None:
        logger.warning("no final norm found on %s; the logit lens applies the LM head directly",
                       type(resolved.text_model).__name__)
    lens = _lens_fn(resolved.generator, norm)
    recorder = _Recorder(resolved, [_attention_module(layer) for layer in resolved.layers], head)
    runs = {"plain": _Run(), "backpatched": _Run()}
    for run in runs.values():
        run.init(num_layers)

    def plain_call(inputs: Any) -> Any:
        with wrapped.disabled():
            return wrapped(**inputs, use_cache=False)

    def patched_call(inputs: Any) -> Any:
        return wrapped(**inputs, use_cache=False)

    mismatched = 0
    with _eager_attention(model):
        for chunk in tqdm(_batches(len(items), batch_size), desc="diagnose", unit="batch", disable=not progress):
            batch = [items[i] for i in chunk]
            inputs = encode_items(processor, batch).to(wrapped.device)
            length = inputs["input_ids"].shape[1]
            claim_mask = torch.zeros(len(batch), length, dtype=torch.bool)
            ids_cpu = inputs["input_ids"].cpu()
            for b, i in enumerate(chunk):
                tail = tails[i] or ()
                if all(-length <= off and int(ids_cpu[b, length + off]) == tok for off, tok in tail):
                    for off, _ in tail:
                        claim_mask[b, length + off] = True
                elif tail:
                    mismatched += 1
            answer_ids = ([ids_for(it.audio_answer) for it in batch],
                          [ids_for(it.text_answer) if it.kind == "conflict" else [] for it in batch])
            _record(plain_call, recorder, runs["plain"], inputs, claim_mask, lens, answer_ids, processor)
            if has_patches:
                _record(patched_call, recorder, runs["backpatched"], inputs, claim_mask, lens, answer_ids, processor)
    if mismatched:
        logger.warning("%d prompts tokenized differently inside the batch; their claim word is skipped", mismatched)
    if recorder.attention_missing:
        logger.warning("the attention modules returned no weights; attention shares are missing")
    return runs
