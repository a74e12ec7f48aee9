"""Provenance that means something on another machine: the calibration data by a portable name and its sha256, and
the command that made the preset, with this machine's absolute paths turned into those names.

A preset travels (a repository, a hub, a colleague's laptop); ``/work/data/smol/conflicts/validation/conflicts.jsonl``
names a file on one machine only. A path inside the working directory is written relative to it; any other by its
last three parts (``conflicts/validation/conflicts.jsonl``, enough to say which split of which set); the sha256 says
whether a file elsewhere is the same data.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from collections.abc import Sequence
from pathlib import Path

__all__ = ["portable_command", "portable_name", "sha256_of"]

#: parts of a path kept when it lies outside the working directory
_TAIL = 3


def portable_name(path: str | Path, cwd: str | Path | None = None) -> str:
    """``path`` relative to the working directory when it lies inside it, else its last three parts."""
    resolved = Path(path).expanduser().resolve()
    base = Path(cwd or os.getcwd()).resolve()
    try:
        return resolved.relative_to(base).as_posix()
    except ValueError:
        return Path(*resolved.parts[-_TAIL:]).as_posix()


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def portable_command(argv: Sequence[str], cwd: str | Path | None = None) -> str:
    """The command line with every absolute path argument (or ``--opt=PATH``) made portable, so the written command
    runs anywhere the same files sit at the same names."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=") if arg.startswith("--") and "=" in arg else ("", "", arg)
        if value.startswith(("/", "~")):
            value = portable_name(value, cwd)
        out.append(f"{key}{eq}{value}")
    return shlex.join(out)
