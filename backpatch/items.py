"""Conflict-set items (DESIGN section 4): the JSONL schema, reading and checking a file, and judging an answer
against an item (follows the audio, the text, or neither). Data, below evaluation: the metrics, the builders of
conflict sets and the answerability checks all read items through here."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ANNOTATIONS", "KINDS", "ConflictItem", "ConflictSetError", "judge", "load_conflict_set", "normalize"]

KINDS = ("conflict", "consistent", "audio_only")
ANNOTATIONS = ("framing", "label", "group", "perturbation", "task")


class ConflictSetError(ValueError):
    """A conflict-set file that cannot be used as it is."""


@dataclass(frozen=True)
class ConflictItem:
    id: str
    audio: Path
    prompt: str
    audio_answer: str
    text_answer: str | None
    kind: str
    #: optional annotations (extra keys are allowed; ``backpatch conflicts`` writes these)
    framing: str | None = None
    label: str | None = None
    group: str | None = None
    choices: tuple[str, ...] | None = None
    #: how the clip was degraded (stress sets, ``backpatch.organism.perturb``); None for clean audio
    perturbation: str | None = None
    #: which question of a multi-task set the item asks (``smol-audio``: word, sex, rate, ...); eval reports by it
    task: str | None = None
    #: a system turn before the user turn (ALME's system-prompt framing: the claim sits there, not in ``prompt``)
    system: str | None = None


def load_conflict_set(path: str | Path, limit: int | None = None) -> list[ConflictItem]:
    """Read and check a conflict set; errors name the file, the line and the field. ``limit``: the first items
    only (a positive number)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConflictSetError(f"limit must be a positive number of items, got {limit!r}")
    path = Path(path)
    if not path.is_file():
        raise ConflictSetError(f"conflict set not found: {path}")
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConflictSetError(f"{where}: not valid JSON ({exc.msg})") from None
        missing = [k for k in ("id", "audio", "prompt", "audio_answer", "kind") if k not in row]
        if missing:
            raise ConflictSetError(f"{where}: missing field(s) {', '.join(missing)}")
        if row["kind"] not in KINDS:
            raise ConflictSetError(f"{where}: kind {row['kind']!r} is not one of {', '.join(KINDS)}")
        text_answer = row.get("text_answer")
        if row["kind"] == "conflict" and not text_answer:
            raise ConflictSetError(f"{where}: a conflict item needs a text_answer")
        if row["kind"] == "conflict" and normalize(str(text_answer)) == normalize(str(row["audio_answer"])):
            raise ConflictSetError(f"{where}: a conflict item needs a text_answer that differs from its audio_answer "
                                   f"(both are {row['audio_answer']!r}); make it kind 'consistent' or change the claim")
        if row["kind"] == "consistent" and text_answer != row["audio_answer"]:
            raise ConflictSetError(f"{where}: a consistent item needs text_answer == audio_answer")
        audio = (path.parent / row["audio"]).resolve()
        if not audio.is_file():
            raise ConflictSetError(f"{where}: audio file {row['audio']!r} not found (paths are relative to the JSONL)")
        system = row.get("system")
        if system is not None and not (isinstance(system, str) and system.strip()):
            raise ConflictSetError(f"{where}: system must be a non-empty string (the system turn's text) or absent")
        choices = row.get("choices")
        if choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
            raise ConflictSetError(f"{where}: choices must be a list of strings")
        items.append(ConflictItem(str(row["id"]), audio, row["prompt"], row["audio_answer"], text_answer, row["kind"],
                                  *(_optional_text(row, key) for key in ("framing", "label", "group")),
                                  tuple(choices) if choices is not None else None,
                                  _optional_text(row, "perturbation"), _optional_text(row, "task"), system))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise ConflictSetError(f"{path}: no items")
    return items


def _optional_text(row: dict, key: str) -> str | None:
    return None if row.get(key) is None else str(row[key])


def normalize(text: str) -> str:
    """Lowercase words separated by single spaces: punctuation and special characters do not count."""
    return " ".join(re.findall(r"[\w']+", text.lower()))


def _first_mention(answer: str, target: str | None) -> int | None:
    if not target:
        return None
    match = re.search(rf"(?<!\w){re.escape(normalize(target))}(?!\w)", answer)
    return match.start() if match else None


def judge(answer: str, item: ConflictItem) -> str:
    """``audio``, ``text`` or ``other``. An answer follows whichever of the two it mentions (first, if both):
    single-word answers ("seven") and sentences ("The digit is seven.") are judged alike."""
    norm = normalize(answer)
    audio_at = _first_mention(norm, item.audio_answer)
    text_at = _first_mention(norm, item.text_answer) if item.kind == "conflict" else None
    if audio_at is None and text_at is None:
        return "other"
    if text_at is None or (audio_at is not None and audio_at < text_at):
        return "audio"
    return "text"
