"""Layer-wise diagnostics: where a model keeps, loses and overrides the audio evidence (``backpatch diagnose``).

Back-patching only helps if the audio answer is still *present* in late layers while the model answers the text
(the "suppressed, not erased" finding), and choosing source and target layers for a new model needs to see
where that is true. One pass over a conflict set (README: "Evaluation") records, for every decoder layer (the
*output* of block ``i``, the residual stream after it):

a. **probes**: cross-validated linear probes (multinomial logistic regression, L2, LBFGS, standardized
   features; folds grouped by clip, so one clip is never in train and test) predicting the audio answer from the
   last prompt position and from the mean of the audio positions, under conflict / audio-only / consistent
   prompts (and the text answer under conflict, for contrast);
b. **logit lens** at the last prompt position (final norm + LM head on each layer's output): probability and
   rank of the first token of the audio answer and of the text answer;
c. **convergence**: cosine of centred class means between a digit heard (mean audio-position state of its clips)
   and the same digit read (the claim word's state in conflict prompts), with a mismatched-class baseline,
   linear CKA of the class-mean geometry and a cross-modal nearest-class-mean accuracy; and the same cosine at the
   answer position (last prompt token: audio-only prompts by audio answer vs conflict prompts by text answer);
d. **attention share** from the last prompt position to the audio span and to the claim word (eager attention);
e. all of the above again **with the preset applied** (the back-patched forward, states recorded by our own
   hooks so the patch is visible);
f. a **suggested preset** (source: the latest layer where the audio answer stays decodable under conflict;
   targets: early layers), checked with a small first-token sweep under the no-harm rule of calibration.

Outputs: ``DIR/report.json`` (a ``layers`` list, one object per layer, and ``suggested_preset`` in preset
schema), ``DIR/suggested_preset.yaml``, PNG figures and ``DIR/report.md`` embedding them.

Why our own hooks rather than ``output_hidden_states``: Hugging Face records hidden states with hooks whose
order relative to the engine's patch hooks is an implementation detail. We read layer ``i``'s output as the
*input* of layer ``i + 1`` (and the last layer's output directly; it is never a patch target because source >
target), which is after any patch applied at layer ``i``, whatever the hook order. The tests check this.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._architectures import Resolved, resolve
from ._engine import _hidden, generation_session
from ._positions import audio_mask, last_prompt_mask
from ._probes import (
    chance_rate,
    class_mean_convergence,
    linear_probe,
    probe_layers,
    text_takeover_layer,
)
from .evaluate import (
    ConflictItem,
    check_clip_lengths,
    encode_items,
    judge,
    load_conflict_set,
    metrics,
    truncation_line,
)
from .inputs import audio_truncation, conversation, truncation_enabled
from .preset import AudioSpan, Calibration, Match, ModelFacts, Patch, Preset, PresetError
from .wrapper import preset_for

__all__ = ["diagnose", "linear_probe", "probe_layers", "class_mean_convergence", "text_takeover_layer"]

logger = logging.getLogger(__name__)

KINDS = ("conflict", "audio_only", "consistent")
#: (mode, scale, positions) tried for every (source, target) in the suggestion sweep: the organism's best
#: no-harm setting (last-token replace), a gentler add at the last token, and classic audio-span add
SWEEP_COMBOS = (("replace", 1.0, "last"), ("add", 1.0, "last"), ("add", 1.0, "audio"))


#: how each curve is computed, copied into every report
METHODS = {
    "probe": "multinomial logistic regression, L2 1/n_train, LBFGS (100 iterations), standardized features, "
             "5-fold CV grouped by clip",
    "lens": "final norm + LM head on each layer's last-prompt-position state; probability summed over the "
            "answer word's possible first tokens, best rank",
    "convergence": "cosine of centred class means (audio: mean audio-position state per clip; text: claim-word "
                   "state in conflict prompts); convergence_answer: the same at the last prompt position "
                   "(audio-only prompts by audio answer vs conflict prompts by text answer)",
    "attention": "eager attention weights, mean over heads, from the last prompt position",
}


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
    rendered = processor.apply_chat_template(conversation(item.prompt), add_generation_prompt=True, tokenize=False)
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
            self._reduce(n - 1, _hidden(output).detach())

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


def _module_device(module: nn.Module) -> torch.device | None:
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    return None


def _final_norm(text_model: nn.Module) -> nn.Module | None:
    for name in ("norm", "final_layernorm", "ln_f", "final_norm"):
        module = getattr(text_model, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


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


def _lens_fn(norm: nn.Module | None, head: nn.Module):
    """Final norm + LM head on ``[B, H]`` states: probability (summed over the answer's start tokens) and best
    1-based rank of the audio and the text answer."""

    def lens(states: torch.Tensor, answer_ids: tuple[list[list[int]], list[list[int]]]) -> dict[str, torch.Tensor]:
        x = states.unsqueeze(1)
        if norm is not None:
            device = _module_device(norm)
            x = norm(x.to(device) if device is not None else x)
        device = _module_device(head)
        logits = head(x.to(device) if device is not None else x)[:, 0].to(torch.float32).cpu()
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


# ------------------------------------------------------------------------------------------------ analysis
def _nanmean(values: torch.Tensor) -> float | None:
    values = values[torch.isfinite(values)]
    return float(values.mean()) if values.numel() else None


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    return value


def _analyse(run: _Run, items: Sequence[ConflictItem], num_layers: int, progress: bool, label: str) -> dict:
    """Per-layer curves of one pass: probes, lens, convergence and attention."""
    kinds = np.array([it.kind for it in items])
    clips = [str(it.audio) for it in items]
    audio_labels = [it.audio_answer for it in items]
    last, audio_mean, claim = run.stacked("last"), run.stacked("audio_mean"), run.stacked("claim")
    lens = {k: run.stacked(k) for k in run.lens}
    attn_audio, attn_text = run.stacked("attn_audio"), run.stacked("attn_text")
    select = {k: np.flatnonzero(kinds == k) for k in KINDS}
    conflict = torch.from_numpy(select["conflict"])
    # unique clips for the audio side of convergence (their audio states do not depend on the prompt)
    first_of_clip = sorted({c: i for i, c in reversed(list(enumerate(clips)))}.values())
    clip_index = torch.tensor(first_of_clip, dtype=torch.long)
    probes: dict[str, list[float | None]] = {}
    jobs = [(f"probe_audio_{kind}", last, kind, "audio") for kind in KINDS]
    jobs += [(f"probe_audio_span_{kind}", audio_mean, kind, "audio") for kind in KINDS]
    jobs += [("probe_text_conflict", last, "conflict", "text")]
    for key, states, kind, target in tqdm(jobs, desc=f"probes ({label})", unit="probe", disable=not progress):
        idx = select[kind]
        if not len(idx):
            probes[key] = [None] * num_layers
            continue
        lab = [items[j].audio_answer if target == "audio" else items[j].text_answer for j in idx]
        probes[key] = probe_layers(states[:, torch.from_numpy(idx)], lab, [clips[j] for j in idx])
    idx = select["conflict"]
    layers = []
    for i in range(num_layers):
        row: dict[str, Any] = {"layer": i, **{key: values[i] for key, values in probes.items()}}
        for key in ("audio_prob", "text_prob", "audio_rank", "text_rank"):
            row[f"lens_{key}"] = _nanmean(lens[key][i][conflict]) if len(idx) else None
        for kind in ("audio_only", "consistent"):
            rows = torch.from_numpy(select[kind])
            row[f"lens_audio_prob_{kind}"] = _nanmean(lens["audio_prob"][i][rows]) if len(rows) else None
        conv = class_mean_convergence(audio_mean[i][clip_index], [audio_labels[j] for j in first_of_clip],
                                      claim[i][conflict], [items[j].text_answer for j in idx])
        row["convergence"] = conv["cosine"]
        row["convergence_baseline"] = conv["baseline"]
        row["convergence_cka"] = conv["cka"]
        row["convergence_nc_acc"] = conv["nc_acc"]
        audio_only = select["audio_only"]
        answer = class_mean_convergence(last[i][torch.from_numpy(audio_only)], [audio_labels[j] for j in audio_only],
                                        last[i][conflict], [items[j].text_answer for j in idx])
        row["convergence_answer"] = answer["cosine"]
        row["attn_audio"] = _nanmean(attn_audio[i][conflict]) if len(idx) else None
        row["attn_text"] = _nanmean(attn_text[i][conflict]) if len(idx) else None
        for kind in ("audio_only", "consistent"):
            rows = torch.from_numpy(select[kind])
            row[f"attn_audio_{kind}"] = _nanmean(attn_audio[i][rows]) if len(rows) else None
            row[f"attn_text_{kind}"] = _nanmean(attn_text[i][rows]) if len(rows) else None
        layers.append({k: _round(v) for k, v in row.items()})
    return {"layers": layers}


# ------------------------------------------------------------------------------------------------- sweep
def _sweep_candidates(layers: list[dict], num_layers: int) -> tuple[list[int], list[int]]:
    """Sources: the latest layer whose conflict probe accuracy is within 0.05 of the best, and the last layer;
    targets: layer 0 and the first quarter (early, where the audio is read in)."""
    scores = [(row["layer"], row["probe_audio_conflict"]) for row in layers[1:] if row["probe_audio_conflict"]
              is not None]
    sources = {num_layers - 1}
    if scores:
        best = max(p for _, p in scores)
        sources.add(max(layer for layer, p in scores if p >= best - 0.05))
    targets = sorted({0, num_layers // 4})
    return sorted(s for s in sources if s > targets[0]), targets


def _sweep(
    model: nn.Module, processor: Any, base: Preset, items: Sequence[ConflictItem], layers: list[dict],
    batch_size: int, max_harm: float, progress: bool,
) -> tuple[list[dict], dict, Any]:
    """First-token TDR of a handful of settings (calibration's reuse of one capture per batch)."""
    from .calibrate import Setting, _first_token_answers, _prepare, passes_no_harm
    from .wrapper import wrap

    num_layers = len(layers)
    sources, targets = _sweep_candidates(layers, num_layers)
    settings = [Setting(s, t, scale, mode, positions) for s in sources for t in targets if s > t
                for mode, scale, positions in SWEEP_COMBOS]
    probe_preset = Preset(patches=[Patch(source=max(sources), target=min(targets))], name=base.name,
                          model=base.model, audio_span=base.audio_span, match=base.match)
    wrapped = wrap(model, probe_preset, processor=processor)
    grid = {"sources": sources, "positions": sorted({p for _, _, p in SWEEP_COMBOS})}
    batches, plain_answers = _prepare(wrapped, processor, list(items), grid, batch_size, progress)
    plain = metrics(items, [judge(a, it) for a, it in zip(plain_answers, items, strict=True)])
    rows = []
    for setting in tqdm(settings, desc="suggestion sweep", unit="setting", disable=not progress):
        preset = Preset(patches=[setting.patch()], name=base.name, model=base.model, audio_span=base.audio_span,
                        match=base.match)
        resolved = resolve(model, preset, processor)
        answers = []
        for batch in batches:
            with generation_session(resolved, precaptured=batch.states):
                answers += _first_token_answers(resolved.generator, processor, batch.inputs)
        m = metrics(items, [judge(a, it) for a, it in zip(answers, items, strict=True)])
        rows.append({"setting": setting.label(), "patch": Patch(setting.source, setting.target, setting.scale,
                                                                setting.mode, setting.positions),
                     "metrics": m, "no_harm": passes_no_harm(m, plain, max_harm)})
    return rows, plain, wrapped.resolved


def _suggest(rows: list[dict], plain: dict, base: Preset, resolved: Resolved, model: nn.Module, data: str,
             n_items: int) -> Preset:
    def key(r: dict) -> tuple[float, float]:
        m = r["metrics"]
        return (m["tdr"] if m["tdr"] is not None else 1.0, -(m["afr"] or 0.0))

    eligible = sorted((r for r in rows if r["no_harm"]), key=key)
    best = eligible[0] if eligible else sorted(rows, key=key)[0]
    m = best["metrics"]
    improves = plain["tdr"] is not None and m["tdr"] is not None and m["tdr"] < plain["tdr"]
    verdict = ("lowers first-token TDR" if improves else "does NOT lower first-token TDR (no setting did)")
    harm = "passes" if best["no_harm"] else "FAILS"
    description = (
        f"Suggested by `backpatch diagnose` on {Path(data).name} ({n_items} items): source where the audio answer "
        f"stays decodable under conflict late, targets early; best of {len(rows)} first-token settings, {verdict}: "
        f"TDR {plain['tdr']} -> {m['tdr']}, audio-only {plain['audio_only_acc']} -> {m['audio_only_acc']}, "
        f"consistent {plain['consistent_acc']} -> {m['consistent_acc']}; {harm} the no-harm rule. First-token "
        "proxy only: run `backpatch calibrate` (verified with generate) before relying on it."
    )
    values = {}
    for name in ("tdr", "afr", "audio_only_acc", "consistent_acc"):
        for suffix, source in (("before", plain), ("after", m)):
            if source[name] is not None:
                values[f"{name}_{suffix}"] = float(source[name])
    config = model.config
    return Preset(
        patches=[best["patch"]],
        name=f"{base.name}-suggested" if base.name and base.name != "custom" else "suggested",
        description=description,
        match=base.match or Match(model_type=config.model_type),
        model=ModelFacts(layers=resolved.layers_path, num_layers=resolved.num_layers),
        audio_span=base.audio_span or AudioSpan(token_id=resolved.audio_token_id),
        calibration=Calibration(status="uncalibrated", data=str(data), metrics=values),
    )


# ------------------------------------------------------------------------------------------------- entry
def diagnose(
    model: nn.Module,
    processor: Any,
    data: str | Path,
    out_dir: str | Path,
    preset: Preset | str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
    *,
    sweep: bool = True,
    max_harm: float = 0.02,
    truncate: bool | None = None,
) -> dict[str, Any]:
    """Run the layer-wise diagnostics on a conflict set and write the report to ``out_dir``.

    ``preset`` (a :class:`Preset`, bundled name or YAML path; default: the bundled preset matching the model)
    gives the back-patched curves and the layer path / audio span; without one only plain curves are drawn.
    Works on fp16/bf16 models (states are cast to float32 on the CPU as they are collected) and on models
    dispatched with ``device_map``. Returns the report (also written as ``report.json``).

    Clips longer than the model's audio window are refused before any model work, naming every such item,
    unless ``truncate=True``; then ``report["truncated_audio"]`` (and a line of ``report.md``) says which were cut.
    """
    truncate = truncation_enabled(truncate)
    items = load_conflict_set(data, limit)
    truncated = check_clip_lengths(items, processor, truncate)
    with audio_truncation(truncate):  # the suggestion sweep builds its inputs deep down: it inherits the choice
        return _diagnose(model, processor, data, out_dir, preset, limit, batch_size, progress, sweep, max_harm,
                         items, truncated)


def _diagnose(model, processor, data, out_dir, preset, limit, batch_size, progress, sweep, max_harm, items,
              truncated) -> dict[str, Any]:
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        chosen = preset_for(model, preset)
    except PresetError:
        if preset is not None:
            raise
        logger.warning("no bundled preset matches this model; the back-patched curves are skipped")
        chosen = None
    # the layers are studied without contrastive decoding
    base = (dataclasses.replace(chosen, contrastive=None) if chosen is not None
            else Preset(patches=[Patch(source=1, target=0)]))
    if chosen is not None and chosen.contrastive is not None:
        logger.info("diagnose shows back-patching only; the preset's contrastive block is ignored")
    has_patches = chosen is not None and bool(base.patches)
    if not has_patches:  # resolve needs some patch; it only supplies layers and the audio span then
        base = Preset(patches=[Patch(source=1, target=0)], name=base.name, match=base.match, model=base.model,
                      audio_span=base.audio_span)
    from .wrapper import wrap

    wrapped = wrap(model, base, processor=processor)
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
    norm = _final_norm(resolved.text_model)
    if norm is None:
        logger.warning("no final norm found on %s; the logit lens applies the LM head directly",
                       type(resolved.text_model).__name__)
    lens = _lens_fn(norm, head)
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

    plain = _analyse(runs["plain"], items, num_layers, progress, "plain")
    layers = plain["layers"]
    if has_patches:
        patched = _analyse(runs["backpatched"], items, num_layers, progress, "back-patched")["layers"]
        for row, prow in zip(layers, patched, strict=True):
            row.update({f"{k}_patched": v for k, v in prow.items() if k != "layer"})
    first_token = {name: metrics(items, [judge(a, it) for a, it in zip(run.answers, items, strict=True)])
                   for name, run in runs.items() if run.answers}

    sweep_rows: list[dict] = []
    if sweep:
        sweep_rows, sweep_plain, sweep_resolved = _sweep(model, processor, base, items, layers, batch_size,
                                                         max_harm, progress)
        suggested = _suggest(sweep_rows, sweep_plain, base, sweep_resolved, model, str(data), len(items))
    else:
        sources, targets = _sweep_candidates(layers, num_layers)
        suggested = Preset(patches=[Patch(source=sources[-1], target=targets[0], mode="replace", positions="last")],
                           name="suggested", description="Suggested by `backpatch diagnose` without a sweep.",
                           match=base.match or Match(model_type=model.config.model_type),
                           model=ModelFacts(layers=resolved.layers_path, num_layers=num_layers),
                           audio_span=base.audio_span or AudioSpan(token_id=resolved.audio_token_id))
    suggested.to_yaml(out_dir / "suggested_preset.yaml")

    report = _assemble(model, data, items, chosen if has_patches else None, layers, first_token, sweep_rows,
                       suggested, batch_size, limit, started)
    if truncated is not None:
        report["truncated_audio"] = truncated
    figures = _plot(report, out_dir)
    report["figures"] = figures
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(_markdown(report), encoding="utf-8")
    logger.info("diagnostics written to %s in %.0f s", out_dir, time.perf_counter() - started)
    return report


def _assemble(model, data, items, preset, layers, first_token, sweep_rows, suggested, batch_size, limit,
              started) -> dict[str, Any]:
    counts = {k: sum(1 for it in items if it.kind == k) for k in KINDS}
    audio_labels = [it.audio_answer for it in items if it.kind == "conflict"]
    last = layers[-1]
    best = max(((r["probe_audio_conflict"], r["layer"]) for r in layers if r["probe_audio_conflict"] is not None),
               default=(None, None))
    summary = {
        "chance_audio_conflict": _round(chance_rate(audio_labels)) if audio_labels else None,
        "probe_audio_conflict_last_layer": last["probe_audio_conflict"],
        "probe_text_conflict_last_layer": last["probe_text_conflict"],
        "best_probe_audio_conflict": best[0],
        "best_probe_audio_conflict_layer": best[1],
        "lens_audio_prob_last_layer": last["lens_audio_prob"],
        "lens_text_prob_last_layer": last["lens_text_prob"],
        "lens_audio_rank_last_layer": last["lens_audio_rank"],
        "text_takeover_layer": text_takeover_layer([r["lens_audio_prob"] for r in layers],
                                                   [r["lens_text_prob"] for r in layers]),
        "convergence_first_layer": layers[0]["convergence"],
        "convergence_last_layer": last["convergence"],
        "convergence_nc_acc_first_layer": layers[0]["convergence_nc_acc"],
        "convergence_nc_acc_last_layer": last["convergence_nc_acc"],
        "convergence_answer_first_layer": layers[0]["convergence_answer"],
        "convergence_answer_last_layer": last["convergence_answer"],
    }
    if preset is not None:
        summary["text_takeover_layer_patched"] = text_takeover_layer(
            [r["lens_audio_prob_patched"] for r in layers], [r["lens_text_prob_patched"] for r in layers])
    return {
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "data": str(data),
        "preset": preset.to_dict() if preset is not None else None,
        "n_items": len(items),
        "counts": counts,
        "settings": {"batch_size": batch_size, "limit": limit, **METHODS},
        "num_layers": len(layers),
        "first_token": first_token,
        "summary": summary,
        "layers": layers,
        "sweep": [{"setting": r["setting"], "no_harm": r["no_harm"],
                   **{k: r["metrics"][k] for k in ("tdr", "afr", "audio_only_acc", "consistent_acc")}}
                  for r in sweep_rows],
        "suggested_preset": suggested.to_dict(),
        "seconds": round(time.perf_counter() - started, 1),
    }


# ------------------------------------------------------------------------------------------------- output
def _series(layers: list[dict], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else r[key] for r in layers], dtype=float)


def _plot(report: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    x = np.arange(len(layers))
    patched = report["preset"] is not None
    chance = report["summary"]["chance_audio_conflict"]
    figures = []

    def finish(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        figures.append(name)

    def with_preset_note(ax, **kwargs):
        if patched:
            ax.plot([], [], ":", color="black", label="dotted: with preset")
        ax.legend(**kwargs)

    def curve(ax, key, label, color, style="-", marker="o"):
        ax.plot(x, _series(layers, key), style, color=color, marker=marker, ms=3, label=label)
        if patched and f"{key}_patched" in layers[0]:
            ax.plot(x, _series(layers, f"{key}_patched"), ":", color=color, marker=marker, ms=2, alpha=0.8)

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, prefix, title in ((axes[0], "probe_audio", "last prompt position"),
                              (axes[1], "probe_audio_span", "mean of audio positions")):
        curve(ax, f"{prefix}_conflict", "audio answer | conflict", "C3")
        curve(ax, f"{prefix}_audio_only", "audio answer | audio-only", "C0")
        curve(ax, f"{prefix}_consistent", "audio answer | consistent", "C2")
        if prefix == "probe_audio":
            curve(ax, "probe_text_conflict", "text answer | conflict", "C7", "--", "s")
        if chance is not None:
            ax.axhline(chance, color="grey", lw=0.8, ls="--", label="chance")
        ax.set_title(f"probe accuracy, {title}", fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("cross-validated accuracy")
    with_preset_note(axes[0], fontsize=7, loc="lower right")
    finish(fig, "probes.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    curve(axes[0], "lens_audio_prob", "audio answer", "C0")
    curve(axes[0], "lens_text_prob", "text answer", "C3")
    curve(axes[0], "lens_audio_prob_audio_only", "audio answer, audio-only prompt", "C2", "--", "s")
    axes[0].set_ylabel("mean probability")
    axes[0].set_ylim(0, 1.02)
    curve(axes[1], "lens_audio_rank", "audio answer", "C0")
    curve(axes[1], "lens_text_rank", "text answer", "C3")
    axes[1].set_yscale("log")
    ticks = [t for t in (1, 2, 3, 5, 10, 20, 50, 100, 1000, 10000) if t <= max(2.0, np.nanmax(
        _series(layers, "lens_audio_rank")) * 1.5)]
    axes[1].set_yticks(ticks, [str(t) for t in ticks])
    axes[1].invert_yaxis()
    axes[1].set_ylabel("mean rank (1 = top), conflict items")
    takeover = report["summary"]["text_takeover_layer"]
    for ax in axes:
        ax.set_xlabel("layer")
        if takeover is not None:
            ax.axvline(takeover, color="grey", lw=0.8, ls="--")
    axes[0].set_title("logit lens at the last prompt position" + (f" (text ahead from layer {takeover})"
                                                                  if takeover is not None else ""), fontsize=10)
    with_preset_note(axes[0], fontsize=7, loc="center right")
    finish(fig, "logit_lens.png")

    fig, ax = plt.subplots(figsize=(9.5, 3.8))
    curve(ax, "convergence", "cosine, same digit", "C4")
    curve(ax, "convergence_baseline", "cosine, different digits", "C7", "--", "s")
    curve(ax, "convergence_nc_acc", "nearest text class mean accuracy", "C1", "-", "^")
    curve(ax, "convergence_cka", "linear CKA of class means", "C9", "-.", "d")
    curve(ax, "convergence_answer", "cosine at the answer position\n(audio-only by audio vs conflict by text)", "C5",
          "--", "v")
    ax.set_xlabel("layer")
    ax.set_title("audio vs text representation of the same digit", fontsize=10)
    ax.set_ylim(-0.3, 1.02)
    with_preset_note(ax, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    finish(fig, "convergence.png")

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    curve(ax, "attn_audio", "to audio span | conflict", "C0")
    curve(ax, "attn_text", "to claim word | conflict", "C3")
    curve(ax, "attn_audio_audio_only", "to audio span | audio-only", "C2", "--", "s")
    ax.set_xlabel("layer")
    ax.set_ylabel("attention mass from last prompt position")
    ax.set_title("attention share (mean over heads)", fontsize=10)
    ax.set_ylim(0, 1.02)
    with_preset_note(ax, fontsize=7)
    finish(fig, "attention.png")
    return figures


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _takeover_text(layer: int | None) -> str:
    if layer is None:
        return "the text answer is not ahead of the audio answer at the last layer."
    return f"the text answer is ahead of the audio answer from layer {layer} on."


def _markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    layers = report["layers"]
    patched = report["preset"] is not None
    lines = [
        "# backpatch diagnose",
        "",
        f"Model `{report['model']}` ({report['num_layers']} decoder layers), data `{report['data']}`: "
        f"{report['counts']['conflict']} conflict, {report['counts']['consistent']} consistent, "
        f"{report['counts']['audio_only']} audio-only items."
        + (f" Preset `{report['preset']['name']}` (dotted lines in the figures)." if patched else ""),
        "",
    ]
    truncation = truncation_line(report.get("truncated_audio"))
    if truncation:
        lines += [truncation[0].upper() + truncation[1:] + ".", ""]
    ft = report["first_token"]
    if ft:
        lines += ["| first-token answers (argmax at the last prompt position) | TDR | AFR | audio-only acc | "
                  "consistent acc |", "|---|---|---|---|---|"]
        for name, m in ft.items():
            lines.append(f"| {name} | {_fmt(m['tdr'])} | {_fmt(m['afr'])} | {_fmt(m['audio_only_acc'])} | "
                         f"{_fmt(m['consistent_acc'])} |")
        lines.append("")
    lines += [
        "## Summary",
        "",
        f"- Audio answer decodable at the last prompt position under conflict, last layer: "
        f"{_fmt(s['probe_audio_conflict_last_layer'])} (chance {_fmt(s['chance_audio_conflict'])}; best "
        f"{_fmt(s['best_probe_audio_conflict'])} at layer {_fmt(s['best_probe_audio_conflict_layer'])}); text answer: "
        f"{_fmt(s['probe_text_conflict_last_layer'])}.",
        f"- Logit lens, last layer (conflict): audio answer p = {_fmt(s['lens_audio_prob_last_layer'])} "
        f"(mean rank {_fmt(s['lens_audio_rank_last_layer'], 2)}), text answer p = "
        f"{_fmt(s['lens_text_prob_last_layer'])}; " + _takeover_text(s.get("text_takeover_layer"))
        + (f" With the preset: {_takeover_text(s.get('text_takeover_layer_patched'))}" if patched else ""),
        f"- Convergence (cosine of centred class means, audio vs claim word): layer 0 "
        f"{_fmt(s['convergence_first_layer'])}, last layer {_fmt(s['convergence_last_layer'])}; nearest-class "
        f"accuracy {_fmt(s['convergence_nc_acc_first_layer'])} -> {_fmt(s['convergence_nc_acc_last_layer'])}; at "
        f"the answer position (audio-only vs conflict prompts): {_fmt(s['convergence_answer_first_layer'])} -> "
        f"{_fmt(s['convergence_answer_last_layer'])}.",
        f"- Attention from the last prompt position, layer 0: {_fmt(layers[0]['attn_audio'])} to the audio span, "
        f"{_fmt(layers[0]['attn_text'])} to the claim word; last layer: {_fmt(layers[-1]['attn_audio'])} and "
        f"{_fmt(layers[-1]['attn_text'])}.",
        "",
        "## Figures",
        "",
        "Solid: plain; dotted: with the preset." if patched else "",
        "",
    ]
    lines += [f"![{name[:-4]}]({name})" for name in report["figures"]]
    cols = ["layer", "probe_audio_conflict", "probe_audio_audio_only", "probe_text_conflict", "lens_audio_prob",
            "lens_text_prob", "convergence", "convergence_nc_acc", "attn_audio", "attn_text"]
    if patched:
        cols += ["probe_audio_conflict_patched", "lens_audio_prob_patched", "lens_text_prob_patched"]
    lines += ["", "## Per layer", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in layers:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    if report["sweep"]:
        lines += ["", "## Suggestion sweep (first-token answers)", "",
                  "Scored on the same items as the curves: choose a preset on a validation split, not on test data.",
                  "",
                  "| setting | TDR | AFR | audio-only | consistent | no harm |", "|---|---|---|---|---|---|"]
        for r in report["sweep"]:
            lines.append(f"| {r['setting']} | {_fmt(r['tdr'])} | {_fmt(r['afr'])} | {_fmt(r['audio_only_acc'])} | "
                         f"{_fmt(r['consistent_acc'])} | {'yes' if r['no_harm'] else 'no'} |")
    yaml_text = Preset.from_dict(report["suggested_preset"]).to_yaml()
    lines += ["", "## Suggested preset (`suggested_preset.yaml`)", "", "```yaml", yaml_text.rstrip(), "```", "",
              "Methods: " + "; ".join(f"{k}: {v}" for k, v in report["settings"].items() if isinstance(v, str)) + ".",
              ""]
    return "\n".join(lines)
