"""Which presets the demo offers and their files: the bundled presets matching the model, the one a name (or an
upload) refers to, fitting a preset to the one model, and loading or saving preset YAML for the user."""

from __future__ import annotations

import dataclasses
import re
import tempfile
from pathlib import Path

from ..bundled import list_presets, load_preset
from ..preset import Preset, PresetError
from ..wrapper import BackpatchedModel, wrap
from .errors import _fail

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _shorten(message: str, path: str | Path) -> str:
    """Error messages name the uploaded temp file; show its base name instead."""
    return message.replace(str(path), Path(str(path)).name)


class PresetsMixin:
    """:class:`~backpatch.demo.Demo`'s preset actions (it holds ``model``, ``processor``, ``preset``, ``presets``,
    ``num_layers`` and ``_save_dir``)."""

    def _matching_presets(self) -> dict[str, Preset]:
        """The starting preset, then the bundled presets whose ``match`` fits this model."""
        found = {self.preset.name: self.preset}
        model_type = getattr(self.model.config, "model_type", "")
        name = getattr(self.model.config, "_name_or_path", None)
        for preset_name in list_presets():
            if preset_name in found:
                continue
            try:
                candidate = load_preset(preset_name)
            except PresetError:  # pragma: no cover - bundled presets are tested
                continue
            if candidate.match is not None and candidate.match.matches(model_type, name, self.model.config):
                found[preset_name] = candidate
        return found

    def base_preset(self, name: str | None, uploaded: dict | None = None) -> Preset:
        if name is None or name == "":
            return self.preset
        if uploaded and name in uploaded:
            return uploaded[name]
        if name in self.presets:
            return self.presets[name]
        try:
            return load_preset(name)
        except PresetError as exc:
            raise _fail(f"Unknown preset: {exc}") from None

    def fit(self, preset: Preset) -> BackpatchedModel:
        """Wrap the one model with ``preset``; a preset that does not fit the model is a friendly error."""
        try:
            return wrap(self.model, preset, processor=self.processor)
        except PresetError as exc:
            raise _fail(f"The preset does not fit this model ({self.num_layers} decoder layers): {exc}") from None

    def load_preset_file(self, path: str | Path) -> Preset:
        """A user's preset YAML, checked against the model."""
        try:
            preset = Preset.from_yaml(path)
        except PresetError as exc:
            raise _fail(f"That preset file is not valid: {_shorten(str(exc), path)}") from None
        self.fit(preset)
        return preset

    def save_preset(self, preset: Preset, name: str | None = None) -> Path:
        """Write ``preset`` (renamed to ``name``) as YAML into a fresh file for download."""
        name = (name or preset.name).strip()
        if not _NAME_RE.match(name):
            raise _fail("A preset name may hold only letters, digits, '.', '_' and '-' (it is also the file name).")
        if name != preset.name:
            preset = dataclasses.replace(preset, name=name)
        self.fit(preset)
        folder = Path(tempfile.mkdtemp(dir=self._save_dir))
        path = folder / f"{name}.yaml"
        preset.to_yaml(path)
        return path
