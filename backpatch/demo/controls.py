"""The demo's controls and the preset they describe, read from the method registry: each registered method declares
its controls (:meth:`backpatch.Method.controls`), the values they start at for a preset, and the setting they make;
this module only joins them into one preset and applies the rules between methods (a method that does not act is
left out unless another reads what it brings; something must run; the preset must be valid as a whole)."""

from __future__ import annotations

from typing import Any

from ..controls import Control, ControlError
from ..engine import BackpatchRuntimeError, running_methods
from ..preset import Calibration, Preset, PresetError
from ..registry import Method, get_method, registered_methods
from .errors import _fail


class ControlsMixin:
    """:class:`~backpatch.demo.Demo`'s control actions (it holds ``num_layers``, ``model_name`` and
    ``base_preset``)."""

    def control_specs(self, preset: Preset) -> list[tuple[Method, list[Control]]]:
        """Every registered method with the controls it shows for ``preset`` (possibly none), in registry order."""
        return [(m, m.controls(preset.section(m.key), self.num_layers)) for m in registered_methods()]

    def controls(self, preset: Preset) -> dict[str, Any]:
        """UI control values for ``preset``: each method's, from its setting in the preset (or its defaults, off,
        when the preset has none)."""
        values: dict[str, Any] = {}
        for method, _ in self.control_specs(preset):
            values.update(method.control_values(preset.section(method.key), self.num_layers))
        return values

    def preset_from_controls(self, base_name: str | None, uploaded: dict | None = None, name: str | None = None,
                             **values: Any) -> Preset:
        """The preset the controls describe: the base preset with each method's setting replaced by what its controls
        make (a method whose controls are left out, or None, keeps the preset's values; its switch, if it has one,
        turns on when the preset has the method or when any of its other controls is set).

        Unchanged controls give the base preset back (its calibration included); anything else is marked
        uncalibrated. Raises a friendly error for values no preset can hold, naming the control.
        """
        base = self.base_preset(base_name, uploaded)
        specs = self.control_specs(base)
        known = [c.name for _, controls in specs for c in controls]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise _fail(f"Unknown control{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; the "
                        f"controls are: {', '.join(known)}.")
        defaults = self.controls(base)
        sections = {m.key: self._setting_from_controls(m, controls, values, defaults, base) for m, controls in specs}
        sections = _prune(sections)
        if not any(m.standalone and m.present(sections[m.key]) and m.acts(sections[m.key])
                   for m in registered_methods()):
            titles = [m.title for m, controls in specs if m.standalone and controls]
            raise _fail(f"Nothing to compare: turn on one of {', '.join(titles)} (a switch on, or a strength "
                        "above 0).")
        unchanged = sections == _prune({m.key: base.section(m.key) for m in registered_methods()})
        if unchanged and name in (None, base.name):
            return base
        try:
            return base.with_sections(
                sections, name=name or base.name, origin=None,
                description=base.description if unchanged else (
                    f"Edited in the backpatch demo from preset {base.name!r} on {self.model_name}; not calibrated."),
                calibration=base.calibration if unchanged else Calibration(status="uncalibrated"))
        except PresetError as exc:
            raise _fail(f"These controls do not make a valid preset: {exc}") from None

    def _setting_from_controls(self, method: Method, controls: list[Control], values: dict[str, Any],
                               defaults: dict[str, Any], base: Preset) -> Any:
        """One method's setting from its controls: unset values from the preset, each value read as its control's
        type, a switched-off method's other controls not read at all (they are greyed out on the page)."""
        given = {c.name: values.get(c.name) for c in controls}
        switch = next((c for c in controls if c.kind == "switch"), None)
        try:
            if switch is not None:
                on = given[switch.name]
                on = defaults[switch.name] or any(v is not None for k, v in given.items() if k != switch.name) \
                    if on is None else switch.read(on)
                if not on:
                    return method.from_controls({switch.name: False}, base.section(method.key), self.num_layers)
                given[switch.name] = True
            read = {c.name: c.read(defaults[c.name] if given[c.name] is None else given[c.name]) for c in controls}
            return method.from_controls(read, base.section(method.key), self.num_layers)
        except ControlError as exc:
            raise _fail(str(exc)) from None


def _prune(sections: dict[str, Any]) -> dict[str, Any]:
    """Only the settings that would run in a call (the engine's rule, :func:`backpatch.engine.running_methods`): one
    that changes nothing (alpha 0) is left out unless it brings the null-audio rows another setting reads (an
    ``audio_gap`` gate or steering keep a contrastive block at alpha 0). Settings the engine would refuse are kept as
    they are, for the preset's own check to name what is missing."""
    try:
        running, _ = running_methods(sections)
    except BackpatchRuntimeError:
        return sections
    kept = {method.key for method, _ in running}
    return {key: config if key in kept else [] if get_method(key).many else None for key, config in sections.items()}
