"""Session checks: the system packages the tests need are there, or the run stops with the command that installs
them (instead of failing later in a subprocess or a browser launch)."""

from __future__ import annotations

import ctypes.util
import shutil

import pytest
from tiny import collate, make_row, tiny_qwen2_audio

#: command or library -> the Debian package that provides it
SYSTEM_PACKAGES = {"espeak-ng": "espeak-ng", "sox": "sox", "chromium": "chromium"}


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = [package for tool, package in SYSTEM_PACKAGES.items() if shutil.which(tool) is None]
    if ctypes.util.find_library("sndfile") is None:
        missing.append("libsndfile1")
    if missing:
        pytest.exit(f"missing system packages: {', '.join(missing)}; install them with "
                    f"`sudo apt-get install {' '.join(missing)}` or `bash scripts/install_system_deps.sh`",
                    returncode=2)


# ------------------------------------------------------------------ the tiny model and batch most tests share
@pytest.fixture(scope="module")
def model():
    """A tiny random Qwen2-Audio, one per test module (modules that need a fresh one per test define their own)."""
    return tiny_qwen2_audio()


@pytest.fixture(scope="module")
def batch():
    """Left-padded: two audio rows of different lengths and one text-only row."""
    return collate([make_row(0, 40), make_row(1, 30), make_row(2, None)])
