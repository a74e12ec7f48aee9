"""Controls as data: what a method shows in the demo (a switch, a number, a layer, a choice) and how a value that a
browser or an API client sent is read back. A method declares its controls (:meth:`backpatch.Method.controls`); the
demo turns each into a widget and an API parameter, so a registered method gets controls with no change to the demo.
This module is part of the schema layer: it imports neither torch nor gradio."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["CONTROL_KINDS", "Control", "ControlError", "read_choice", "read_layer", "read_number", "read_switch"]

#: a ``switch`` turns its method on and off (and greys out the method's other controls while off); a ``layer`` is a
#: decoder layer index (negative counts from the end); a ``number`` any finite float; a ``choice`` one of ``choices``
CONTROL_KINDS = ("switch", "number", "layer", "choice")


class ControlError(ValueError):
    """A control's value no setting can hold; the message is one sentence that names the control, for the person
    who set it (the demo shows it as is)."""


@dataclass(frozen=True)
class Control:
    """One control of a method's setting.

    ``name`` is what the value travels under: the demo API's parameter name and the key of the values a method reads
    back, so it must be unique across registered methods (prefix a plugin's with its key). ``info`` is the line under
    the widget (what the control acts on)."""

    name: str
    label: str
    kind: str = "number"
    choices: tuple[str, ...] = ()
    info: str | None = None
    minimum: float | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"a control's name is an API parameter name and must be an identifier, got {self.name!r}")
        if self.kind not in CONTROL_KINDS:
            raise ValueError(f"control {self.name!r}: kind {self.kind!r} is not one of {', '.join(CONTROL_KINDS)}")
        if self.kind == "choice" and not self.choices:
            raise ValueError(f"control {self.name!r}: a choice needs its choices")

    def read(self, value: Any) -> Any:
        """``value`` as this control's type, else a :class:`ControlError` naming the control."""
        what = self.label.split(" (")[0]  # "Contrastive alpha (0 = off)" -> "contrastive alpha"
        what = what[:1].lower() + what[1:]
        if self.kind == "switch":
            return read_switch(value)
        if self.kind == "layer":
            return read_layer(value, what)
        if self.kind == "choice":
            return read_choice(value, self.choices, what)
        number = read_number(value, what)
        if self.minimum is not None and number < self.minimum:
            raise ControlError(f"The {what} must be >= {self.minimum:g}, got {number:g}.")
        return number


def read_switch(value: Any) -> bool:
    """A checkbox's value as a browser (a bool) or an API client (a bool or "true"/"false") sends it."""
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def read_number(value: Any, what: str) -> float:
    """A finite float, else a sentence naming the control."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ControlError(f"The {what} must be a number, got {value!r}.") from None
    if not math.isfinite(out):
        raise ControlError(f"The {what} must be a finite number, got {value!r}.")
    return out


def read_layer(value: Any, what: str) -> int:
    """A whole number (sliders send floats such as ``12.0``), else a sentence naming the control."""
    if value is None or isinstance(value, bool):
        raise ControlError(f"The {what} must be a whole number, got {value!r}.")
    number = read_number(value, what)
    if number != int(number):
        raise ControlError(f"The {what} must be a whole number, got {value!r}.")
    return int(number)


def read_choice(value: Any, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise ControlError(f"{what[:1].upper() + what[1:]} {value!r} is not one of: {', '.join(choices)}.")
    return value
