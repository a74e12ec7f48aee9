"""Turning (audio, prompt) pairs into model inputs, the same way for every supported model (DESIGN section 4).

A user message holding the audio and the prompt text goes through the processor's chat template; the
processor then expands the audio placeholder into one token per audio embedding. Batches are left-padded,
as decoder-only generation needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def conversation(prompt: str) -> list[dict[str, Any]]:
    """One user turn: the audio, then the prompt text (audio first, as audio LLM chat templates expect)."""
    return [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": prompt}]}]


def sampling_rate_of(processor: Any) -> int:
    return int(getattr(processor.feature_extractor, "sampling_rate", 16000))


def build_inputs(processor: Any, audios: Sequence[np.ndarray], prompts: Sequence[str]) -> Any:
    """Processor outputs (``BatchFeature``) for a batch of waveforms and prompts, left-padded."""
    if len(audios) != len(prompts):
        raise ValueError(f"got {len(audios)} audio clips for {len(prompts)} prompts")
    texts = [
        processor.apply_chat_template(conversation(p), add_generation_prompt=True, tokenize=False) for p in prompts
    ]
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


def decode_new_tokens(processor: Any, sequences: Any, prompt_length: int) -> list[str]:
    """The generated continuation of each row as text, special tokens dropped and whitespace stripped."""
    texts = processor.batch_decode(sequences[:, prompt_length:], skip_special_tokens=True)
    return [t.strip() for t in texts]
