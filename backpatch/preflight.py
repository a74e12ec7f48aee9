"""Cheap checks before a model that may take minutes loads (the CLI's ``run``, ``eval``, ``calibrate``, ``diagnose``).

The model's processor is read from its files alone, without the model, and a clip or a conflict set is measured
against it: a clip longer than the model's audio window, a broken conflict set or one whose labels the model cannot
write fails here, in one sentence, not after the model has loaded. When the processor cannot be read alone the checks
are skipped: the library checks again after loading.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["check_clip", "check_data", "processor_alone"]

logger = logging.getLogger(__name__)


def processor_alone(model: str | None, trust_remote_code: bool = False) -> Any | None:
    """The model's processor read from its files without the model (cheap), to measure clips before a model that
    may take minutes loads; ``None`` when it cannot be read alone (the library checks again after loading).

    ``model`` is what ``--model`` takes (``None``: the default organism); an unknown organism name raises."""
    from transformers import AutoProcessor

    from .loading import resolve_model_id

    model_id = resolve_model_id(model)  # an unknown organism name is a user error: raise it
    try:
        return AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - loading the model reports a missing or odd checkpoint clearly
        logger.debug("processor of %s not readable alone (%s)", model_id, exc)
        return None


def check_clip(wave: np.ndarray, rate: int, model: str | None, truncate: bool = False, what: str = "the audio clip",
               trust_remote_code: bool = False) -> None:
    """A clip longer than the model's audio window fails here (unless ``truncate``), before a model is loaded."""
    from .audio_io import fit_to_window
    from .inputs import audio_window_seconds

    early = processor_alone(model, trust_remote_code)
    if early is not None:
        fit_to_window(wave, rate, audio_window_seconds(early), truncate, what)


def check_data(data: str | Path, model: str | None, limit: int | None = None, truncate: bool = False,
               trust_remote_code: bool = False) -> None:
    """A bad conflict set, or clips longer than the model's audio window, fail here, before a model is loaded;
    so do a set none of whose labels the model can write and system-turn claims the chat template would drop."""
    from .answerability import check_labels
    from .evaluate import check_clip_lengths, check_system_turns, load_conflict_set

    items = load_conflict_set(data, limit)
    early = processor_alone(model, trust_remote_code)
    if early is not None:
        check_clip_lengths(items, early, truncate)
        check_system_turns(items, early)
        check_labels(items, early)  # a set none of whose labels the model can write is refused here
