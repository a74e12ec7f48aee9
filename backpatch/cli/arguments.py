"""Argument types of the ``backpatch`` command line: numbers range-checked while parsing (a bad number is an
argparse error, exit code 2, before anything loads), and the comma-separated lists some flags take."""

from __future__ import annotations

import argparse
import math
from typing import Any


def _number(text: str, kind: type) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number between 0 and 1."""
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1 to 65535."""
    value = _number(text, int)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port between 1 and 65535, got {value}")
    return value


def int_list(text: str | None) -> list[int] | None:
    """``"1,2"`` -> ``[1, 2]``; ``None`` stays ``None`` (the flag was not given)."""
    return None if text is None else [int(x) for x in text.split(",") if x.strip()]


def float_list(text: str | None) -> list[float] | None:
    """``"0.5,1"`` -> ``[0.5, 1.0]``; ``None`` stays ``None``."""
    return None if text is None else [float(x) for x in text.split(",") if x.strip()]


def str_list(text: str | None) -> list[str] | None:
    """``"add, replace"`` -> ``["add", "replace"]``; ``None`` stays ``None``."""
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]

