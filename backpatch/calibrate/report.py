"""What a calibration reports about its search: the sweep JSON's rows and the words for what was searched.

One row per scored setting (:func:`_row`; :func:`.resume.candidate_of_row` reads it back), metrics without their
per-item verdicts (:func:`_public`), and the kinds of method the search really reached (:func:`_searched`), which
the preset's description and the summary name instead of what was planned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from ..registry import get_method
from .grid import Candidate
from .search import passes_no_harm

METRIC_KEYS = ("tdr", "afr", "other_rate", "audio_only_acc", "consistent_acc")


def _row(candidate: Candidate, m: dict[str, Any], plain: dict[str, Any], max_harm: float, bounded: bool = True,
         **extra) -> dict:
    paired = m.get("paired") or {}
    return {"setting": candidate.label(), "patch": asdict(candidate.setting) if candidate.setting else None,
            "alpha": candidate.alpha, "gate": asdict(candidate.gate) if candidate.gate else None,
            **({"plausibility": candidate.plausibility} if candidate.plausibility is not None else {}),
            **({"agreement": candidate.agreement} if candidate.agreement is not None else {}),
            **({"patch_agreement": candidate.patch_agreement} if candidate.patch_agreement is not None else {}),
            **({"blocks": {key: get_method(key).dump(config) for key, config in candidate.blocks}}
               if candidate.blocks else {}),
            "no_harm": passes_no_harm(m, plain, max_harm, bounded), **extra,
            **{k: m[k] for k in METRIC_KEYS},
            "harm_upper": paired.get("harm_upper"), "tdr_reduction": paired.get("tdr_reduction"),
            "tdr_reduction_lower": paired.get("tdr_reduction_lower"), "harm": paired.get("harm")}


def _public(m: dict[str, Any]) -> dict[str, Any]:
    """Metrics without the per-item verdicts (kept for paired statistics, not for the JSON)."""
    return {k: v for k, v in m.items() if k != "verdicts"}


def _searched(candidates: Sequence[Candidate]) -> str:
    """What the search really scored, for the preset's description: only the kinds it got to."""
    kinds = _kinds(candidates)
    return ", ".join(kinds[:-1]) + (" and " if len(kinds) > 1 else "") + kinds[-1] if kinds else "nothing"


def _kinds(candidates: Sequence[Candidate]) -> list[str]:
    kinds = []
    if any(c.setting is not None and not c.alpha and not c.has_blocks for c in candidates):
        kinds.append("back-patching")
    if any(c.setting is None and c.alpha and not c.has_blocks for c in candidates):
        kinds.append("contrastive decoding")
    if any(c.setting is not None and c.alpha and not c.has_blocks for c in candidates):
        kinds.append("both")
    if any(c.plausibility is not None for c in candidates):
        kinds.append("plausibility guards")
    if any(c.agreement is not None for c in candidates):
        kinds.append("agreement guards")
    if any(c.patch_agreement is not None for c in candidates):
        kinds.append("patch agreement guards")
    if any(c.gate is not None for c in candidates):
        kinds.append("audio-confidence gates")
    block_keys = dict.fromkeys(key for c in candidates for key, _ in c.blocks)
    kinds += [get_method(key).title for key in block_keys]
    if any(c.has_blocks and (c.setting is not None or c.alpha or len(c.blocks) > 1) for c in candidates):
        kinds.append("the blocks combined with the other methods")
    return kinds
