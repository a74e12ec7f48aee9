"""The demo's controls and the preset they describe: the control values a preset starts them at, reading and checking
what the browser or an API client sent (numbers, switches, modes, positions), and the preset the controls make (first
patch, contrastive alpha, attention and steering blocks, the audio-confidence gate)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..methods import Attention, Contrastive, Gate, Patch, Steering
from ..methods.backpatching import MODES, POSITIONS, uncalibrated_patch
from ..methods.gate import GATE_SIGNALS
from ..preset import Calibration, Preset, PresetError
from ..registry import get_method
from .errors import _fail


class ControlsMixin:
    """:class:`~backpatch.demo.Demo`'s control actions (it holds ``num_layers``, ``model_name`` and
    ``base_preset``)."""

    def controls(self, preset: Preset) -> dict[str, Any]:
        """UI control values for ``preset``: its first patch (or the one-rule default when it has none) and its
        gate (or the schema's default thresholds, switched off, when it has none)."""
        n = self.num_layers
        first = preset.patches[0] if preset.patches else uncalibrated_patch(n)
        alpha = preset.contrastive.alpha if preset.contrastive is not None else 0.0
        gate = preset.gate or Gate()
        return {"source": first.source, "target": first.target, "scale": first.scale, "mode": first.mode,
                "positions": first.positions, "alpha": alpha, "patch_on": bool(preset.patches),
                "attention_alpha": preset.attention.alpha if preset.attention is not None else 0.0,
                "steering_beta": preset.steering.beta if preset.steering is not None else 0.0,
                "gate_on": preset.gate is not None, "gate_signal": gate.signal, "gate_low": gate.low,
                "gate_high": gate.high}

    def block_layers(self, preset: Preset) -> dict[str, list[int]]:
        """The layers the attention and steering controls act on: the preset's blocks', else the middle third
        (MATA's intermediate layers; the steering layers of the audio-specialist-head paper)."""
        middle = [self.num_layers // 3, (2 * self.num_layers) // 3]
        return {"attention": list(preset.attention.layers) if preset.attention is not None else middle,
                "steering": list(preset.steering.layers) if preset.steering is not None else middle}

    def preset_from_controls(self, base_name: str | None, source: Any, target: Any, scale: Any, mode: Any,
                             positions: Any, alpha: Any, patch_on: Any = True, uploaded: dict | None = None,
                             name: str | None = None, attention_alpha: Any = None, steering_beta: Any = None,
                             gate_on: Any = None, gate_signal: Any = None, gate_low: Any = None,
                             gate_high: Any = None) -> Preset:
        """The preset the controls describe: the base preset with its first patch, alpha, blocks and gate replaced.

        Further patches of the base preset are kept; gate controls left at None keep the base preset's gate. Raises
        a friendly error for values no preset can hold.
        """
        base = self.base_preset(base_name, uploaded)

        def integer(value: Any, what: str) -> int:
            if value is None or isinstance(value, bool) or float(value) != int(float(value)):
                raise _fail(f"The {what} layer must be a whole number, got {value!r}.")
            return int(float(value))

        patches = list(base.patches)
        if patch_on in (None, True) or patch_on == "true":
            if mode not in MODES:
                raise _fail(f"Mode {mode!r} is not one of: {', '.join(MODES)}.")
            if positions not in POSITIONS:
                raise _fail(f"Positions {positions!r} is not one of: {', '.join(POSITIONS)}.")
            try:
                # the controls have no norm-matching switch: keep the base preset's choice for its first patch
                match_norm = bool(base.patches) and base.patches[0].match_norm
                first = Patch(source=integer(source, "source"), target=integer(target, "target"),
                              scale=_control_number(scale, "scale"), mode=mode, positions=positions,
                              match_norm=match_norm)
            except PresetError as exc:
                raise _fail(f"These controls do not make a valid patch: {exc}") from None
            patches = [first, *patches[1:]]
        else:
            patches = []
        alpha = _control_number(0.0 if alpha is None else alpha, "contrastive alpha")
        if alpha < 0:
            raise _fail(f"The contrastive alpha must be >= 0 (0 turns it off), got {alpha:g}.")
        gate = _gate_from_controls(base.gate, gate_on, gate_signal, gate_low, gate_high)
        attention, steering = self._blocks_from_controls(base, attention_alpha, steering_beta)
        template = base.contrastive or Contrastive()
        contrastive = Contrastive(alpha=alpha, null_audio=template.null_audio, plausibility=template.plausibility)
        # alpha 0 keeps the block only for the methods that read its null-audio rows (an audio_gap gate, steering)
        if alpha == 0 and not _needs_null_rows(gate=gate, steering=steering):
            contrastive = None
        if not patches and alpha == 0 and attention is None and steering is None:
            raise _fail("Nothing to compare: turn back-patching on, or set a contrastive alpha, an attention alpha or "
                        "a steering beta above 0.")
        if gate is not None and (attention is not None or steering is not None):
            raise _fail("The audio-confidence gate does not act on attention or steering yet: turn the gate off, or "
                        "set those controls to 0.")
        base_rows = base.contrastive is not None and base.needs_null_rows()
        unchanged = patches == base.patches and attention == base.attention and steering == base.steering and (
            gate == base.gate) and (contrastive == (base.contrastive if base_rows else None))
        if unchanged and name in (None, base.name):
            return base
        description = base.description if unchanged else (
            f"Edited in the backpatch demo from preset {base.name!r} on {self.model_name}; not calibrated.")
        calibration = base.calibration if unchanged else Calibration(status="uncalibrated")
        try:
            return Preset(patches=patches, name=name or base.name, description=description, match=base.match,
                          model=base.model, audio_span=base.audio_span, contrastive=contrastive, gate=gate,
                          attention=attention, steering=steering, calibration=calibration)
        except PresetError as exc:
            raise _fail(f"These controls do not make a valid preset: {exc}") from None

    def _blocks_from_controls(self, base: Preset, attention_alpha: Any,
                              steering_beta: Any) -> tuple[Attention | None, Steering | None]:
        """The attention and steering blocks the two controls describe (0: none); the base preset's layers and form
        are kept, else :meth:`block_layers`."""
        defaults = self.controls(base)
        a = _control_number(defaults["attention_alpha"] if attention_alpha is None else attention_alpha,
                            "attention alpha")
        b = _control_number(defaults["steering_beta"] if steering_beta is None else steering_beta, "steering beta")
        if a < 0:
            raise _fail(f"The attention alpha must be >= 0 (0 turns it off), got {a:g}.")
        layers = self.block_layers(base)
        form = base.attention.form if base.attention is not None else "scale"
        attention = Attention(layers=layers["attention"], alpha=a, form=form) if a > 0 else None
        steering = Steering(layers=layers["steering"], beta=b) if b != 0 else None
        return attention, steering


def _switch(value: Any) -> bool:
    """A checkbox's value as sent by the browser (a bool) or an API client (a bool or "true"/"false")."""
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def _gate_from_controls(base: Gate | None, gate_on: Any, signal: Any, low: Any, high: Any) -> Gate | None:
    """The gate the gate controls describe: None when switched off; values left at None come from ``base`` (else
    the schema's defaults), so an API call that names no gate control keeps the preset's gate."""
    if not (base is not None if gate_on is None else _switch(gate_on)):
        return None
    template = base or Gate()
    signal = template.signal if signal in (None, "") else signal
    if signal not in GATE_SIGNALS:
        raise _fail(f"Gate signal {signal!r} is not one of: {', '.join(GATE_SIGNALS)}.")
    low = template.low if low is None else _control_number(low, "gate low threshold")
    high = template.high if high is None else _control_number(high, "gate high threshold")
    try:
        return Gate(signal=signal, low=low, high=high)
    except PresetError as exc:
        raise _fail(f"These gate controls do not make a valid gate: {exc}") from None


def _control_number(value: Any, what: str) -> float:
    """A number control's value as a finite float, else a friendly error naming the control."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise _fail(f"The {what} must be a number, got {value!r}.") from None
    if not np.isfinite(out):
        raise _fail(f"The {what} must be a finite number, got {value!r}.")
    return out


def _needs_null_rows(**sections: object) -> bool:
    """Whether these settings read the null-audio rows: each method's own rule, from the registry."""
    return any(get_method(key).needs_null_rows(config) for key, config in sections.items() if config is not None)
