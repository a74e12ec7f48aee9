"""One clip and one prompt answered twice, plainly and with the wrapper's preset (``backpatch run``).

Greedy decoding both times, so the two answers differ only by what the preset does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["SideBySide", "side_by_side"]


@dataclass(frozen=True)
class SideBySide:
    """The plain answer and the answer with the preset, and whether the clip was cut to the model's audio window
    (``window_s``: that window in seconds, ``None`` when the processor names none)."""

    plain: str
    mitigated: str
    truncated: bool
    window_s: float | None


def side_by_side(wrapped: Any, processor: Any, wave: np.ndarray, rate: int, prompt: str, max_new_tokens: int = 32,
                 truncate: bool = False, what: str = "the audio clip") -> SideBySide:
    """Answer ``prompt`` about ``wave`` (at ``rate`` Hz, resampled to the processor's rate) with ``wrapped``
    (a :class:`backpatch.BackpatchedModel`) disabled and enabled. A clip longer than the model's audio window is
    refused naming ``what``, or, with ``truncate``, cut to its first window."""
    import torch

    from .audio_io import fit_to_window, resample
    from .inputs import audio_window_seconds, build_inputs, decode_new_tokens, sampling_rate_of

    limit = audio_window_seconds(processor)
    wave, cut = fit_to_window(wave, rate, limit, truncate, what)
    wave = resample(wave, rate, sampling_rate_of(processor))
    if getattr(wrapped, "takes_waveforms", False):  # another engine (vLLM): the waveform and the prompt
        plain, mitigated = (wrapped.answer(processor, [wave], [prompt], None, max_new_tokens, mitigate=m)[0]
                            for m in (False, True))
        return SideBySide(plain=plain, mitigated=mitigated, truncated=cut, window_s=limit)
    inputs = build_inputs(processor, [wave], [prompt], truncate=truncate).to(wrapped.device)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False)
    with torch.no_grad():
        with wrapped.disabled():
            plain = wrapped.generate(**inputs, **kwargs)
        patched = wrapped.generate(**inputs, **kwargs)
    length = inputs["input_ids"].shape[1]
    return SideBySide(plain=decode_new_tokens(processor, plain, length)[0],
                      mitigated=decode_new_tokens(processor, patched, length)[0], truncated=cut, window_s=limit)
