"""Turning (audio, prompt) pairs into model inputs, the same way for every supported model (README: "Evaluation").

A user message holding the audio and the prompt text goes through the processor's chat template; the
processor then expands the audio placeholder into one token per audio embedding. Batches are left-padded,
as decoder-only generation needs.

A clip longer than the model's audio window (:func:`audio_window_seconds`) is refused, never silently cut,
unless truncation is asked for: ``truncate=True``, or for code that builds inputs deeper down (calibration's
sweep) the :func:`audio_truncation` context.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np

from .audio_io import fit_to_window

#: whether :func:`build_inputs` cuts long clips when its caller does not say (set by :func:`audio_truncation`)
_TRUNCATE: ContextVar[bool] = ContextVar("backpatch_truncate_audio", default=False)


@contextmanager
def audio_truncation(enabled: bool = True) -> Iterator[None]:
    """Inside, :func:`build_inputs` and :func:`backpatch.answers.encode_items` called without ``truncate``
    cut clips longer than the audio window instead of refusing them (per thread and task)."""
    token = _TRUNCATE.set(bool(enabled))
    try:
        yield
    finally:
        _TRUNCATE.reset(token)


def truncation_enabled(truncate: bool | None = None) -> bool:
    """``truncate`` when given, else the :func:`audio_truncation` setting in force (default off)."""
    return _TRUNCATE.get() if truncate is None else bool(truncate)


def audio_window_seconds(processor: Any) -> float | None:
    """How long a clip the model's processor takes without dropping audio, in seconds; ``None`` if unknown.

    Processors that split long audio into several encoder windows say how far they go (``max_audio_len``:
    Audio Flamingo 3, Music Flamingo, GLM-ASR); processors whose audio defaults turn truncation off take any
    length (Voxtral, Qwen3-Omni): ``None``. Otherwise the feature extractor's window is the limit:
    ``chunk_length`` seconds, or ``n_samples / sampling_rate``.
    """
    max_len = getattr(processor, "max_audio_len", None)
    if isinstance(max_len, (int, float)) and not isinstance(max_len, bool) and max_len > 0:
        return float(max_len)
    defaults = dict(getattr(processor, "audio_kwargs", None) or {})
    kwargs_class = getattr(processor, "valid_processor_kwargs", None)
    defaults.update((getattr(kwargs_class, "_defaults", None) or {}).get("audio_kwargs", {}))
    if defaults.get("truncation") is False:
        return None
    fe = getattr(processor, "feature_extractor", None)
    if fe is None:
        return None
    chunk = getattr(fe, "chunk_length", None)
    if isinstance(chunk, (int, float)) and not isinstance(chunk, bool) and chunk > 0:
        return float(chunk)
    n_samples, rate = getattr(fe, "n_samples", None), getattr(fe, "sampling_rate", None)
    if isinstance(n_samples, int) and n_samples > 0 and rate:
        return n_samples / float(rate)
    return None


def conversation(prompt: str, system: str | None = None) -> list[dict[str, Any]]:
    """One user turn: the audio, then the prompt text (audio first, as audio LLM chat templates expect); with
    ``system``, a system turn before it."""
    turns = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    return turns + [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": prompt}]}]


#: where ``--instruction`` goes: before the question in the user turn, or as a system turn
INSTRUCTION_ROLES = ("user", "system")


def framed(prompt: str, instruction: str | None, role: str = "user", system: str | None = None,
           ) -> tuple[str, str | None]:
    """``(prompt, system)`` with a framing instruction (e.g. "The text may be wrong; answer from the audio.").

    ``system``: the item's own system turn (a claim framed there); a system-role instruction goes before it, in the
    same turn, so the item keeps its claim and gets the instruction."""
    if not instruction:
        return prompt, system
    if role not in INSTRUCTION_ROLES:
        raise ValueError(f"instruction role must be one of {', '.join(INSTRUCTION_ROLES)}, got {role!r}")
    if role == "user":
        return f"{instruction} {prompt}", system
    return prompt, f"{instruction} {system}" if system else instruction


def check_system_turn(processor: Any, instruction: str, what: str = "a system instruction",
                      fix: str = "use --instruction-role user") -> None:
    """Some audio chat templates drop system turns: an instruction (or a claim) placed there would silently do
    nothing."""
    text = processor.apply_chat_template(conversation("?", instruction), add_generation_prompt=True, tokenize=False)
    if instruction not in text:
        raise ValueError(f"this model's chat template drops system turns, so {what} would do nothing: {fix}")


def sampling_rate_of(processor: Any) -> int:
    return int(getattr(processor.feature_extractor, "sampling_rate", 16000))


def build_inputs(processor: Any, audios: Sequence[np.ndarray], prompts: Sequence[str],
                 truncate: bool | None = None, system: str | Sequence[str | None] | None = None) -> Any:
    """Processor outputs (``BatchFeature``) for a batch of waveforms (at the processor's sampling rate) and
    prompts, left-padded.

    A waveform longer than the model's audio window raises :class:`backpatch.audio_io.AudioTooLongError`
    naming its length and the limit; ``truncate=True`` keeps its first window instead (default: off, or the
    :func:`audio_truncation` setting in force). ``system``: a system turn before every prompt, or one per prompt
    (``None`` where a prompt has none).
    """
    if len(audios) != len(prompts):
        raise ValueError(f"got {len(audios)} audio clips for {len(prompts)} prompts")
    limit, rate, cut = audio_window_seconds(processor), sampling_rate_of(processor), truncation_enabled(truncate)
    what = "the audio clip" if len(audios) == 1 else "audio clip {i} of {n}"
    audios = [fit_to_window(a, rate, limit, cut, what.format(i=i + 1, n=len(audios)))[0]
              for i, a in enumerate(audios)]
    texts = chat_texts(processor, prompts, system)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"
    # Pad only the text: a top-level padding=True would also reach the feature extractor and pad the mel
    # features to the longest clip instead of the encoder's window (Audio Flamingo 3, Music Flamingo and GLM-ASR
    # encoders need whole windows).
    return processor(
        text=list(texts), audio=list(audios), sampling_rate=sampling_rate_of(processor), return_tensors="pt",
        text_kwargs={"padding": True},
    )


def chat_texts(processor: Any, prompts: Sequence[str], system: str | Sequence[str | None] | None = None,
               ) -> list[str]:
    """The prompts as the model's chat template writes them (one audio placeholder before each text): what
    :func:`build_inputs` tokenizes, and what another engine (vLLM) is sent, so both answer the same prompt.
    ``system``: one system turn for every prompt, or one per prompt."""
    systems = [system] * len(prompts) if system is None or isinstance(system, str) else list(system)
    if len(systems) != len(prompts):
        raise ValueError(f"got {len(systems)} system turns for {len(prompts)} prompts")
    return [processor.apply_chat_template(conversation(p, s), add_generation_prompt=True, tokenize=False)
            for p, s in zip(prompts, systems, strict=True)]


def decode_new_tokens(processor: Any, sequences: Any, prompt_length: int) -> list[str]:
    """The generated continuation of each row as text, special tokens dropped and whitespace stripped."""
    texts = processor.batch_decode(sequences[:, prompt_length:], skip_special_tokens=True)
    return [t.strip() for t in texts]
