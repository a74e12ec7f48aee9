"""The back-patching setting: one patch routes a late layer's states back into an earlier layer (DESIGN section 1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...validation import check_choice, check_float, check_int, fail, join, type_name

__all__ = ["MODES", "POSITIONS", "Patch", "patch_label"]

MODES = ("add", "replace", "interpolate")
POSITIONS = ("audio", "last", "audio+last")


def patch_label(patch: Any) -> str:
    """``source->target mode xscale @positions``: one line per patch, for the CLI, reprs and sweep tables.

    Takes anything with the five patch fields (a :class:`Patch`, a resolved patch, a calibration setting).
    """
    norm = " norm-matched" if getattr(patch, "match_norm", False) else ""
    agreement = getattr(patch, "agreement", None)
    guard = f" unless audio agrees by {agreement:g} nats" if agreement is not None else ""
    return f"{patch.source}->{patch.target} {patch.mode} x{patch.scale:g} @{patch.positions}{norm}{guard}"


@dataclass
class Patch:
    """One back-patch: route layer ``source``'s output back into layer ``target`` at ``positions``.

    Layer indices refer to decoder blocks of the language model and may be negative (``-1`` = last block).
    Whether they fit the model is checked at ``wrap()`` time; here we only reject what can never be valid.
    """

    source: int
    target: int
    scale: float = 1.0
    mode: str = "add"
    positions: str = "audio"
    #: rescale the captured states, per position, to the norm of the target layer's states before combining.
    #: Late-layer states are much larger than early ones; on smol-whisper norm matching made 14 more of 104
    #: settings harmless (README, "Norm-matched combine"). Default off, and then bit-identical to no key at all.
    match_norm: bool = False
    #: the agreement guard (nats): a row whose unpatched answer the audio raised by at least this much over the
    #: null-audio stream (``log p(m | audio) - log p(m | null audio)`` of its top token ``m``, the signal of
    #: contrastive decoding's guard) is not patched: the audio already carries that answer, so the patch can only
    #: overturn it. Needs the null-audio rows of a ``contrastive`` block (its ``alpha`` may be 0). On smol-whisper's
    #: every-family validation a guard of 1 nat kept the full TDR cut of the scale-1 patch and removed its harm on
    #: noisy audio-only items (issue 28). None (default): every row patched, bit-identical to no key at all.
    agreement: float | None = None

    def __post_init__(self) -> None:
        self._validate("Patch", None)

    def _validate(self, where: str, origin: str | None) -> None:
        check_int(self.source, join(where, "source"), origin)
        check_int(self.target, join(where, "target"), origin)
        self.scale = check_float(self.scale, join(where, "scale"), origin)
        check_choice(self.mode, MODES, join(where, "mode"), origin)
        check_choice(self.positions, POSITIONS, join(where, "positions"), origin)
        if not isinstance(self.match_norm, bool):
            raise fail(join(where, "match_norm"), f"expected true or false, got {self.match_norm!r} "
                        f"({type_name(self.match_norm)})", origin)
        if self.agreement is not None:
            self.agreement = check_float(self.agreement, join(where, "agreement"), origin)
        # With both indices on the same side of zero the order is known without the model.
        if (self.source >= 0) == (self.target >= 0) and self.source <= self.target:
            raise fail(
                join(where, "source"),
                f"source ({self.source}) must be a later layer than target ({self.target}): back-patching routes "
                "late states back into an earlier layer",
                origin,
            )
