"""``--budget-minutes`` as a hard bound on a calibration's wall time, the ``generate()`` verification included.

The costly parts that cannot stop half-way are measured or estimated before they start:

1. the plain answers of the verification (every clean and stress item, greedy ``generate()``) come first, timed:
   they do not depend on the candidate, and their time is the unit of every later estimate;
2. one verification is reserved from the start: the costliest kind the search may pick, in plain-answer units
   (:func:`verification_factor`: null-audio rows double the batch, a patch adds a capture prefill);
3. the search gets what is left (its stages take their shares of it, :mod:`.search`); a stage stops between
   settings, so it overruns by at most one setting's scoring;
4. the full stage's capture is estimated from the refine stage's capture and skipped when it does not fit;
5. after the first verification the estimate is corrected by what it really cost, and a further finalist is
   verified only if its estimate fits.

Whatever was cut is named in the summary (``skipped``) and the preset's description says only what was searched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from .grid import Candidate

logger = logging.getLogger(__name__)


def verification_factor(candidate: Candidate) -> float:
    """The cost of verifying ``candidate`` with ``generate()`` in units of the plain answers' generation: null-audio
    rows (contrastive decoding, an audio_gap gate) double the batch, a patch adds a capture prefill."""
    return (2.0 if candidate.null_rows else 1.0) * (2.0 if candidate.setting is not None else 1.0)


def worst_factor(null_rows: bool) -> float:
    """The costliest candidate a search may pick: a patch, with null-audio rows when contrastive or gates are on."""
    return verification_factor(Candidate(None, 1.0 if null_rows else 0.0)) * 2.0


@dataclass
class Budget:
    """The calibration's clock: one deadline, the plain answers' time, and what the budget made it skip."""

    seconds: float
    started: float
    plain_seconds: float | None = None
    #: measured / estimated cost of the verifications so far (1.0 until one ran)
    correction: float = 1.0
    skipped: list[str] = field(default_factory=list)

    @property
    def deadline(self) -> float:
        return self.started + self.seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def estimate(self, candidate: Candidate) -> float:
        """Seconds a ``generate()`` verification of ``candidate`` should take (the plain answers being known)."""
        return verification_factor(candidate) * (self.plain_seconds or 0.0) * self.correction

    def search_deadline(self, null_rows: bool) -> float:
        """When the search must stop so that one verification of the costliest kind still fits. Raises when the
        budget is spent before the search could start."""
        reserve = worst_factor(null_rows) * (self.plain_seconds or 0.0)
        end = self.deadline - reserve
        if end <= time.perf_counter():
            spent = time.perf_counter() - self.started
            need = spent + reserve
            raise ValueError(
                f"the time budget ({self.seconds / 60:g} min) is spent before the search can start: the plain answers "
                f"of the verification took {self.plain_seconds:.0f} s and one generate() verification needs about "
                f"{reserve:.0f} s more; raise --budget-minutes well above {need / 60:.1f} min, or verify on fewer "
                "items (--limit)")
        return end

    def fits(self, seconds: float) -> bool:
        return time.perf_counter() + seconds <= self.deadline

    def learn(self, candidate: Candidate, seconds: float) -> None:
        """Correct later estimates by what a verification really took."""
        expected = verification_factor(candidate) * (self.plain_seconds or 0.0)
        if expected > 0:
            self.correction = seconds / expected

    def skip(self, what: str) -> None:
        logger.warning("calibration budget: skipped %s", what)
        self.skipped.append(what)

    def summary(self) -> dict[str, Any]:
        return {"budget_seconds": round(self.seconds, 1), "plain_seconds": round(self.plain_seconds or 0.0, 1),
                "verification_correction": round(self.correction, 3), "skipped": list(self.skipped)}
