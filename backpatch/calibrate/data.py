"""The calibration data: the clean and stress items a calibration runs on, and what is said about them.

Two warnings guard the numbers a calibration reports: data that is the organism's test voices (tuning on test
data makes every later number on it optimistic, :func:`_warn_about_data`), and too few conflict items for a search
among many settings (the standard error of a TDR measured on them, :func:`conflict_count_warning`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

from ..evaluate import load_conflict_set

logger = logging.getLogger(__name__)

#: the standard error (at p = 0.5) of a TDR that a calibration set should reach: 3 points
TARGET_SE = 0.03


def tdr_standard_error(n_conflict: int, p: float = 0.5) -> float:
    """sqrt(p (1 - p) / n): the standard error of a rate measured on ``n_conflict`` items (largest at p = 0.5)."""
    return math.sqrt(p * (1 - p) / n_conflict) if n_conflict > 0 else math.inf


def conflicts_for(se: float = TARGET_SE, p: float = 0.5) -> int:
    """How many conflict items give a standard error of ``se`` at ``p``."""
    return math.ceil(p * (1 - p) / se**2)


def conflict_count_warning(n_conflict: int, n_settings_hint: str, n_first_stage: int | None = None) -> str | None:
    """The warning for a conflict count too small for a search among many settings, or ``None``: with a TDR
    standard error above :data:`TARGET_SE` (3 points) the search mostly ranks noise. ``n_first_stage``: the
    conflicts the staged search's first stage sees (it discards most settings on them)."""
    se = tdr_standard_error(n_conflict)
    if se <= TARGET_SE:
        return None
    text = (f"only {n_conflict} conflict items for {n_settings_hint}: a TDR measured on them has a standard error "
            f"of about {100 * se:.1f} points (sqrt(p(1-p)/n) at p = 0.5), so settings closer than about "
            f"{200 * se:.0f} points cannot be told apart; about {conflicts_for()} conflict items give ~3 points")
    if n_first_stage is not None:
        text += (f" (its first stage sees {n_first_stage} of them: {100 * tdr_standard_error(n_first_stage):.1f} "
                 "points)")
    return text


def load_calibration_items(data: str | Path, stress_data: str | Path | None, limit: int | None) -> list:
    """The clean items, then the stress items; a stress item without a ``perturbation`` gets ``"stress"`` so that
    the no-harm rule checks it as its own split."""
    items = load_conflict_set(data, limit)
    if stress_data is not None:
        items += [it if it.perturbation else dataclasses.replace(it, perturbation="stress")
                  for it in load_conflict_set(stress_data, limit)]
    return items


def _warn_about_data(data: str | Path) -> None:
    """Calibrating on test data makes every later number on it optimistic: say so for the organism's examples."""
    from .. import organism

    try:
        shipped = Path(data).resolve() == Path(organism.examples_path()).resolve()
    except OSError:  # pragma: no cover - an unreadable path failed in load_conflict_set already
        shipped = False
    if shipped:
        logger.warning("calibration data %s is the organism's shipped examples, which are its test voices: numbers "
                       "measured on them after tuning on them are optimistic; calibrate on a validation split instead",
                       data)
