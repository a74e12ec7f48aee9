"""The model organism: a tiny real-architecture audio LLM trained here on synthetic spoken digits.

It is a genuine ``Qwen2AudioForConditionalGeneration`` with its processor, saved with ``save_pretrained``
inside the package, so it loads offline like a hub checkpoint and serves as the default model of every
command (DESIGN section 4b).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["AUDIO_ONLY_TEMPLATE", "CLAIM_TEMPLATE", "DIGITS", "examples_path", "path"]

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: conflict / consistent prompts (DESIGN section 4b)
CLAIM_TEMPLATE = 'The speaker says "{claim}". Which digit is spoken?'
#: audio-only prompt
AUDIO_ONLY_TEMPLATE = "Which digit is spoken?"

_HERE = Path(__file__).resolve().parent


def path() -> Path:
    """Directory of the shipped organism checkpoint (model + processor, ``from_pretrained``-loadable)."""
    return _HERE / "digits"


def examples_path() -> Path:
    """``examples.jsonl`` of the shipped example clips (a small subset of the held-out test voices)."""
    return _HERE / "examples" / "examples.jsonl"
