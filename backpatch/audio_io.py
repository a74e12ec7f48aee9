"""Reading audio files for the CLI, evaluation and the demo: any libsndfile format, mono, resampled.

Also the one rule for clips longer than the model's audio window (:func:`fit_to_window`): refused with one
sentence naming the clip's length and the limit, unless the caller opts in to truncation.
"""

from __future__ import annotations

from math import gcd
from pathlib import Path

import numpy as np


class AudioFileError(ValueError):
    """An audio file that cannot be used: missing, unreadable, empty."""


class AudioTooLongError(AudioFileError):
    """A clip longer than the model's audio window, and truncation was not asked for."""


#: how a refusal tells the user to opt in to truncation (the CLI flag and the Python keyword)
TRUNCATE_HINT = "pass --truncate-audio (truncate=True in Python) to use only the first {limit:g} s"


def too_long_message(what: str, seconds: float, limit_s: float) -> str:
    """The one sentence (without its end) that refuses a long clip: its length and the model's limit."""
    return (f"{what} is {seconds:.2f} s long, but this model accepts at most {limit_s:g} s of audio "
            "(its processor's audio window)")


def exceeds_window(seconds: float, limit_s: float | None) -> bool:
    """Whether a clip of ``seconds`` is longer than a window of ``limit_s`` (``None``: no known limit)."""
    return limit_s is not None and seconds > limit_s + 1e-6


def fit_to_window(wave: np.ndarray, rate: int, limit_s: float | None, truncate: bool = False,
                  what: str = "the audio clip") -> tuple[np.ndarray, bool]:
    """``(wave, truncated)``: ``wave`` itself when it fits the window of ``limit_s`` seconds (``None``: no known
    limit), its first ``limit_s`` seconds when ``truncate``, else :class:`AudioTooLongError`."""
    if not exceeds_window(len(wave) / rate, limit_s):
        return wave, False
    if not truncate:
        raise AudioTooLongError(f"{too_long_message(what, len(wave) / rate, limit_s)}; trim it, or "
                                f"{TRUNCATE_HINT.format(limit=limit_s)}")
    return wave[: int(round(limit_s * rate))], True


def clip_seconds(path: str | Path) -> float:
    """The length of an audio file in seconds, from its header (no decoding), else by reading it."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
        if info.frames > 0 and info.samplerate > 0:
            return info.frames / info.samplerate
    except Exception:  # noqa: BLE001 - an unreadable header: read_audio below names the problem
        pass
    wave, rate = read_audio(path)
    return len(wave) / rate


def unreadable_reason(exc: Exception) -> str:
    """Why libsndfile could not read a file, in its own words, without the Python object it was given: its message
    for an in-memory file reads "Error opening <_io.BytesIO object at 0x7f...>", which tells a user nothing."""
    reason = getattr(exc, "error_string", None) or (str(exc).splitlines()[0] if str(exc) else "")
    return str(reason).rstrip(".") or type(exc).__name__


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono float32 waveform of ``path`` and its sampling rate. Cheap enough to validate input early."""
    import soundfile as sf  # imported here so that importing backpatch stays cheap

    path = Path(path)
    if not path.is_file():
        raise AudioFileError(f"audio file not found: {path}")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError/RuntimeError variants
        raise AudioFileError(f"cannot read {path} as audio ({unreadable_reason(exc)}); use a wav, flac, ogg or mp3 "
                             "file") from None
    if data.size == 0:
        raise AudioFileError(f"{path} contains no audio samples")
    return data.mean(axis=1), int(rate)


def resample(wave: np.ndarray, rate: int, sampling_rate: int) -> np.ndarray:
    """Polyphase resampling (scipy) from ``rate`` to ``sampling_rate``; a no-op when they agree."""
    if rate != sampling_rate:
        from scipy.signal import resample_poly

        common = gcd(rate, sampling_rate)
        wave = resample_poly(wave, sampling_rate // common, rate // common)
    return np.asarray(wave, dtype=np.float32)


def load_audio(path: str | Path, sampling_rate: int) -> np.ndarray:
    """Mono float32 waveform of ``path`` at ``sampling_rate``."""
    wave, rate = read_audio(path)
    return resample(wave, rate, sampling_rate)
