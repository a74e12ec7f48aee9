"""The constraints file of the versions last known good (``constraints.txt``): write it, or compare it with this
environment.

README "Install": `constraints.txt`, the reproducible install (CI runs `check` after its fresh install).

    python scripts/constraints.py lock     # resolve ".[dev,demo,serve]" now (pip lock) and rewrite constraints.txt
    python scripts/constraints.py check    # name every package whose installed version differs from constraints.txt

``lock`` is run by a maintainer when a fresh install (CI's) has passed the tests with new releases; ``check`` runs in
CI right after the fresh install, so every run shows whether today's resolution still matches the known-good one or
names the drift (a report, not a failure: drift is expected as upstream releases; a drift that breaks something
fails the tests that follow it). Users who want a reproducible install install the file itself, hash-checked
(``pip install -r constraints.txt``), then the project with ``--no-deps``: pip refuses hashes for an editable or
folder requirement, so ``-e . -c constraints.txt`` cannot check them.

The hashes are those of the files pip picks on the machine that ran ``lock`` (the header names its platform and
Python); pip checks them for every package the file names. torch is left out: its build is chosen by the CPU pin
(``pip install torch==2.13.0``) or by the user's CUDA index, never by this file.
"""

from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
from datetime import date
from importlib import metadata
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
EXTRAS = "dev,demo,serve"
TORCH_PIN = "torch==2.13.0"
#: packages the file does not pin: the project itself, and torch (see the module docstring)
LEFT_OUT = {"backpatch", "torch"}
_LINE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+)")


def canonical(name: str) -> str:
    """PEP 503 name: what pip compares (``PyYAML`` == ``pyyaml``, ``typing_extensions`` == ``typing-extensions``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_constraints(path: Path = CONSTRAINTS) -> dict[str, str]:
    """``{canonical name: version}`` of every ``name==version`` line (comments and hashes skipped)."""
    pins = {}
    for line in path.read_text().splitlines():
        match = _LINE.match(line.strip())
        if match:
            pins[canonical(match["name"])] = match["version"]
    return pins


def installed_versions() -> dict[str, str]:
    return {canonical(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}


def drift(pins: dict[str, str], installed: dict[str, str]) -> list[str]:
    """One line per pinned package that is missing here or installed at another version."""
    lines = []
    for name, version in sorted(pins.items()):
        have = installed.get(name)
        if have != version:
            lines.append(f"{name}: known good {version}, installed {have or 'nothing'}")
    return lines


def check(path: Path, strict: bool) -> int:
    pins = read_constraints(path)
    lines = drift(pins, installed_versions())
    if not lines:
        print(f"{path.name}: the {len(pins)} pinned packages agree with this environment")
        return 0
    print(f"{path.name}: {len(lines)} of {len(pins)} pinned packages drifted from the known-good versions "
          "(rerun `python scripts/constraints.py lock` once the tests pass with them):")
    for line in lines:
        print(f"  {line}")
    return 1 if strict else 0


def lock(path: Path) -> int:
    """Resolve the project's requirements now with ``pip lock`` and write the pins and hashes it found."""
    scratch = ROOT / "pylock.scratch.toml"  # pip lock writes only inside the project folder, named pylock.*.toml
    try:
        subprocess.run([sys.executable, "-m", "pip", "lock", f".[{EXTRAS}]", TORCH_PIN, "-q", "-o", scratch.name],
                       cwd=ROOT, check=True)
        packages = tomllib.loads(scratch.read_text())["packages"]
    finally:
        scratch.unlink(missing_ok=True)
    lines = [
        "# The versions last known good for a fresh `pip install -e \".[dev,demo,serve]\"` (CI's install), with the",
        "# sha256 of the file pip picked for each. Reproducible install, in a fresh venv (pip checks every hash; the",
        "# project itself goes in without dependencies, since pip cannot hash a source folder):",
        "#   pip install torch==2.13.0 && pip install -r constraints.txt && pip install --no-deps -e .",
        f"# Written by `python scripts/constraints.py lock` on {date.today()} on {platform.system()} "
        f"{platform.machine()}, Python {platform.python_version()}:",
        "# the hashes are those of this platform's files; elsewhere drop the --hash parts. torch is not pinned here",
        "# (its build comes from the CPU pin or your CUDA index). `python scripts/constraints.py check` names the",
        "# drift of an environment from this file.",
    ]
    for package in sorted(packages, key=lambda p: canonical(p["name"])):
        if canonical(package["name"]) in LEFT_OUT:
            continue
        hashes = [entry["hashes"]["sha256"] for entry in package.get("wheels", []) + [package.get("sdist", {})]
                  if entry.get("hashes", {}).get("sha256")]
        if not hashes:
            raise SystemExit(f"pip lock gave no sha256 for {package['name']}; cannot pin it with a hash")
        lines.append(f"{canonical(package['name'])}=={package['version']} "
                     + " ".join(f"--hash=sha256:{h}" for h in hashes))
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path} ({sum(not line.startswith('#') for line in lines)} packages)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("lock", "check"))
    parser.add_argument("--constraints", type=Path, default=CONSTRAINTS, help="the file (default: constraints.txt)")
    parser.add_argument("--strict", action="store_true", help="check: exit 1 when anything drifted")
    args = parser.parse_args(argv)
    return lock(args.constraints) if args.action == "lock" else check(args.constraints, args.strict)


if __name__ == "__main__":
    sys.exit(main())
