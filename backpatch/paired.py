"""Paired statistics for "does this mitigation harm?" and "how much does it help?" (calibration and eval).

Why paired: plain and mitigated answers are given to the *same* items, so the honest question is how many items
flipped, not whether two independent accuracies overlap. Only discordant items carry information (McNemar): with
``lost`` items correct plain and wrong mitigated, and ``gained`` the other way round, the accuracy change is
``(gained - lost) / n``. Conditional on the ``lost + gained`` discordant items, ``lost`` is binomial; its exact
one-sided Clopper-Pearson upper bound gives an upper confidence bound on the accuracy *loss*. A setting passes the
no-harm rule when that bound stays under ``max_harm`` for every control kind (audio-only, consistent) in every
split (clean and perturbed).

TDR is a ratio with a varying denominator, so its paired reduction gets a seeded bootstrap over conflict items
(the same resampled items for both columns); calibration ranks settings by its lower bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import beta

__all__ = ["CONTROL_KINDS", "PERTURBATION_FAMILIES", "family_of", "harm_bound", "harm_by_group", "paired_report",
           "perturbation_family", "split_of", "tdr_reduction_bound", "wilson"]

#: the item kinds whose accuracy a mitigation must not lower
CONTROL_KINDS = ("audio_only", "consistent")
CONFIDENCE = 0.95
BOOTSTRAP = 2000


def wilson(successes: int, n: int, z: float = 1.96) -> list[float] | None:
    """95% Wilson score interval of one rate (the report's ``ci95``); ``None`` when there are no trials."""
    if n == 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def harm_bound(plain_correct: Sequence[bool], mitigated_correct: Sequence[bool],
               confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Exact paired upper bound on the accuracy loss ``(lost - gained) / n``; ``upper`` is None with no items."""
    plain = np.asarray(plain_correct, dtype=bool)
    mitigated = np.asarray(mitigated_correct, dtype=bool)
    n = int(plain.size)
    lost = int((plain & ~mitigated).sum())
    gained = int((~plain & mitigated).sum())
    discordant = lost + gained
    if n == 0:
        return {"n": 0, "lost": 0, "gained": 0, "loss": None, "upper": None}
    if discordant == 0:
        upper_share = 0.5  # no flips: the loss is exactly 0, and so is its bound
    elif lost == discordant:
        upper_share = 1.0
    else:
        upper_share = float(beta.ppf(confidence, lost + 1, discordant - lost))
    upper = max(0.0, discordant * (2 * upper_share - 1) / n)
    return {"n": n, "lost": lost, "gained": gained, "loss": round((lost - gained) / n, 4), "upper": round(upper, 4)}


def tdr_reduction_bound(plain: Sequence[str], mitigated: Sequence[str], seed: int = 0,
                        confidence: float = CONFIDENCE) -> dict[str, Any]:
    """TDR(plain) - TDR(mitigated) on paired conflict verdicts, with a one-sided bootstrap lower bound."""
    p_text = np.array([v == "text" for v in plain])
    p_counted = np.array([v in ("text", "audio") for v in plain])
    m_text = np.array([v == "text" for v in mitigated])
    m_counted = np.array([v in ("text", "audio") for v in mitigated])
    n = p_text.size
    if n == 0 or not p_counted.any() or not m_counted.any():
        return {"reduction": None, "lower": None}

    def tdr(text: np.ndarray, counted: np.ndarray) -> np.ndarray:
        return text.sum(-1) / np.maximum(counted.sum(-1), 1)

    point = float(tdr(p_text, p_counted) - tdr(m_text, m_counted))
    picks = np.random.default_rng(seed).integers(0, n, size=(BOOTSTRAP, n))
    samples = tdr(p_text[picks], p_counted[picks]) - tdr(m_text[picks], m_counted[picks])
    return {"reduction": round(point, 4), "lower": round(float(np.quantile(samples, 1 - confidence)), 4)}


def split_of(item: Any) -> str:
    """``clean``, or ``perturbed`` for items that carry a ``perturbation`` annotation."""
    return "perturbed" if getattr(item, "perturbation", None) else "clean"


#: effect names in a perturbation's name -> its family (a name with effects of two families is ``combined``)
PERTURBATION_FAMILIES = {"pitch": "pitch", "tempo": "tempo", "speed": "tempo", "snr": "noise", "noise": "noise",
                         "reverb": "reverb", "telephone": "band", "lowpass": "band", "highpass": "band",
                         "band": "band", "gain": "gain"}


def perturbation_family(name: str | None) -> str | None:
    """The family of a perturbation named like ``snr10``, ``pitch+200`` or ``pitch+400+reverb90+snr5``: what a
    no-harm rule checks one at a time (issue 28). A name that names no known effect is a family of its own (another
    synthesizer, a user's recording condition)."""
    if not name:
        return None
    lowered = name.lower()
    families = {family for effect, family in PERTURBATION_FAMILIES.items() if effect in lowered}
    if len(families) > 1:
        return "combined"
    return families.pop() if families else name


def family_of(item: Any) -> str:
    """``clean``, or the perturbation family of an item that carries a ``perturbation`` annotation."""
    return perturbation_family(getattr(item, "perturbation", None)) or "clean"


def harm_by_group(items: Sequence[Any], plain: Sequence[str], mitigated: Sequence[str],
                  group: Any = family_of) -> dict[str, dict[str, Any]]:
    """Paired harm bounds per group of items (by default the perturbation family) and control kind."""
    harm: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(group(it) for it in items):
        for kind in CONTROL_KINDS:
            rows = [i for i, it in enumerate(items) if group(it) == name and it.kind == kind]
            if rows:
                harm.setdefault(name, {})[kind] = harm_bound([plain[i] == "audio" for i in rows],
                                                             [mitigated[i] == "audio" for i in rows])
    return harm


def paired_report(items: Sequence[Any], plain: Sequence[str], mitigated: Sequence[str], seed: int = 0) -> dict:
    """Harm bounds per split and control kind, their worst upper bound, and the TDR reduction with its bound.

    ``plain``/``mitigated``: verdicts (``audio``/``text``/``other``) for ``items`` in order. An item is correct when
    it follows the audio."""
    harm = harm_by_group(items, plain, mitigated, split_of)
    uppers = [bound["upper"] for kinds in harm.values() for bound in kinds.values()]
    conflicts = [i for i, it in enumerate(items) if it.kind == "conflict"]
    reduction = tdr_reduction_bound([plain[i] for i in conflicts], [mitigated[i] for i in conflicts], seed)
    perturbed = any(getattr(it, "perturbation", None) for it in items)
    return {"harm": harm, "harm_upper": max(uppers) if uppers else None,
            **({"harm_by_family": harm_by_group(items, plain, mitigated)} if perturbed else {}),
            "tdr_reduction": reduction["reduction"], "tdr_reduction_lower": reduction["lower"]}
