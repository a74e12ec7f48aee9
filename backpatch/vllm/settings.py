"""Per-request back-patching settings inside vLLM: what a request asks for under ``extra_args["backpatch"]``
(offline ``SamplingParams``) or ``vllm_xargs.backpatch`` (HTTP), checked once in vLLM's front end and handed to the
workers in one canonical form, so a worker never meets a value it cannot run.

A request may send: nothing (the engine's default preset), ``{"enabled": false}`` (plain), the name of a bundled
preset, ``{"preset": NAME}``, or an inline preset (the YAML schema as a mapping). Over HTTP, where ``vllm_xargs``
holds only strings and numbers, the mapping travels as a JSON string. This module imports no vLLM: its rules are
tested in the main environment too.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from ..bundled import find_matching_preset, list_presets, load_preset
from ..methods.backpatching import ResolvedPatch
from ..preset import Preset, PresetError
from ..registry import LayerSpace, get_method

__all__ = ["DEFAULT_ENV", "KEY", "EngineSettings", "RequestSetting", "SettingError", "UnservedModel"]

#: the request key, in ``SamplingParams.extra_args`` and in the HTTP body's ``vllm_xargs``
KEY = "backpatch"
#: names a preset (bundled name or YAML path) that requests without a ``backpatch`` key run; ``none`` for plain
DEFAULT_ENV = "BACKPATCH_PRESET"

#: why each method that vLLM cannot run exactly is refused (docs/design.md, "Back-patching inside vLLM")
_CANNOT_RUN = {
    "contrastive": "it needs a null-audio copy of every request riding in the same batch and a logits step across "
                   "the pair, which vLLM's scheduler does not keep together",
    "attention": "it biases raw attention scores, which vLLM's paged attention kernels do not expose",
    "steering": "it reads the null-audio rows of contrastive decoding",
    "gate": "its signals read the full answer distribution of the capture (certainty) or the null-audio rows "
            "(audio_gap), which the in-layer short path does not compute",
}


class SettingError(ValueError):
    """A request's ``backpatch`` value that cannot run; ``parameter`` is the key to name in a 400."""

    def __init__(self, message: str, parameter: str = KEY) -> None:
        super().__init__(message)
        self.parameter = parameter


@dataclass(frozen=True)
class RequestSetting:
    """What one request runs: a preset's name and its patches resolved for this model (none: plain)."""

    name: str
    patches: tuple[ResolvedPatch, ...] = ()

    @property
    def patched(self) -> bool:
        return bool(self.patches)

    def canonical(self) -> dict[str, Any]:
        """The JSON-able form the front end writes into the request for the workers."""
        return {"name": self.name, "patches": [dataclasses.asdict(p) for p in self.patches]}

    @classmethod
    def from_canonical(cls, data: dict[str, Any]) -> RequestSetting:
        return cls(data["name"], tuple(ResolvedPatch(**p) for p in data["patches"]))


PLAIN = RequestSetting("plain")


