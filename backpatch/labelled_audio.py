"""Reading a user's labelled audio collection: a CSV/TSV/JSONL manifest, or a ``LABEL/clip.wav`` folder.

Why a module of its own: ``backpatch conflicts`` (``backpatch.conflict_sets``) turns labelled clips into a
conflict set, and how clips are found (columns, folders, file-name patterns) is a separate job from how
prompts are made. Everything here only reads; nothing is written.

Sources:

- **Manifest** (``.csv``, ``.tsv``, ``.jsonl``): one clip per row/line with an audio path (relative to the
  manifest, or to ``audio_root``) and a label; any other columns (``speaker``, ``fold``, ...) are kept in
  :attr:`Clip.fields`, so ``group_by`` can name one. The audio and label columns are found by name (see
  :data:`AUDIO_COLUMNS`, :data:`LABEL_COLUMNS`) unless given. An ``id`` column, when present, names the clip;
  otherwise the id is the audio path without its suffix, ``/`` replaced by ``-``.
- **Folder** laid out ``LABEL/clip.wav`` (Speech Commands, ESC-50-by-class): every sub-folder is a label,
  every audio file under it (any depth) a clip. Folders whose name starts with ``_`` or ``.`` are skipped
  (Speech Commands' ``_background_noise_``). In a folder name ``_`` reads as a space, so ``crying_baby/``
  gives the answer ``crying baby`` (an answer is judged by its words, DESIGN section 4). The clip id is
  ``LABEL-path-without-suffix``.

``filename_pattern`` (a regular expression with named groups, searched in the file name without its suffix)
adds fields from file names, e.g. ``(?P<speaker>[^_]+)_nohash`` for Speech Commands, so that
``group_by="speaker"`` works on folders too.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .audio_io import AudioFileError, read_audio
from .items import ConflictSetError

__all__ = [
    "AUDIO_COLUMNS",
    "AUDIO_SUFFIXES",
    "LABEL_COLUMNS",
    "Clip",
    "ConflictSourceError",
    "check_audio",
    "read_labelled_audio",
]

logger = logging.getLogger(__name__)

#: file suffixes taken as audio in a folder source (what libsndfile reads)
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".caf")
#: manifest columns tried, in order, for the audio path when none is given
AUDIO_COLUMNS = ("audio", "path", "file", "filename", "file_name", "audio_path", "wav")
#: manifest columns tried, in order, for the label when none is given
LABEL_COLUMNS = ("label", "answer", "class", "category", "word", "transcript", "text", "sentence")
#: how many bad files an error message lists by name
SHOW_AT_MOST = 5


class ConflictSourceError(ConflictSetError):
    """Labelled audio, options or an output path that a conflict set cannot be built from (one sentence)."""


@dataclass(frozen=True)
class Clip:
    """One labelled clip. ``path`` is absolute (not symlink-resolved); ``fields`` are the manifest columns
    (or named groups of the file-name pattern); ``group`` is set when clips are grouped for splitting."""

    id: str
    path: Path
    label: str
    group: str | None = None
    fields: Mapping[str, str] = field(default_factory=dict, compare=False)


def _listing(names: Sequence[str], total: int | None = None) -> str:
    total = len(names) if total is None else total
    shown = ", ".join(names[:SHOW_AT_MOST])
    return shown + (f" and {total - SHOW_AT_MOST} more" if total > SHOW_AT_MOST else "")


def _pick_column(columns: Sequence[str], given: str | None, candidates: Sequence[str], what: str, flag: str,
                 where: Path) -> str:
    if given is not None:
        if given not in columns:
            raise ConflictSourceError(f"{where}: no column {given!r} for {what}; columns are {', '.join(columns)}")
        return given
    lowered = {c.lower(): c for c in columns}
    for name in candidates:
        if name in lowered:
            return lowered[name]
    raise ConflictSourceError(f"{where}: no {what} column (tried {', '.join(candidates)}); columns are "
                              f"{', '.join(columns) or 'none'}; name it with {flag}")


def _read_rows(path: Path) -> list[dict[str, str]]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            if not reader.fieldnames:
                raise ConflictSourceError(f"{path}: the manifest has no header row")
            return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConflictSourceError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ConflictSourceError(f"{path}:{lineno}: each line must be a JSON object")
            rows.append({str(k): "" if v is None else str(v).strip() for k, v in row.items()})
        return rows
    raise ConflictSourceError(f"{path}: a manifest must be .csv, .tsv or .jsonl (or pass a LABEL/clip folder)")


def _id_from_path(relative: str) -> str:
    return str(Path(relative).with_suffix("").as_posix()).replace("/", "-")


def _manifest_clips(path: Path, audio_column: str | None, label_column: str | None, id_column: str | None,
                    audio_root: Path | None) -> list[Clip]:
    rows = _read_rows(path)
    if not rows:
        raise ConflictSourceError(f"{path}: the manifest has no rows")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    audio_key = _pick_column(columns, audio_column, AUDIO_COLUMNS, "the audio path", "--audio-column", path)
    label_key = _pick_column(columns, label_column, LABEL_COLUMNS, "the label", "--label-column", path)
    if id_column is not None and id_column not in columns:
        raise ConflictSourceError(f"{path}: no column {id_column!r} for the clip id; columns are {', '.join(columns)}")
    id_key = id_column or ("id" if "id" in columns else None)
    root = Path(os.path.abspath(audio_root if audio_root is not None else path.parent))
    clips = []
    for n, row in enumerate(rows, start=1):
        audio, label = row.get(audio_key, ""), row.get(label_key, "")
        if not audio or not label:
            empty = audio_key if not audio else label_key
            raise ConflictSourceError(f"{path}: row {n} has an empty {empty!r}")
        clip_id = row.get(id_key, "") if id_key else _id_from_path(audio)
        if not clip_id:
            raise ConflictSourceError(f"{path}: row {n} has an empty {id_key!r}")
        clips.append(Clip(clip_id, Path(os.path.abspath(root / audio)), label, fields=row))
    return clips


def _folder_clips(folder: Path) -> list[Clip]:
    clips = []
    for label_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        label = " ".join(label_dir.name.replace("_", " ").split())
        files = sorted(p for p in label_dir.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(label_dir).parts))
        for p in files:
            relative = p.relative_to(folder).as_posix()
            clips.append(Clip(_id_from_path(relative), Path(os.path.abspath(p)), label,
                              fields={"path": relative, "label": label}))
    if not clips:
        raise ConflictSourceError(f"{folder}: no audio files found in LABEL/ sub-folders (expected e.g. "
                                  f"{folder}/yes/clip1.wav; suffixes {', '.join(AUDIO_SUFFIXES)})")
    return clips


def _add_name_fields(clips: list[Clip], pattern: str) -> list[Clip]:
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ConflictSourceError(f"--filename-pattern {pattern!r} is not a valid regular expression ({exc})") from None
    if not regex.groupindex:
        raise ConflictSourceError(f"--filename-pattern {pattern!r} needs a named group, e.g. (?P<speaker>[^_]+)")
    out, unmatched = [], []
    for clip in clips:
        match = regex.search(clip.path.stem)
        if match is None:
            unmatched.append(clip.path.name)
            continue
        named = {k: v for k, v in match.groupdict().items() if v is not None}
        out.append(Clip(clip.id, clip.path, clip.label, clip.group, {**clip.fields, **named}))
    if unmatched:
        raise ConflictSourceError(f"--filename-pattern {pattern!r} does not match {len(unmatched)} file name(s): "
                                  f"{_listing(unmatched)}")
    return out


def read_labelled_audio(
    source: str | Path,
    audio_column: str | None = None,
    label_column: str | None = None,
    id_column: str | None = None,
    audio_root: str | Path | None = None,
    filename_pattern: str | None = None,
    group_by: str | None = None,
) -> list[Clip]:
    """Clips of a manifest or a ``LABEL/clip`` folder (see the module docstring), in a stable order.

    ``group_by`` names the field that groups clips (``speaker``): every clip must have it. Duplicate clip ids
    are an error. Audio files are not opened here (see :func:`check_audio`).
    """
    source = Path(source)
    if source.is_dir():
        if audio_column or label_column or id_column or audio_root:
            raise ConflictSourceError(f"{source} is a folder: --audio-column, --label-column, --id-column and "
                                      f"--audio-root only apply to manifests")
        clips = _folder_clips(source)
    elif source.is_file():
        clips = _manifest_clips(source, audio_column, label_column, id_column,
                                Path(audio_root) if audio_root is not None else None)
    else:
        raise ConflictSourceError(f"labelled audio not found: {source} (pass a .csv/.tsv/.jsonl manifest or a "
                                  f"folder of LABEL/clip files)")
    if filename_pattern:
        clips = _add_name_fields(clips, filename_pattern)
    counts = Counter(clip.id for clip in clips)
    duplicates = [f"{name!r} ({n} times)" for name, n in counts.items() if n > 1]
    if duplicates:
        raise ConflictSourceError(f"{source}: {len(duplicates)} duplicate clip id(s): {_listing(duplicates)}; ids "
                                  f"must be unique")
    if group_by is not None:
        missing = [clip.id for clip in clips if not clip.fields.get(group_by)]
        if missing:
            available = sorted({k for clip in clips for k in clip.fields})
            raise ConflictSourceError(f"{source}: {len(missing)} clip(s) have no {group_by!r} to group by "
                                      f"({_listing(missing)}); fields are {', '.join(available)}"
                                      + ("" if source.is_file() else "; add some with --filename-pattern"))
        clips = [Clip(c.id, c.path, c.label, c.fields[group_by], c.fields) for c in clips]
    logger.info("%s: %d clips, %d labels", source, len(clips), len({c.label for c in clips}))
    return clips


def check_audio(clips: Sequence[Clip], progress: bool = True) -> None:
    """Open every clip's audio once (soundfile, via ``backpatch.audio_io``); one error lists the bad ones."""
    bad = []
    for clip in tqdm(clips, desc="checking audio", unit="clip", disable=not progress):
        try:
            read_audio(clip.path)
        except AudioFileError as exc:
            reason = "not found" if not clip.path.is_file() else (
                "no samples" if "no audio samples" in str(exc) else "not readable as audio")
            bad.append(f"{clip.path} ({reason})")
    if bad:
        raise ConflictSourceError(f"{len(bad)} of {len(clips)} audio file(s) are missing or unreadable: "
                                  f"{_listing(bad)}")
