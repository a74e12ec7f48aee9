"""The presets that ship with backpatch (``presets/`` in the repo, package data ``backpatch.presets`` in the wheel)."""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any

from .preset import Preset, PresetError

__all__ = ["bundled_preset_dir", "find_matching_preset", "list_presets", "load_preset"]

logger = logging.getLogger(__name__)

_SUFFIX = ".yaml"


def bundled_preset_dir() -> Path:
    """Directory holding the bundled YAML files.

    In a wheel they are package data at ``backpatch/presets/``; in a source checkout (editable install or
    ``PYTHONPATH``) they are ``presets/`` at the repo root, beside the package.
    """
    installed = Path(str(resources.files("backpatch"))) / "presets"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parent.parent / "presets"


def list_presets() -> list[str]:
    """Names of the bundled presets, sorted."""
    return sorted(p.name[: -len(_SUFFIX)] for p in bundled_preset_dir().glob(f"*{_SUFFIX}"))


def load_preset(name_or_path: str | Path) -> Preset:
    """Load a bundled preset by name, or any preset file by path.

    A string that names an existing file (or ends in ``.yaml``/``.yml``) is a path; anything else is looked up
    among the bundled presets, and an unknown name lists the ones that exist.
    """
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists() or isinstance(name_or_path, Path):
        return Preset.from_yaml(candidate)
    path = bundled_preset_dir() / f"{name_or_path}{_SUFFIX}"
    if not path.is_file():
        raise PresetError(
            f"no bundled preset named {str(name_or_path)!r}; bundled presets: {', '.join(list_presets())}. "
            "Pass a path to a .yaml file to use your own."
        )
    return Preset.from_yaml(path)


def find_matching_preset(model_type: str, name_or_path: str | None, config: Any = None) -> Preset:
    """The bundled preset whose ``match`` fits this model; config values beat a name glob, which beats a bare
    model_type match."""
    scored: list[tuple[int, str, Preset]] = []
    for name in list_presets():
        preset = load_preset(name)
        if preset.match is not None and preset.match.matches(model_type, name_or_path, config):
            scored.append((preset.match.specificity, name, preset))
    if not scored:
        raise PresetError(
            f"no bundled preset matches this model (model_type {model_type!r}, name_or_path {name_or_path!r}). "
            f"Bundled presets: {', '.join(list_presets())}. Pass one with wrap(model, 'NAME'), or write your own "
            "YAML file (see 'Presets' in the README: name, match.model_type, patches: [{source, target}]) "
            "and pass its path."
        )
    scored.sort(key=lambda item: (-item[0], item[1]))
    best = scored[0]
    ties = [name for spec, name, _ in scored if spec == best[0]]
    if len(ties) > 1:
        logger.warning("several bundled presets match model_type %r: %s; using %r", model_type, ties, best[1])
    return best[2]
