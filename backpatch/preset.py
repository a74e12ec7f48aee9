"""Presets: back-patching settings as data (the schema: "Presets" in the README).

A preset is plain data, like PEFT's ``LoraConfig``: dataclasses with defaults, validated on construction,
with ``to_dict``/``from_dict`` and YAML I/O at the edges. Every validation error is a :class:`PresetError`
that names the file (when there is one), the key path (``patches[1].mode``), what was given and what is
allowed, so a user can fix a hand-written YAML file without reading our code.

Checks that need the real model (layer ranges, ``num_layers``, the audio token) happen at ``wrap()`` time,
in :mod:`backpatch._resolve`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "MODES",
    "POSITIONS",
    "AudioSpan",
    "Calibration",
    "Contrastive",
    "Gate",
    "Match",
    "ModelFacts",
    "Patch",
    "Preset",
    "PresetError",
]

MODES = ("add", "replace", "interpolate")
POSITIONS = ("audio", "last", "audio+last")
CALIBRATION_STATUSES = ("uncalibrated", "calibrated")
SCHEMA_VERSION = 1


class PresetError(ValueError):
    """An invalid preset, or a preset that does not fit the model it is applied to."""


def _fail(where: str, message: str, origin: str | None = None) -> PresetError:
    prefix = f"{origin}: " if origin else ""
    return PresetError(f"{prefix}{where}: {message}")


def _type_name(value: Any) -> str:
    return type(value).__name__


def _check_int(value: Any, where: str, origin: str | None) -> int:
    # bool is an int subclass; `source: true` is a typo, not layer 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, f"expected an integer, got {value!r} ({_type_name(value)})", origin)
    return value


def _check_float(value: Any, where: str, origin: str | None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(where, f"expected a number, got {value!r} ({_type_name(value)})", origin)
    if not math.isfinite(value):
        raise _fail(where, f"expected a finite number, got {value!r}", origin)
    return float(value)


def _check_str(value: Any, where: str, origin: str | None) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(where, f"expected a non-empty string, got {value!r} ({_type_name(value)})", origin)
    return value


def _check_choice(value: Any, allowed: tuple[str, ...], where: str, origin: str | None) -> str:
    if value not in allowed:
        raise _fail(where, f"{value!r} is not allowed; use one of: {', '.join(allowed)}", origin)
    return value


def _check_mapping(value: Any, where: str, origin: str | None, allowed_keys: tuple[str, ...]) -> Mapping:
    if not isinstance(value, Mapping):
        raise _fail(where, f"expected a mapping with keys {', '.join(allowed_keys)}, got {_type_name(value)}", origin)
    unknown = [k for k in value if k not in allowed_keys]
    if unknown:
        raise _fail(
            f"{where}.{unknown[0]}" if where else str(unknown[0]),
            f"unknown key; allowed keys here: {', '.join(allowed_keys)}",
            origin,
        )
    return value


def _require(data: Mapping, key: str, where: str, origin: str | None) -> Any:
    if key not in data:
        raise _fail(f"{where}.{key}" if where else key, "required key is missing", origin)
    return data[key]


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def patch_label(patch: Any) -> str:
    """``source->target mode xscale @positions``: one line per patch, for the CLI, reprs and sweep tables.

    Takes anything with the five patch fields (a :class:`Patch`, a resolved patch, a calibration setting).
    """
    norm = " norm-matched" if getattr(patch, "match_norm", False) else ""
    return f"{patch.source}->{patch.target} {patch.mode} x{patch.scale:g} @{patch.positions}{norm}"


def gate_label(gate: Any) -> str:
    """``gate audio_gap >= 0.2`` (a step) or ``gate certainty 0.3..0.7`` (a ramp): one line, like patch_label."""
    if gate.low == gate.high:
        return f"gate {gate.signal} >= {gate.low:g}"
    return f"gate {gate.signal} {gate.low:g}..{gate.high:g}"


def block_labels(preset: Any) -> list[str]:
    """One label per attention or steering block of ``preset`` (empty when it has none), like patch_label."""
    labels = []
    if getattr(preset, "attention", None) is not None:
        a = preset.attention
        labels.append(f"attention to audio {a.layers[0]}..{a.layers[1]} {a.form} alpha {a.alpha:g}")
    if getattr(preset, "steering", None) is not None:
        st = preset.steering
        labels.append(f"steering {st.layers[0]}..{st.layers[1]} beta {st.beta:g}")
    return labels


def methods_label(preset: Any) -> str:
    """What ``preset`` does, in a few words: ``contrastive a=2 + gate``, ``back-patched 20->18``,
    ``back-patched 20->18 + contrastive a=1``.

    For the labels people read beside an answer or over a column (eval's table, ``backpatch run``, the demo): a
    preset that only decodes contrastively is not "back-patched", so the label names the methods it runs. Report
    keys ("backpatched") stay as they are; they are a contract, not a description.
    """
    parts = []
    if preset.patches:
        first = preset.patches[0]
        parts.append(f"back-patched {first.source}->{first.target}" if len(preset.patches) == 1
                     else f"back-patched ({len(preset.patches)} patches)")
    blocks = preset.attention is not None or preset.steering is not None
    contrastive = preset.contrastive
    # alpha 0 rows only feed the gate or the steering: not a method of their own unless nothing else runs
    if contrastive is not None and (contrastive.alpha > 0 or not (parts or blocks)):
        parts.append(f"contrastive a={contrastive.alpha:g}")
    if preset.attention is not None:
        parts.append(f"attention a={preset.attention.alpha:g}")
    if preset.steering is not None:
        parts.append(f"steering b={preset.steering.beta:g}")
    if preset.gate is not None:
        parts.append("gate")
    return " + ".join(parts) or "no method"


def methods_details(preset: Any) -> str:
    """Every method of ``preset`` with its settings on one line (patches, contrastive decoding, attention and
    steering blocks, the gate): the long form of :func:`methods_label`, for ``backpatch presets`` and the demo."""
    parts = [patch_label(p) for p in preset.patches]
    if preset.contrastive is not None:
        parts.append(f"contrastive alpha {preset.contrastive.alpha:g} ({preset.contrastive.null_audio})")
    parts += block_labels(preset)
    if preset.gate is not None:
        parts.append(gate_label(preset.gate))
    return "; ".join(parts)


@dataclass
class Patch:
    """One back-patch: route layer ``source``'s output back into layer ``target`` at ``positions``.

    Layer indices refer to decoder blocks of the language model and may be negative (``-1`` = last block).
    Whether they fit the model is checked at ``wrap()`` time; here we only reject what can never be valid.
    """

    source: int
    target: int
    scale: float = 1.0
    mode: str = "add"
    positions: str = "audio"
    #: rescale the captured states, per position, to the norm of the target layer's states before combining.
    #: Late-layer states are much larger than early ones; on smol-whisper norm matching made 14 more of 104
    #: settings harmless (README, "Norm-matched combine"). Default off, and then bit-identical to no key at all.
    match_norm: bool = False

    def __post_init__(self) -> None:
        self._validate("Patch", None)

    def _validate(self, where: str, origin: str | None) -> None:
        _check_int(self.source, _join(where, "source"), origin)
        _check_int(self.target, _join(where, "target"), origin)
        self.scale = _check_float(self.scale, _join(where, "scale"), origin)
        _check_choice(self.mode, MODES, _join(where, "mode"), origin)
        _check_choice(self.positions, POSITIONS, _join(where, "positions"), origin)
        if not isinstance(self.match_norm, bool):
            raise _fail(_join(where, "match_norm"), f"expected true or false, got {self.match_norm!r} "
                        f"({_type_name(self.match_norm)})", origin)
        # With both indices on the same side of zero the order is known without the model.
        if (self.source >= 0) == (self.target >= 0) and self.source <= self.target:
            raise _fail(
                _join(where, "source"),
                f"source ({self.source}) must be a later layer than target ({self.target}): back-patching routes "
                "late states back into an earlier layer",
                origin,
            )


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
        _check_str(self.model_type, _join(where, "model_type"), origin)
        if self.name_or_path is not None:
            _check_str(self.name_or_path, _join(where, "name_or_path"), origin)
        if self.config is not None:
            if not isinstance(self.config, Mapping) or not self.config:
                raise _fail(_join(where, "config"), "expected a non-empty mapping of config attribute -> value, "
                            f"got {self.config!r}", origin)
            for key, value in self.config.items():
                _check_str(key, _join(where, "config"), origin)
                if not isinstance(value, (str, int, float, bool)):
                    raise _fail(_join(where, f"config.{key}"), "expected a string, number or boolean, got "
                                f"{_type_name(value)}", origin)

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
            _check_str(self.layers, _join(where, "layers"), origin)
        if self.num_layers is not None:
            _check_int(self.num_layers, _join(where, "num_layers"), origin)
            if self.num_layers < 1:
                raise _fail(_join(where, "num_layers"), f"must be >= 1, got {self.num_layers}", origin)


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
            _check_int(self.token_id, _join(where, "token_id"), origin)
            if self.token_id < 0:
                raise _fail(_join(where, "token_id"), f"must be >= 0, got {self.token_id}", origin)
        if self.token is not None:
            _check_str(self.token, _join(where, "token"), origin)
        if self.config is not None:
            _check_str(self.config, _join(where, "config"), origin)
        given = [k for k in ("token_id", "token", "config") if getattr(self, k) is not None]
        if len(given) > 1:
            raise _fail(where, f"give only one of token_id, token, config (got {', '.join(given)})", origin)


@dataclass
class Calibration:
    """Provenance of the patch settings; ``backpatch calibrate`` fills it. Never claim unmeasured numbers."""

    status: str = "uncalibrated"
    data: str | None = None
    metrics: dict[str, float | int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._validate("calibration", None)

    def _validate(self, where: str, origin: str | None) -> None:
        _check_choice(self.status, CALIBRATION_STATUSES, _join(where, "status"), origin)
        if self.data is not None:
            _check_str(self.data, _join(where, "data"), origin)
        if not isinstance(self.metrics, Mapping):
            raise _fail(_join(where, "metrics"), f"expected a mapping of name: number, got {_type_name(self.metrics)}",
                        origin)
        for key, value in self.metrics.items():
            _check_str(key, _join(where, "metrics"), origin)
            number = _check_float(value, _join(_join(where, "metrics"), str(key)), origin)
            # counts (n_conflict, ...) stay integers; a count read back as 720.0 from an older file is one too
            self.metrics[key] = int(number) if key.startswith("n_") and number.is_integer() else number


NULL_AUDIO = ("silence", "zeros")


@dataclass
class Contrastive:
    """Audio-aware contrastive decoding: ``(1 + alpha) * l(audio) - alpha * l(null audio)`` at every step.

    ``plausibility`` (optional) keeps only tokens with ``p(y | audio) >= plausibility * max p`` eligible.
    """

    alpha: float = 1.0
    null_audio: str = "silence"
    plausibility: float | None = None

    def __post_init__(self) -> None:
        self._validate("contrastive", None)

    def _validate(self, where: str, origin: str | None) -> None:
        self.alpha = _check_float(self.alpha, _join(where, "alpha"), origin)
        if self.alpha < 0:
            raise _fail(_join(where, "alpha"), f"must be >= 0 (0 turns it off), got {self.alpha}", origin)
        _check_choice(self.null_audio, NULL_AUDIO, _join(where, "null_audio"), origin)
        if self.plausibility is not None:
            self.plausibility = _check_float(self.plausibility, _join(where, "plausibility"), origin)
            if not 0.0 <= self.plausibility <= 1.0:
                raise _fail(_join(where, "plausibility"), f"must be in [0, 1], got {self.plausibility}", origin)


GATE_SIGNALS = ("audio_gap", "certainty")


@dataclass
class Gate:
    """Audio-confidence gate: every mitigation in the preset acts per row (and per step) in proportion to how much
    the audio supports the answer (README, "Audio-confidence gate"; design notes in docs/design.md).

    ``signal`` is measured on the unpatched first-token distribution for the patches (one value per row, before
    the patched prefill) and on each step's distributions for contrastive decoding:

    - ``audio_gap``: total variation distance between ``p(y | audio, prompt)`` and ``p(y | null audio, prompt)``,
      in [0, 1]: how far the audio moves the answer from what the prompt alone predicts. Needs the null-audio rows
      of a ``contrastive`` block (its ``alpha`` may be 0: the rows then only feed the gate).
    - ``certainty``: ``exp(-entropy)`` of ``p(y | audio, prompt)``, in (0, 1]: how sure the audio-conditioned
      model is.

    The strength is ``clip((signal - low) / (high - low), 0, 1)`` (a step at ``low`` when ``low == high``): patch
    states become ``h + g * (patched - h)``, contrastive alpha becomes ``g * alpha``. No gate block: every
    mitigation at full strength, bit-identical to a preset without the key.
    """

    signal: str = "audio_gap"
    low: float = 0.1
    high: float = 0.3

    def __post_init__(self) -> None:
        self._validate("gate", None)

    def __hash__(self) -> int:  # calibration keeps candidates (which may carry a gate) in sets and dict keys
        return hash((self.signal, self.low, self.high))

    def _validate(self, where: str, origin: str | None) -> None:
        _check_choice(self.signal, GATE_SIGNALS, _join(where, "signal"), origin)
        for key in ("low", "high"):
            value = _check_float(getattr(self, key), _join(where, key), origin)
            if not 0.0 <= value <= 1.0:
                raise _fail(_join(where, key), f"must be in [0, 1] (the signal's range), got {value}", origin)
            setattr(self, key, value)
        if self.low > self.high:
            raise _fail(_join(where, "low"), f"low ({self.low}) must not exceed high ({self.high})", origin)

    def strength(self, signal: Any) -> Any:
        """The gate value for a signal (a float or a tensor): 0 below ``low``, 1 from ``high`` on, linear between."""
        if self.high == self.low:
            return (signal >= self.low) * 1.0
        ramp = (signal - self.low) / (self.high - self.low)
        return ramp.clamp(0.0, 1.0) if hasattr(ramp, "clamp") else min(1.0, max(0.0, ramp))


ATTENTION_FORMS = ("scale", "add")


def _check_layer_range(value: Any, where: str, origin: str | None) -> list[int]:
    """``[a, b]``: two layer indices (negative counts from the end), checked against the model at ``wrap()``."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _fail(where, f"expected [first, last], two decoder layer indices, got {value!r}", origin)
    first, last = (_check_int(v, f"{where}[{i}]", origin) for i, v in enumerate(value))
    if (first >= 0) == (last >= 0) and first > last:
        raise _fail(where, f"the first layer ({first}) comes after the last ({last})", origin)
    return [first, last]


@dataclass
class Attention:
    """Attention to audio (MATA, arXiv 2509.18816; docs/design.md, "attention"): in decoder layers
    ``layers[0]..layers[1]`` (inclusive), the raw attention scores of the last query row toward the audio keys are
    multiplied by ``1 + alpha`` (``form: scale``, the paper's formula) or raised by ``alpha`` (``form: add``:
    every audio key's weight times ``e^alpha`` before renormalising, whatever the score's sign), at prefill's
    last row and at every decode step; every head. ``alpha: 0`` is bit-identical to no block."""

    layers: list[int]
    alpha: float = 0.1
    form: str = "scale"

    def __post_init__(self) -> None:
        self._validate("attention", None)

    def __hash__(self) -> int:  # calibration candidates may carry one
        return hash((tuple(self.layers), self.alpha, self.form))

    def _validate(self, where: str, origin: str | None) -> None:
        self.layers = _check_layer_range(self.layers, _join(where, "layers"), origin)
        self.alpha = _check_float(self.alpha, _join(where, "alpha"), origin)
        if self.alpha < 0:
            raise _fail(_join(where, "alpha"), f"must be >= 0 (0 turns it off), got {self.alpha}", origin)
        _check_choice(self.form, ATTENTION_FORMS, _join(where, "form"), origin)


@dataclass
class Steering:
    """Audio-silence steering (arXiv 2603.06854; docs/design.md, "steering"): ``s`` = the last position's residual
    difference, audio minus null audio, averaged over decoder layers ``layers[0]..layers[1]`` (inclusive) at
    prefill; ``beta * s`` is added to the last decoder layer's output at the last position, at prefill and every
    decode step. The null-audio rows are the contrastive block's (``alpha`` may be 0: the rows then only feed the
    steering), so it costs no second call. ``beta: 0`` is bit-identical to no block."""

    layers: list[int]
    beta: float = 1.0

    def __post_init__(self) -> None:
        self._validate("steering", None)

    def __hash__(self) -> int:
        return hash((tuple(self.layers), self.beta))

    def _validate(self, where: str, origin: str | None) -> None:
        self.layers = _check_layer_range(self.layers, _join(where, "layers"), origin)
        self.beta = _check_float(self.beta, _join(where, "beta"), origin)


_SECTIONS: dict[str, type] = {
    "match": Match,
    "model": ModelFacts,
    "audio_span": AudioSpan,
    "contrastive": Contrastive,
    "attention": Attention,
    "steering": Steering,
    "gate": Gate,
    "calibration": Calibration,
}


def _section_from_dict(cls: type, data: Any, where: str, origin: str | None) -> Any:
    """Build one schema dataclass from a mapping, validating with key paths relative to the file."""
    keys = tuple(f.name for f in dataclasses.fields(cls))
    data = _check_mapping(data, where, origin, keys)
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            _require(data, f.name, where, origin)
    obj = cls.__new__(cls)
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            setattr(obj, f.name, dict(value) if isinstance(value, Mapping) else value)
        elif f.default_factory is not dataclasses.MISSING:
            setattr(obj, f.name, f.default_factory())
        else:
            setattr(obj, f.name, f.default)
    obj._validate(where, origin)
    return obj


@dataclass
class Preset:
    """A named set of patches plus the facts needed to apply them to one model family."""

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
    #: where this preset was read from (a file path or ``bundled:NAME``); used in error messages, not saved.
    origin: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._validate(self.origin)

    def _validate(self, origin: str | None) -> None:
        _check_str(self.name, "name", origin)
        if self.description is not None and not isinstance(self.description, str):
            raise _fail("description", f"expected a string, got {_type_name(self.description)}", origin)
        if not isinstance(self.patches, list):
            raise _fail("patches", f"expected a list of patches, got {_type_name(self.patches)}", origin)
        if not self.patches and self.contrastive is None and self.attention is None and self.steering is None:
            raise _fail("patches", "a preset needs at least one patch (a list of {source, target, ...}) or a "
                        "contrastive, attention or steering block", origin)
        for i, patch in enumerate(self.patches):
            if not isinstance(patch, Patch):
                raise _fail(f"patches[{i}]", f"expected a Patch, got {_type_name(patch)}", origin)
        for key, cls in _SECTIONS.items():
            value = getattr(self, key)
            if value is not None and not isinstance(value, cls):
                raise _fail(key, f"expected a {cls.__name__}, got {_type_name(value)}", origin)
        if self.steering is not None and self.contrastive is None:
            raise _fail("steering", "steering compares the residual with and without the audio, so it needs the "
                        "null-audio rows of a contrastive block; add `contrastive: {alpha: 0.0}` (rows for the "
                        "steering only)", origin)
        if self.gate is not None and (self.attention is not None or self.steering is not None):
            raise _fail("gate", "the audio-confidence gate scales patches and contrastive decoding; it does not yet "
                        "act on attention or steering blocks: drop the gate or those blocks", origin)
        if self.gate is not None and self.gate.signal == "audio_gap" and self.contrastive is None:
            raise _fail("gate.signal", "audio_gap compares the answer with and without the audio, so it needs the "
                        "null-audio rows of a contrastive block; add `contrastive: {alpha: 0.0}` (rows for the gate "
                        "only) or use signal: certainty", origin)

    # ----------------------------------------------------------------------------------------- dict I/O
    @classmethod
    def from_dict(cls, data: Any, origin: str | None = None) -> Preset:
        """Build a preset from plain data (e.g. parsed YAML); ``origin`` names the source in error messages."""
        keys = ("version", "name", "description", *_SECTIONS, "patches")
        data = _check_mapping(data, "", origin, keys)
        if "version" in data and data["version"] != SCHEMA_VERSION:
            raise _fail("version", f"unsupported schema version {data['version']!r}; this backpatch reads version "
                        f"{SCHEMA_VERSION}", origin)
        name = _check_str(_require(data, "name", "", origin), "name", origin)
        if all(data.get(key) is None for key in ("contrastive", "attention", "steering")):
            if "patches" not in data:
                raise _fail("patches", "required key is missing: a preset needs patches, or a contrastive, "
                            "attention or steering block", origin)
            raw_patches = data["patches"]
            if not isinstance(raw_patches, list) or not raw_patches:
                raise _fail("patches", "expected a non-empty list of patches ({source, target, scale, mode, "
                            "positions}), or a contrastive, attention or steering block", origin)
        else:
            raw_patches = data.get("patches") or []
            if not isinstance(raw_patches, list):
                raise _fail("patches", "expected a list of patches ({source, target, scale, mode, positions})", origin)
        patches = [_section_from_dict(Patch, p, f"patches[{i}]", origin) for i, p in enumerate(raw_patches)]
        sections = {
            key: _section_from_dict(section_cls, data[key], key, origin)
            for key, section_cls in _SECTIONS.items()
            if data.get(key) is not None
        }
        return cls(patches=patches, name=name, description=data.get("description"), origin=origin, **sections)

    def to_dict(self) -> dict[str, Any]:
        """Plain data in schema order, leaving out unset optional fields, so YAML files stay readable."""
        out: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            out["description"] = self.description
        for key in ("match", "model", "audio_span"):
            section = getattr(self, key)
            if section is not None:
                out[key] = {k: v for k, v in dataclasses.asdict(section).items() if v is not None}
        if self.patches or (self.contrastive is None and self.attention is None and self.steering is None):
            # match_norm only when on, so that presets without it read and write exactly as before
            out["patches"] = [{k: v for k, v in dataclasses.asdict(p).items() if k != "match_norm" or v}
                              for p in self.patches]
        if self.contrastive is not None:
            out["contrastive"] = {k: v for k, v in dataclasses.asdict(self.contrastive).items() if v is not None}
        for key in ("attention", "steering", "gate"):
            if getattr(self, key) is not None:
                out[key] = dataclasses.asdict(getattr(self, key))
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
