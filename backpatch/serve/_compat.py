"""Which transformers releases ``backpatch serve`` can build on, checked before any of their server internals load.

``backpatch serve`` composes pieces of ``transformers.cli.serving`` that are not transformers' public API
(``ModelManager``, ``TimedModel``, ``ChatCompletionHandler``, ``GenerationState``, ``build_server``). They change
between minor releases: 5.25 moved generation into a spawned model process, where hooks installed in the server's
own process would never run. So the ``serve`` extra is bounded to the releases this code is tested with
(``pyproject.toml`` holds the same range; a test checks that the two agree), and an installed release outside it is
named in the error instead of a bare ``cannot import name ...``.
"""

from __future__ import annotations

import importlib.util

import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version

__all__ = ["SUPPORTED_TRANSFORMERS", "check_serving_installed", "describe_import_failure"]

#: the transformers releases ``backpatch serve`` is tested with (the ``serve`` extra's range in pyproject.toml)
SUPPORTED_TRANSFORMERS = SpecifierSet(">=5.20,<5.25")
_RANGE = ">=5.20,<5.25"  # as written in pyproject.toml (a SpecifierSet prints its parts sorted: "<5.25,>=5.20")
#: the packages transformers' server needs (its ``serving`` extra)
_SERVING_PACKAGES = ("fastapi", "uvicorn", "openai", "pydantic")
_FIX = f"pip install 'transformers[serving]{_RANGE}'"


def check_serving_installed(version: str | None = None) -> None:
    """Raise ``ImportError`` naming what is wrong (a missing package, or the installed transformers release and the
    range backpatch serve needs) and the one command that fixes it; return quietly when serving can load."""
    version = version or transformers.__version__
    if not SUPPORTED_TRANSFORMERS.contains(Version(version), prereleases=True):
        raise ImportError(
            f"backpatch serve builds on transformers' server internals, tested with transformers "
            f"{_RANGE}, but transformers {version} is installed (5.25 and later run the model in a "
            f"separate process that backpatch's hooks cannot reach): {_FIX}")
    missing = [name for name in _SERVING_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"backpatch serve needs transformers' serving packages; not installed: {', '.join(missing)}"
                          f": pip install 'backpatch[serve]'")


def describe_import_failure(exc: ImportError) -> str:
    """One sentence for an import that failed although the serving packages are installed: what failed and which
    transformers release is installed (never "install the extra", which the user already has)."""
    return (f"backpatch serve could not import {exc.name or 'a module'} ({exc}) with transformers "
            f"{transformers.__version__} installed; it is tested with transformers {_RANGE}: {_FIX}")
