"""Reading audio files for the CLI, evaluation and the demo: any libsndfile format, mono, resampled."""

from __future__ import annotations

from math import gcd
from pathlib import Path

import numpy as np


class AudioFileError(ValueError):
    """An audio file that cannot be used: missing, unreadable, empty."""


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono float32 waveform of ``path`` and its sampling rate. Cheap enough to validate input early."""
    import soundfile as sf  # imported here so that importing backpatch stays cheap

    path = Path(path)
    if not path.is_file():
        raise AudioFileError(f"audio file not found: {path}")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError/RuntimeError variants
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AudioFileError(f"cannot read {path} as audio ({reason}); use a wav, flac, ogg or mp3 file") from None
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
