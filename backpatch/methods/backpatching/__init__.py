"""Back-patching (the method this library is named for): route a late layer's states at chosen positions back into
an earlier layer during the prefill (DESIGN section 1). Its config (:class:`Patch`), pure math (:mod:`.math`) and
install (:mod:`.session`) live here; :data:`METHOD` is its registry entry."""

from __future__ import annotations

import dataclasses
from typing import Any

from ...controls import Control, ControlError
from ...registry import LayerSpace, Method, register_method
from ...validation import PresetError, fail
from .config import MODES, POSITIONS, Patch, patch_label
from .math import ResolvedPatch, combine, gated
from .rules import UNCALIBRATED_RULE, uncalibrated_patch
from .session import PatchSession

__all__ = ["METHOD", "MODES", "POSITIONS", "UNCALIBRATED_RULE", "BackPatching", "Patch", "PatchSession",
           "ResolvedPatch", "combine", "gated", "patch_label", "uncalibrated_patch"]


#: the demo's patch agreement-guard thresholds (nats; a preset's own value is added to them)
PATCH_AGREEMENT_CHOICES = ("off", "0.5", "1", "2")


def _agreement_text(patches: Any) -> str:
    """The first patch's guard as a choice of the demo's control (``off`` without one)."""
    guard = patches[0].agreement if patches else None
    return "off" if guard is None else f"{guard:g}"


class BackPatching(Method):
    key = "patches"
    title = "back-patching"
    section_order = 0
    session_cls = PatchSession
    config_cls = Patch
    many = True
    order = 30  # after contrastive decoding (it must see the doubled batch) and attention (capture passes biased)

    def dump(self, config: Any) -> Any:
        # match_norm only when on and agreement only when set, so that presets without them read and write exactly
        # as before
        return [{k: v for k, v in dataclasses.asdict(p).items()
                 if (k != "match_norm" or v) and (k != "agreement" or v is not None)} for p in config]

    def check(self, preset: Any, config: Any, origin: str | None) -> None:
        if any(p.agreement is not None for p in config) and preset.contrastive is None:
            index = next(i for i, p in enumerate(config) if p.agreement is not None)
            raise fail(f"patches[{index}].agreement", "the agreement guard compares the answer with and without the "
                       "audio, so it needs the null-audio rows of a contrastive block; add `contrastive: {alpha: "
                       "0.0}` (rows for the guard only) or drop the key", origin)

    def needs_null_rows(self, config: Any) -> bool:
        return any(p.agreement is not None for p in config or ())

    def resolve(self, config: Any, space: LayerSpace) -> tuple[ResolvedPatch, ...]:
        resolved = []
        for index, patch in enumerate(config):
            source = space.index(patch.source, f"patches[{index}].source")
            target = space.index(patch.target, f"patches[{index}].target")
            if source <= target:
                raise fail(f"patches[{index}]", f"source {patch.source} (layer {source}) must be later than target "
                           f"{patch.target} (layer {target}) in this {space.num_layers}-layer model", space.origin)
            resolved.append(ResolvedPatch(source, target, patch.scale, patch.mode, patch.positions,
                                          patch.match_norm, patch.agreement))
        return tuple(resolved)

    def controls(self, config: Any, num_layers: int) -> list[Control]:
        return [Control("patch_on", "Back-patching on (first patch below)", "switch",
                        info="off: the patch controls below are greyed out and not applied"),
                Control("source", "Source layer", "layer", info=f"{num_layers} layers; negative counts from the end"),
                Control("target", "Target layer", "layer"),
                Control("scale", "Scale"),
                Control("mode", "Mode", "choice", MODES),
                Control("positions", "Positions", "choice", POSITIONS),
                Control("patch_agreement", "Patch agreement guard (nats)", "choice",
                        tuple(dict.fromkeys((*PATCH_AGREEMENT_CHOICES, _agreement_text(config)))),
                        info="leave a row unpatched where the audio raised its answer over the text-only stream by at "
                             "least this (needs the contrastive block's null-audio rows)")]

    def control_values(self, config: Any, num_layers: int) -> dict[str, Any]:
        """The first patch (the one rule's default when the preset has none)."""
        first = config[0] if config else uncalibrated_patch(num_layers)
        return {"patch_on": bool(config), "source": first.source, "target": first.target, "scale": first.scale,
                "mode": first.mode, "positions": first.positions, "patch_agreement": _agreement_text(config)}

    def from_controls(self, values: dict[str, Any], base: Any, num_layers: int) -> list[Patch]:
        """The controls replace the first patch; the preset's further patches are kept. They have no norm-matching
        switch: the first patch keeps the preset's choice."""
        if not values["patch_on"]:
            return []
        guard = values.get("patch_agreement", "off")
        try:
            first = Patch(source=values["source"], target=values["target"], scale=values["scale"], mode=values["mode"],
                          positions=values["positions"], match_norm=bool(base) and base[0].match_norm,
                          agreement=None if guard in (None, "off") else float(guard))
        except PresetError as exc:
            raise ControlError(f"These controls do not make a valid patch: {exc}") from None
        return [first, *(base or [])[1:]]

    def label(self, config: Any) -> str:
        first = config[0]
        return f"back-patched {first.source}->{first.target}" if len(config) == 1 \
            else f"back-patched ({len(config)} patches)"

    def details(self, config: Any) -> list[str]:
        return [patch_label(p) for p in config]

    def summary(self, config: Any) -> str:
        guarded = " under an agreement guard" if any(p.agreement is not None for p in config) else ""
        return f"back-patching ({len(config)} patch{'es' if len(config) > 1 else ''}){guarded}"


METHOD = register_method(BackPatching())
