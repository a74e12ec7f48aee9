"""``calibrate(resume=...)``: reading an earlier staged run's ``.sweep.json`` back, so its scores are reused.

An earlier run's scores are only worth reusing on the same items scored by the same model: :func:`previous_results`
refuses a sweep of other data, stress data, seed or item count, and :func:`plain_differs` tells when the plain
answers differ (another model, dtype or preset). :func:`candidate_of_row` turns a sweep row back into its candidate.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..methods import Gate
from ..registry import get_method
from .grid import Candidate, Setting
from .report import METRIC_KEYS

logger = logging.getLogger(__name__)


def candidate_of_row(row: dict[str, Any]) -> Candidate:
    """The candidate a sweep row (:func:`.report._row`) describes. Blocks are read by their methods (rows written
    before blocks had their own map held ``attention`` and ``steering`` at the top)."""
    blocks = row.get("blocks") or {key: row[key] for key in ("attention", "steering") if row.get(key)}
    return Candidate.of(Setting(**row["patch"]) if row.get("patch") else None, float(row.get("alpha") or 0.0),
                        Gate(**row["gate"]) if row.get("gate") else None, row.get("plausibility"), row.get("agreement"),
                        row.get("patch_agreement"),
                        **{key: get_method(key).parse(data, key, None) for key, data in blocks.items()})


def plain_differs(earlier: dict[str, Any] | None, plain: dict[str, Any]) -> bool:
    """Whether an earlier run's plain metrics on the same items differ from these (another model, dtype or
    preset): its scores cannot be reused then."""
    return bool(earlier) and any(earlier.get(k) is not None and plain[k] is not None
                                 and abs(earlier[k] - plain[k]) > 1e-3
                                 for k in ("tdr", "audio_only_acc", "consistent_acc"))


def previous_results(sweep: str | Path, data: str | Path, stress_data: str | Path | None, seed: int,
                     n_items: int, staged: bool = True) -> dict[str, dict]:
    """``results``: per stage, the candidates an earlier staged run scored and their metrics (paired harm and
    TDR-reduction bounds included, per-item verdicts not), read from its ``.sweep.json``. Its stages used the same clip
    subsets only if it ran on the same data, stress data, seed and item count: anything else is refused."""
    path = Path(sweep)
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--resume {path}: cannot read it as a calibration .sweep.json ({err})") from err
    if not staged:
        raise ValueError("--resume continues the staged search; it does not apply to an explicit grid "
                         "(--sources/--targets/...): drop one of them")
    if not isinstance(earlier, dict) or (earlier.get("search") or {}).get("kind") != "staged":
        raise ValueError(f"--resume {path}: not the .sweep.json of a staged calibration search")
    wanted = {"data": str(data), "stress_data": str(stress_data) if stress_data is not None else None,
              "seed": seed, "n_items": n_items}
    found = {"data": earlier.get("data"), "stress_data": earlier.get("stress_data"),
             "seed": earlier["search"].get("seed"), "n_items": earlier.get("n_items")}
    differ = [f"{key} {found[key]!r} there, {wanted[key]!r} here" for key in wanted if found[key] != wanted[key]]
    if differ:
        raise ValueError(f"--resume {path}: that run used other data, so its stages scored other items ("
                         + "; ".join(differ) + "); resume with the same --data, --stress-data, --seed and --limit")
    out: dict[str, dict[Candidate, dict[str, Any]]] = {}
    for row in earlier.get("sweep", []):
        candidate = candidate_of_row(row)
        paired = {key: row.get(key) for key in ("harm", "harm_upper", "tdr_reduction", "tdr_reduction_lower")}
        m = {**{key: row.get(key) for key in METRIC_KEYS}, "paired": paired if row.get("harm") else None}
        out.setdefault(row["stage"], {})[candidate] = m
    logger.info("resuming from %s: %s", path, ", ".join(f"{len(v)} {k}" for k, v in out.items()))
    stages = earlier["search"].get("stages", [])
    return {"results": out, "sizes": {stage["name"]: stage["n_items"] for stage in stages},
            "plain": {stage["name"]: stage.get("plain") for stage in stages}}