class EngineSettings:
    """The rules of one served model: its layers, its default preset, and how a request's value becomes a
    :class:`RequestSetting`."""

    def __init__(self, model_type: str, name_or_path: str | None, config: Any, num_layers: int,
                 layers_path: str = "language_model.model.layers", default: str | None = None) -> None:
        self.space = LayerSpace(num_layers, layers_path)
        self.default_note: str | None = None
        choice = os.environ.get(DEFAULT_ENV) if default is None else default
        if choice is not None and choice.strip().lower() in ("", "none", "plain"):
            self.default = PLAIN
            return
        try:
            preset = load_preset(choice) if choice else find_matching_preset(model_type, name_or_path, config)
        except PresetError as exc:
            if choice:
                raise SettingError(f"{DEFAULT_ENV}={choice!r}: {exc}", DEFAULT_ENV) from None
            self.default, self.default_note = PLAIN, f"no bundled preset matches this model ({exc}); requests " \
                "without a backpatch key run plain"
            return
        try:
            self.default = self.setting_of(preset, f"the default preset {preset.name!r}")
        except SettingError as exc:
            if choice:
                raise SettingError(f"{DEFAULT_ENV}={choice!r}: {exc}", DEFAULT_ENV) from None
            self.default = PLAIN
            self.default_note = (f"{exc}; requests without a backpatch key run plain (name a patch preset per request, "
                                 f"or set {DEFAULT_ENV})")

    def for_request(self, extra_args: dict[str, Any] | None) -> RequestSetting:
        """The setting a request's ``extra_args`` asks for; :class:`SettingError` naming the key otherwise."""
        if not extra_args or KEY not in extra_args:
            return self.default
        value = extra_args[KEY]
        if isinstance(value, str) and value.lstrip().startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise SettingError(f"{KEY}: not valid JSON ({exc.msg} at character {exc.pos})") from None
        if isinstance(value, str):
            return self._named(value)
        if not isinstance(value, dict):
            raise SettingError(f"{KEY}: expected a preset name, {{\"enabled\": false}}, {{\"preset\": NAME}} or an "
                               f"inline preset, got {type(value).__name__} {value!r}")
        if set(value) <= {"enabled"} and value:
            enabled = value["enabled"]
            if not isinstance(enabled, bool | int) or enabled not in (0, 1):
                raise SettingError(f"{KEY}.enabled: expected true or false, got {enabled!r}", f"{KEY}.enabled")
            return self.default if enabled else PLAIN
        if set(value) == {"preset"}:
            if not isinstance(value["preset"], str):
                raise SettingError(f"{KEY}.preset: expected a bundled preset's name, got {value['preset']!r}",
                                   f"{KEY}.preset")
            return self._named(value["preset"])
        try:
            preset = Preset.from_dict({"name": "inline", **value}, origin=f"request {KEY}")
        except PresetError as exc:
            raise SettingError(str(exc)) from None
        return self.setting_of(preset, f"request {KEY}")

    def _named(self, name: str) -> RequestSetting:
        bundled = list_presets()
        if name not in bundled:
            raise SettingError(f"{KEY}: no bundled preset is named {name!r}; bundled: {', '.join(bundled)} "
                               "(or send an inline preset)")
        return self.setting_of(load_preset(name), f"bundled preset {name!r}")

    def setting_of(self, preset: Preset, where: str) -> RequestSetting:
        """``preset`` as a request setting: patches only (each other method refused with why), resolved here."""
        guarded = [i for i, p in enumerate(preset.patches) if p.agreement is not None]
        if guarded:
            raise SettingError(f"{where} sets patches[{guarded[0]}].agreement, the patch's agreement guard, which "
                               "backpatch cannot run inside vLLM: it reads the unpatched answer with and without the "
                               "audio, which the in-layer short path does not compute; drop the key, or run it "
                               "around transformers' generate()")
        for method, _ in preset.methods():
            if method.key != "patches":
                why = _CANNOT_RUN.get(method.key, "backpatch's vLLM engine runs patches only")
                raise SettingError(f"{where} uses {method.title}, which backpatch cannot run inside vLLM: {why}; "
                                   "send a preset with patches only, or run it around transformers' generate()")
        try:
            patches = get_method("patches").resolve(preset.patches, dataclasses.replace(self.space, origin=where))
        except PresetError as exc:
            raise SettingError(str(exc)) from None
        return RequestSetting(preset.name, tuple(patches))


@dataclass(frozen=True)
class UnservedModel:
    """The rules of a model of a family backpatch does not serve inside vLLM: requests without a ``backpatch`` key
    run as vLLM runs them; one with the key is refused, never run plain behind the sender's back."""

    model_type: str | None
    served: list[str]

    def for_request(self, extra_args: dict[str, Any] | None) -> RequestSetting:
        if not extra_args or KEY not in extra_args:
            return PLAIN
        raise SettingError(f"{KEY}: this engine serves a {self.model_type!r} model, which backpatch's vLLM plugin does "
                           f"not patch (it patches {', '.join(self.served)}); send no {KEY} key, or run the model "
                           "around transformers' generate() with backpatch.wrap")
