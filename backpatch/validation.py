"""The checks every preset section runs, with one voice: each failure is a :class:`PresetError` that names the
file (when there is one), the key path (``patches[1].mode``), what was given and what is allowed. Shared by the
schema's own sections and by every method's config (built in or registered from outside), so a user reads the same
kind of sentence whichever section of a hand-written YAML file is wrong."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "PresetError",
    "check_choice",
    "check_float",
    "check_int",
    "check_layer_range",
    "check_mapping",
    "check_str",
    "fail",
    "join",
    "require",
    "section_from_dict",
    "type_name",
]


class PresetError(ValueError):
    """An invalid preset, or a preset that does not fit the model it is applied to."""


def fail(where: str, message: str, origin: str | None = None) -> PresetError:
    prefix = f"{origin}: " if origin else ""
    return PresetError(f"{prefix}{where}: {message}")


def type_name(value: Any) -> str:
    return type(value).__name__


def check_int(value: Any, where: str, origin: str | None) -> int:
    # bool is an int subclass; `source: true` is a typo, not layer 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(where, f"expected an integer, got {value!r} ({type_name(value)})", origin)
    return value


def check_float(value: Any, where: str, origin: str | None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(where, f"expected a number, got {value!r} ({type_name(value)})", origin)
    if not math.isfinite(value):
        raise fail(where, f"expected a finite number, got {value!r}", origin)
    return float(value)


def check_str(value: Any, where: str, origin: str | None) -> str:
    if not isinstance(value, str) or not value:
        raise fail(where, f"expected a non-empty string, got {value!r} ({type_name(value)})", origin)
    return value


def check_choice(value: Any, allowed: tuple[str, ...], where: str, origin: str | None) -> str:
    if value not in allowed:
        raise fail(where, f"{value!r} is not allowed; use one of: {', '.join(allowed)}", origin)
    return value


def check_mapping(value: Any, where: str, origin: str | None, allowed_keys: tuple[str, ...]) -> Mapping:
    if not isinstance(value, Mapping):
        raise fail(where, f"expected a mapping with keys {', '.join(allowed_keys)}, got {type_name(value)}", origin)
    unknown = [k for k in value if k not in allowed_keys]
    if unknown:
        raise fail(
            f"{where}.{unknown[0]}" if where else str(unknown[0]),
            f"unknown key; allowed keys here: {', '.join(allowed_keys)}",
            origin,
        )
    return value


def require(data: Mapping, key: str, where: str, origin: str | None) -> Any:
    if key not in data:
        raise fail(f"{where}.{key}" if where else key, "required key is missing", origin)
    return data[key]


def join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def check_layer_range(value: Any, where: str, origin: str | None) -> list[int]:
    """``[a, b]``: two layer indices (negative counts from the end), checked against the model at ``wrap()``."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise fail(where, f"expected [first, last], two decoder layer indices, got {value!r}", origin)
    first, last = (check_int(v, f"{where}[{i}]", origin) for i, v in enumerate(value))
    if (first >= 0) == (last >= 0) and first > last:
        raise fail(where, f"the first layer ({first}) comes after the last ({last})", origin)
    return [first, last]


def section_from_dict(cls: type, data: Any, where: str, origin: str | None) -> Any:
    """Build one schema dataclass from a mapping, validating with key paths relative to the file."""
    keys = tuple(f.name for f in dataclasses.fields(cls))
    data = check_mapping(data, where, origin, keys)
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            require(data, f.name, where, origin)
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
