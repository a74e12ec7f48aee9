"""Eval reports on disk: write one (``backpatch eval --out``), and read the plain answers of one back
(``backpatch eval --plain-from``), so presets can be compared without generating the plain answers again.

The plain answers pass to :func:`backpatch.evaluate.evaluate` as ``plain_answers``; they are only reused when the
report was answered on the same items with the same ``max_new_tokens``, else the comparison would not be paired.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["plain_answers_from", "write_eval_report"]


def write_eval_report(report: dict[str, Any], path: str | Path) -> None:
    """Write the report that :func:`backpatch.evaluate.evaluate` returned as JSON, the file
    :func:`plain_answers_from` reads back."""
    Path(path).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


def plain_answers_from(path: str | Path, data: str | Path, limit: int | None = None,
                       max_new_tokens: int = 16) -> list[str]:
    """The plain answers of an earlier eval report on the same data: item ids must match one for one, and the
    report must have been answered with the same ``max_new_tokens``; else a :class:`ValueError` that says which
    (its sentences name ``--plain-from``, the flag this backs)."""
    from .evaluate import load_conflict_set

    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
        rows = report["items"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--plain-from {path}: not a backpatch eval report ({type(exc).__name__}: {exc})") from None
    ids = [item.id for item in load_conflict_set(data, limit)]
    if [row.get("id") for row in rows] != ids:
        raise ValueError(f"--plain-from {path}: its items are not the items of {data} (ids differ); run the plain "
                         "answers again without --plain-from")
    if report.get("settings", {}).get("max_new_tokens") != max_new_tokens:
        raise ValueError(f"--plain-from {path}: it was answered with max_new_tokens "
                         f"{report.get('settings', {}).get('max_new_tokens')}, this run asks {max_new_tokens}")
    return [row["plain"] for row in rows]
