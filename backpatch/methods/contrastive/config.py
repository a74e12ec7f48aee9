"""The contrastive-decoding setting (audio-aware contrastive decoding, AAD)."""

from __future__ import annotations

from dataclasses import dataclass

from ...validation import check_choice, check_float, fail, join

__all__ = ["NULL_AUDIO", "Contrastive"]

NULL_AUDIO = ("silence", "zeros")


@dataclass
class Contrastive:
    """Audio-aware contrastive decoding: ``(1 + alpha) * l(audio) - alpha * l(null audio)`` at every step.

    ``plausibility`` (optional) keeps only tokens with ``p(y | audio) >= plausibility * max p`` eligible.
    ``agreement`` (optional, nats) keeps the audio-conditioned answer wherever the audio raised its log-probability
    over the null-audio stream by at least this much: there audio and text agree, and subtracting the text-only
    prediction would only overturn a right answer (issue 28).
    """

    alpha: float = 1.0
    null_audio: str = "silence"
    plausibility: float | None = None
    agreement: float | None = None

    def __post_init__(self) -> None:
        self._validate("contrastive", None)

    def _validate(self, where: str, origin: str | None) -> None:
        self.alpha = check_float(self.alpha, join(where, "alpha"), origin)
        if self.alpha < 0:
            raise fail(join(where, "alpha"), f"must be >= 0 (0 turns it off), got {self.alpha}", origin)
        check_choice(self.null_audio, NULL_AUDIO, join(where, "null_audio"), origin)
        if self.plausibility is not None:
            self.plausibility = check_float(self.plausibility, join(where, "plausibility"), origin)
            if not 0.0 <= self.plausibility <= 1.0:
                raise fail(join(where, "plausibility"), f"must be in [0, 1], got {self.plausibility}", origin)
        if self.agreement is not None:
            self.agreement = check_float(self.agreement, join(where, "agreement"), origin)
