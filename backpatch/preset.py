"""Presets: back-patching settings as data (the schema: "Presets" in the README).

A preset is plain data, like PEFT's ``LoraConfig``: dataclasses with defaults, validated on construction,
with ``to_dict``/``from_dict`` and YAML I/O at the edges. Every validation error is a :class:`PresetError`
that names the file (when there is one), the key path (``patches[1].mode``), what was given and what is
allowed, so a user can fix a hand-written YAML file without reading our code.

Checks that need the real model (layer ranges, ``num_layers``, the audio token) happen at ``wrap()`` time,
in :mod:`backpatch.engine.architectures`.
Which method sections a preset may hold is read from the method registry (:mod:`backpatch.registry`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .registry import Method, registered_methods
from .validation import (
    PresetError,
    check_choice,
    check_float,
    check_int,
    check_mapping,
    check_str,
    fail,
    join,
    require,
    section_from_dict,
    type_name,
)

if TYPE_CHECKING:  # the built-in methods' configs live above the schema (backpatch/methods/); names only
    from .methods import Attention, Contrastive, Gate, Patch, Steering

__all__ = [
    "AudioSpan",
    "Calibration",
    "Match",
    "ModelFacts",
    "Preset",
    "PresetError",
    "methods_details",
    "methods_label",
]

CALIBRATION_STATUSES = ("uncalibrated", "calibrated")
SCHEMA_VERSION = 1


@dataclass
class Match:
    """How ``wrap(model)`` finds this preset automatically: ``model.config.model_type``, a name glob, and config values.

    ``config`` maps dotted attributes of ``model.config`` to the values they must have. It is what survives a
    copy of a checkpoint to another folder (the path glob does not), so the organisms' presets match on it.
    """

    model_type: str
    name_or_path: str | None = None
    config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self._validate("match", None)

    def _validate(self, where: str, origin: str | None) -> None:
        check_str(self.model_type, join(where, "model_type"), origin)
        if self.name_or_path is not None:
            check_str(self.name_or_path, join(where, "name_or_path"), origin)
        if self.config is not None:
            if not isinstance(self.config, Mapping) or not self.config:
                raise fail(join(where, "config"), "expected a non-empty mapping of config attribute -> value, "
                            f"got {self.config!r}", origin)
            for key, value in self.config.items():
                check_str(key, join(where, "config"), origin)
                if not isinstance(value, (str, int, float, bool)):
                    raise fail(join(where, f"config.{key}"), "expected a string, number or boolean, got "
                                f"{type_name(value)}", origin)

    def matches(self, model_type: str, name_or_path: str | None, config: Any = None) -> bool:
        if model_type != self.model_type:
            return False
        if self.config is not None:
            missing = object()
            for key, want in self.config.items():
                value = config
                for part in key.split("."):
                    value = getattr(value, part, missing) if value is not None else missing
                if value is missing or value != want:
                    return False
        if self.name_or_path is None:
            return True
        # Hub ids differ in case between copies and mirrors ("gemma-3n-E2B" vs "gemma-3n-e2b"): match without case.
        return fnmatch.fnmatchcase((name_or_path or "").lower(), self.name_or_path.lower())

    @property
    def specificity(self) -> int:
        """Config values beat a name glob, which beats a bare model_type."""
        return 2 * (self.config is not None) + (self.name_or_path is not None)


@dataclass
class ModelFacts:
    """Optional architecture facts: where the decoder layers are, and how many the real checkpoint has."""

    layers: str | None = None
    num_layers: int | None = None

    def __post_init__(self) -> None:
        self._validate("model", None)

    def _validate(self, where: str, origin: str | None) -> None:
        if self.layers is not None:
            check_str(self.layers, join(where, "layers"), origin)
        if self.num_layers is not None:
            check_int(self.num_layers, join(where, "num_layers"), origin)
            if self.num_layers < 1:
                raise fail(join(where, "num_layers"), f"must be >= 1, got {self.num_layers}", origin)


@dataclass
class AudioSpan:
    """How audio positions are found: exactly one of a token id, a token string, or a config attribute path.

    All unset means "auto-detect from the model config" (``audio_token_index``, ``audio_token_id``,
    ``audio_config.audio_token_id``).
    """

    token_id: int | None = None
    token: str | None = None
    config: str | None = None

    def __post_init__(self) -> None:
        self._validate("audio_span", None)

    def _validate(self, where: str, origin: str | None) -> None:
        if self.token_id is not None:
            check_int(self.token_id, join(where, "token_id"), origin)
            if self.token_id < 0:
                raise fail(join(where, "token_id"), f"must be >= 0, got {self.token_id}", origin)
        if self.token is not None:
            check_str(self.token, join(where, "token"), origin)
        if self.config is not None:
            check_str(self.config, join(where, "config"), origin)
        given = [k for k in ("token_id", "token", "config") if getattr(self, k) is not None]
        if len(given) > 1:
            raise fail(where, f"give only one of token_id, token, config (got {', '.join(given)})", origin)


@dataclass
class Calibration:
    """Provenance of the patch settings; ``backpatch calibrate`` fills it. Never claim unmeasured numbers.

    ``data`` names the calibration data portably (relative to where calibration ran, or its last path parts, never
    one machine's absolute path), ``data_sha256`` identifies it anywhere, ``command`` is the command that made the
    preset (paths made portable the same way)."""

    status: str = "uncalibrated"
    data: str | None = None
    metrics: dict[str, float | int] = field(default_factory=dict)
    data_sha256: str | None = None
    command: str | None = None

    def __post_init__(self) -> None:
        self._validate("calibration", None)

    def _validate(self, where: str, origin: str | None) -> None:
        check_choice(self.status, CALIBRATION_STATUSES, join(where, "status"), origin)
        for key in ("data", "data_sha256", "command"):
            if getattr(self, key) is not None:
                check_str(getattr(self, key), join(where, key), origin)
        if not isinstance(self.metrics, Mapping):
            raise fail(join(where, "metrics"), f"expected a mapping of name: number, got {type_name(self.metrics)}",
                        origin)
        for key, value in self.metrics.items():
            check_str(key, join(where, "metrics"), origin)
            number = check_float(value, join(join(where, "metrics"), str(key)), origin)
            # counts (n_conflict, perturbed_n_conflict, ...) stay integers; a count read back as 720.0 from an older
            # file is one too
            is_count = key.startswith("n_") or "_n_" in key
            self.metrics[key] = int(number) if is_count and number.is_integer() else number


#: preset keys of methods that are dataclass fields of :class:`Preset` (the built-ins; a registered plugin's section
#: lives in ``Preset.extensions``): ``Preset(patches=[...], contrastive=Contrastive())`` keeps working as documented
_FIELD_SECTIONS = ("patches", "contrastive", "attention", "steering", "gate")
#: the schema's own sections (not methods), in the order a written preset shows them
_SCHEMA_SECTIONS: dict[str, type] = {"match": Match, "model": ModelFacts, "audio_span": AudioSpan}


@dataclass
class Preset:
    """A named set of interventions (patches and method blocks) plus the facts needed to apply them to one model
    family. Which sections exist is read from the method registry (:mod:`backpatch.registry`)."""

    patches: list[Patch] = field(default_factory=list)
    name: str = "custom"
    description: str | None = None
    match: Match | None = None
    model: ModelFacts | None = None
    audio_span: AudioSpan | None = None
    contrastive: Contrastive | None = None
    attention: Attention | None = None
    steering: Steering | None = None
    gate: Gate | None = None
    calibration: Calibration | None = None
    #: sections of methods registered from outside the package (``{key: config}``), read and written like the rest
    extensions: dict[str, Any] = field(default_factory=dict)
    #: where this preset was read from (a file path or ``bundled:NAME``); used in error messages, not saved.
    origin: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._validate(self.origin)

    # ----------------------------------------------------------------------------------------- sections
    def section(self, key: str) -> Any:
        """The setting of the method with preset key ``key`` (None, or an empty list, when the preset has none)."""
        if key in _FIELD_SECTIONS:
            return getattr(self, key)
        return self.extensions.get(key)

    def with_section(self, key: str, config: Any) -> Preset:
        """A copy with the setting of method ``key`` replaced (None removes it)."""
        return self.with_sections({key: config})

    @classmethod
    def from_sections(cls, sections: dict[str, Any], **fields: Any) -> Preset:
        """A new preset from methods' settings by key (``{"patches": [...], "scale_audio": ...}``, None for unset)
        and the schema's ``fields`` (name, match, ...): built-ins' sections become fields, a plugin's an extension."""
        return cls(**_placed(sections, fields, {}))

    def with_sections(self, sections: dict[str, Any], **fields: Any) -> Preset:
        """A copy with several methods' settings (``{key: setting or None}``) and schema ``fields`` replaced at once:
        the result is checked as a whole, so settings that need each other can change together."""
        return dataclasses.replace(self, **_placed(sections, fields, self.extensions))

    def methods(self) -> list[tuple[Method, Any]]:
        """``(method, setting)`` for every registered method this preset sets, in registry order."""
        return [(m, self.section(m.key)) for m in registered_methods() if m.present(self.section(m.key))]

    def needs_null_rows(self) -> bool:
        """Whether any setting needs the null-audio rows in the batch (the one rule; the engine, the wrapper, the
        calibration and the demo ask here)."""
        return any(m.needs_null_rows(config) for m, config in self.methods())

    def _validate(self, origin: str | None) -> None:
        check_str(self.name, "name", origin)
        if self.description is not None and not isinstance(self.description, str):
            raise fail("description", f"expected a string, got {type_name(self.description)}", origin)
        if not isinstance(self.patches, list):
            raise fail("patches", f"expected a list of patches, got {type_name(self.patches)}", origin)
        if not isinstance(self.extensions, dict):
            raise fail("extensions", f"expected a mapping of method key -> setting, got {type_name(self.extensions)}",
                       origin)
        methods = {m.key: m for m in registered_methods()}
        for key in self.extensions:
            if key not in methods or key in _FIELD_SECTIONS:
                raise fail(key, f"no registered method reads this section; registered: {', '.join(methods)}", origin)
        present = self.methods()
        if not any(m.standalone for m, _ in present):
            raise fail("patches", f"a preset needs at least one patch (a list of {{source, target, ...}}) or "
                       f"{_blocks_phrase(methods.values())}", origin)
        for key, cls in _SCHEMA_SECTIONS.items():
            value = getattr(self, key)
            if value is not None and not isinstance(value, cls):
                raise fail(key, f"expected a {cls.__name__}, got {type_name(value)}", origin)
        if self.calibration is not None and not isinstance(self.calibration, Calibration):
            raise fail("calibration", f"expected a Calibration, got {type_name(self.calibration)}", origin)
        for key, method in methods.items():
            config = self.section(key)
            if method.present(config) and not method.accepts(config):
                wanted = f"a list of {method.config_cls.__name__}" if method.many else f"a {method.config_cls.__name__}"
                item = next((c for c in config if not isinstance(c, method.config_cls)), config) if method.many \
                    else config
                where = f"{key}[{config.index(item)}]" if method.many and item is not config else key
                raise fail(where, f"expected {wanted}, got {type_name(item)}", origin)
        for method, config in present:
            method.check(self, config, origin)

    # ----------------------------------------------------------------------------------------- dict I/O
    @classmethod
    def from_dict(cls, data: Any, origin: str | None = None) -> Preset:
        """Build a preset from plain data (e.g. parsed YAML); ``origin`` names the source in error messages."""
        methods = registered_methods()
        keys = ("version", "name", "description", *_SCHEMA_SECTIONS, *(m.key for m in methods), "calibration")
        data = check_mapping(data, "", origin, keys)
        if "version" in data and data["version"] != SCHEMA_VERSION:
            raise fail("version", f"unsupported schema version {data['version']!r}; this backpatch reads version "
                       f"{SCHEMA_VERSION}", origin)
        name = check_str(require(data, "name", "", origin), "name", origin)
        blocks = _blocks_phrase(methods)
        if not any(data.get(m.key) is not None for m in methods if m.standalone and not m.many):
            # only list sections (patches) can carry the preset: the list is required and may not be empty
            if "patches" not in data:
                raise fail("patches", f"required key is missing: a preset needs patches, or {blocks}", origin)
            if not isinstance(data["patches"], list) or not data["patches"]:
                raise fail("patches", "expected a non-empty list of patches ({source, target, scale, mode, "
                           f"positions}}), or {blocks}", origin)
        sections: dict[str, Any] = {}
        extensions: dict[str, Any] = {}
        for method in methods:
            raw = data.get(method.key)
            if raw is None:
                continue
            config = method.parse(raw, method.key, origin)
            (sections if method.key in _FIELD_SECTIONS else extensions)[method.key] = config
        schema = {key: section_from_dict(section_cls, data[key], key, origin)
                  for key, section_cls in (*_SCHEMA_SECTIONS.items(), ("calibration", Calibration))
                  if data.get(key) is not None}
        return cls(name=name, description=data.get("description"), origin=origin, extensions=extensions,
                   **sections, **schema)

    def to_dict(self) -> dict[str, Any]:
        """Plain data in schema order, leaving out unset optional fields, so YAML files stay readable."""
        out: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            out["description"] = self.description
        for key in _SCHEMA_SECTIONS:
            section = getattr(self, key)
            if section is not None:
                out[key] = {k: v for k, v in dataclasses.asdict(section).items() if v is not None}
        present = self.methods()
        if not any(m.standalone and not m.many for m, _ in present):
            out["patches"] = []  # a preset carried by its patches always shows the list, even when empty
        for method, config in present:
            out[method.key] = method.dump(config)
        if self.calibration is not None:
            cal = dataclasses.asdict(self.calibration)
            out["calibration"] = {k: v for k, v in cal.items() if v is not None and v != {}}
        return out

    # ----------------------------------------------------------------------------------------- YAML I/O
    @classmethod
    def from_yaml(cls, path: str | Path) -> Preset:
        """Read a preset file (``yaml.safe_load`` only: a preset can never run code)."""
        path = Path(path)
        origin = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PresetError(f"{origin}: file not found") from None
        return cls.from_yaml_text(text, origin=origin)

    @classmethod
    def from_yaml_text(cls, text: str, origin: str | None = None) -> Preset:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PresetError(f"{origin or '<yaml>'}: not valid YAML: {exc}") from None
        return cls.from_dict(data, origin=origin)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """Serialize to YAML; write it to ``path`` when given. Returns the text either way."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text


def _placed(sections: dict[str, Any], fields: dict[str, Any], extensions: dict[str, Any]) -> dict[str, Any]:
    """``Preset`` keyword arguments for methods' settings by key: a built-in's is a field (no patches: ``[]``), a
    plugin's an entry of ``extensions`` (None removes it)."""
    out, extensions = dict(fields), dict(extensions)
    for key, config in sections.items():
        if key in _FIELD_SECTIONS:
            out[key] = [] if config is None and key == "patches" else config
        elif config is None:
            extensions.pop(key, None)
        else:
            extensions[key] = config
    return {**out, "extensions": extensions}


def _blocks_phrase(methods: Any) -> str:
    """"a contrastive, attention or steering block": the sections that can carry a preset besides patches."""
    names = [m.key for m in methods if m.standalone and not m.many]
    if not names:
        return "another method's block"
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    return f"a {listed} block"


def methods_label(preset: Preset) -> str:
    """What ``preset`` does, in a few words (``contrastive a=2 + gate``, ``back-patched 20->18``), from each method's
    own label.

    For the labels people read beside an answer or over a column (eval's table, ``backpatch run``, the demo): a
    preset that only decodes contrastively is not "back-patched", so the label names the methods it runs. A setting
    that does not act (contrastive ``alpha: 0``, whose rows only feed the gate or the steering) is named only when
    nothing else would be. Report keys ("backpatched") stay as they are; they are a contract, not a description.
    """
    present = preset.methods()
    acting = [(m, c) for m, c in present if m.acts(c)]
    if not any(m.standalone for m, _ in acting):
        acting = [(m, c) for m, c in present if m.acts(c) or m.standalone]
    labels = [m.label(c) for m, c in acting]
    return " + ".join(label for label in labels if label) or "no method"


def methods_details(preset: Preset) -> str:
    """Every method of ``preset`` with its settings on one line: the long form of :func:`methods_label`, for
    ``backpatch presets`` and the demo."""
    return "; ".join(line for method, config in preset.methods() for line in method.details(config))
