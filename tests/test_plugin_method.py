"""A method defined here, outside the package, registered like a PEFT tuner: it must round-trip through preset YAML,
``wrap()``, ``apply()`` and ``generate()`` with no change to the library (issue 26, point 1; the worked example of
docs/design.md, "Adding a method")."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from tiny import AUDIO_TOKEN, NUM_LAYERS

import backpatch
from backpatch import LayerSpace, Method, Patch, Preset, PresetError
from backpatch.validation import check_float, check_int, fail, join


# ------------------------------------------------------------------------------------------ the plugin
@dataclass
class ScaleAudio:
    """Multiply the hidden states at the audio positions by ``factor`` at the output of decoder layer ``layer``."""

    layer: int
    factor: float = 1.0

    def __post_init__(self) -> None:
        self._validate("scale_audio", None)

    def _validate(self, where: str, origin: str | None) -> None:
        check_int(self.layer, join(where, "layer"), origin)
        self.factor = check_float(self.factor, join(where, "factor"), origin)
        if self.factor < 0:
            raise fail(join(where, "factor"), f"must be >= 0, got {self.factor}", origin)


class ScaleAudioSession:
    """Prefill only: the audio mask is read from the generating module's first call, then the layer is scaled."""

    def __init__(self, call, config: ScaleAudio) -> None:
        self.call, self.config, self.mask, self.scaled = call, config, None, 0
        resolved = call.resolved
        self.handles = [
            call.hooks.forward_pre_hook(resolved.generator, self._read_ids, with_kwargs=True),
            call.hooks.forward_hook(resolved.layers[config.layer], self._scale),
        ]

    def _read_ids(self, _module, args, kwargs):
        if self.mask is None:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            self.mask = backpatch.engine.audio_mask(input_ids, self.call.resolved.audio_token_id)

    def _scale(self, _module, _args, output):
        hidden = backpatch.engine.hidden_of(output)
        if self.call.capturing or self.mask is None or hidden.shape[-2] != self.mask.shape[1]:
            return None  # a capture pass, or a decode step: leave it
        scaled = hidden.clone()
        scaled[self.mask] = scaled[self.mask] * self.config.factor
        self.scaled += 1
        return backpatch.engine.with_hidden(output, scaled)

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()


class ScaleAudioMethod(Method):
    key = "scale_audio"
    title = "audio scaling"
    config_cls = ScaleAudio
    order = 25

    def acts(self, config: ScaleAudio) -> bool:
        return config.factor != 1.0

    def resolve(self, config: ScaleAudio, space: LayerSpace) -> ScaleAudio:
        return dataclasses.replace(config, layer=space.index(config.layer, "scale_audio.layer"))

    def open(self, call, config: ScaleAudio) -> ScaleAudioSession:
        return ScaleAudioSession(call, config)

    def label(self, config: ScaleAudio) -> str:
        return f"audio x{config.factor:g}"

    # the demo's controls: one number; the layer stays the preset's (else the second-to-last)
    def controls(self, config, num_layers: int) -> list[backpatch.Control]:
        return [backpatch.Control("scale_audio_factor", "Audio scaling factor (1 = off)", minimum=0.0)]

    def control_values(self, config, num_layers: int) -> dict:
        return {"scale_audio_factor": config.factor if config is not None else 1.0}

    def from_controls(self, values: dict, base, num_layers: int) -> ScaleAudio | None:
        if values["scale_audio_factor"] == 1.0:
            return None
        return ScaleAudio(layer=base.layer if base is not None else -2, factor=values["scale_audio_factor"])


@pytest.fixture()
def plugin():
    method = backpatch.register_method(ScaleAudioMethod())
    try:
        yield method
    finally:
        backpatch.unregister_method("scale_audio")


YAML = """\
name: scaled
scale_audio:
  layer: -2
  factor: 0.25
"""


# ------------------------------------------------------------------------------------------ reference
def scaled_reference(model, batch, layer: int, factor: float, **kwargs):
    """The same intervention by hand, with one plain forward hook: what the plugin must reproduce."""
    mask = batch["input_ids"] == AUDIO_TOKEN
    seen = {"prefill": False}

    def hook(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if seen["prefill"]:
            return None
        seen["prefill"] = True
        hidden = hidden.clone()
        hidden[mask] = hidden[mask] * factor
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = model.model.language_model.layers[layer].register_forward_hook(hook)
    try:
        return model.generate(**batch, **kwargs)
    finally:
        handle.remove()


KWARGS = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)


# ------------------------------------------------------------------------------------------ tests
def test_the_plugins_section_round_trips_through_yaml(plugin, tmp_path):
    preset = Preset.from_yaml_text(YAML, origin="scaled.yaml")
    assert preset.section("scale_audio") == ScaleAudio(layer=-2, factor=0.25)
    assert preset.extensions == {"scale_audio": ScaleAudio(layer=-2, factor=0.25)}
    path = tmp_path / "scaled.yaml"
    preset.to_yaml(path)
    again = Preset.from_yaml(path)
    assert again == preset and again.to_dict() == {"name": "scaled", "scale_audio": {"layer": -2, "factor": 0.25}}
    assert backpatch.methods_label(preset) == "audio x0.25"
    with_patch = preset.with_section("patches", [Patch(source=-1, target=1)])
    assert backpatch.methods_label(with_patch) == "back-patched -1->1 + audio x0.25"


def test_bad_plugin_settings_are_preset_errors_naming_the_key(plugin):
    with pytest.raises(PresetError, match=r"scaled.yaml: scale_audio.factor: expected a number, got 'half'"):
        Preset.from_yaml_text(YAML.replace("0.25", "half"), origin="scaled.yaml")
    with pytest.raises(PresetError, match=r"scale_audio.speed: unknown key; allowed keys here: layer, factor"):
        Preset.from_dict({"name": "x", "scale_audio": {"layer": 1, "speed": 2}})


def test_an_unregistered_section_is_refused(plugin):
    backpatch.unregister_method("scale_audio")
    with pytest.raises(PresetError, match=r"scale_audio: unknown key; allowed keys here: .*patches"):
        Preset.from_yaml_text(YAML)
    backpatch.register_method(ScaleAudioMethod())


def test_a_key_is_registered_once(plugin):
    with pytest.raises(ValueError, match="already registered"):
        backpatch.register_method(ScaleAudioMethod())
    with pytest.raises(ValueError, match="preset key of the schema itself"):
        backpatch.register_method(type("Bad", (ScaleAudioMethod,), {"key": "calibration"})())


def test_wrap_generate_equals_the_hand_written_hook(plugin, model, batch):
    preset = Preset.from_yaml_text(YAML)
    wrapped = backpatch.wrap(model, preset)
    assert wrapped.resolved.setting("scale_audio") == ScaleAudio(layer=NUM_LAYERS - 2, factor=0.25)
    got = wrapped.generate(**batch, **KWARGS)
    want = scaled_reference(model, batch, NUM_LAYERS - 2, 0.25, **KWARGS)
    assert torch.equal(got.sequences, want.sequences)
    for mine, theirs in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    assert wrapped.last_sessions["scale_audio"].scaled == 1  # the prefill only
    plain = model.generate(**batch, **KWARGS)
    assert not torch.allclose(got.logits[0][:2], plain.logits[0][:2], atol=1e-4)  # it really acts on audio rows
    torch.testing.assert_close(got.logits[0][2], plain.logits[0][2])  # the text-only row is untouched
    assert backpatch.backpatch_hook_count(model) == 0


def test_apply_in_place_gives_the_same_and_cleans_up(plugin, model, batch):
    preset = Preset.from_yaml_text(YAML)
    want = backpatch.wrap(model, preset).generate(**batch, **KWARGS)
    with backpatch.apply(model, preset):
        got = model.generate(**batch, **KWARGS)
    assert torch.equal(got.sequences, want.sequences)
    assert "generate" not in model.__dict__ and backpatch.backpatch_hook_count(model) == 0


def test_a_setting_that_does_not_act_is_bit_identical_to_plain(plugin, model, batch):
    preset = Preset(name="off", extensions={"scale_audio": ScaleAudio(layer=1, factor=1.0)})
    wrapped = backpatch.wrap(model, preset)
    got = wrapped.generate(**batch, **KWARGS)
    plain = model.generate(**batch, **KWARGS)
    assert torch.equal(got.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, plain.logits, strict=True))
    assert "scale_audio" not in wrapped.last_sessions


def test_the_plugin_composes_with_a_built_in_patch(plugin, model, batch):
    """Both run in one call, each at its own layer: the plugin at layer 4's output (order 25), the patch 5 -> 1."""
    preset = Preset.from_yaml_text(YAML).with_section("patches", [Patch(source=-1, target=1, scale=0.5)])
    wrapped = backpatch.wrap(model, preset)
    both = wrapped.generate(**batch, **KWARGS)
    assert set(wrapped.last_sessions) == {"patches", "scale_audio"}
    assert wrapped.last_sessions["patches"].patched_prefills == 1
    assert wrapped.last_sessions["scale_audio"].scaled == 1  # the capture pass was skipped (call.capturing)
    alone = backpatch.wrap(model, preset.with_section("scale_audio", None)).generate(**batch, **KWARGS)
    assert not torch.allclose(both.logits[0][:2], alone.logits[0][:2], atol=1e-4)


def test_the_demo_shows_the_plugins_controls_and_runs_what_they_make(plugin, tmp_path):
    """The demo reads its controls from the registry: the plugin's control is a widget and an API parameter, its
    value makes the plugin's section, and the answer is the library's for that preset."""
    pytest.importorskip("gradio")
    from tiny import tiny_with_processor, write_tone

    from backpatch.demo import build_app

    model, processor = tiny_with_processor()
    app = build_app(model, processor, Preset(name="p", patches=[Patch(source=-1, target=0)]), model_name="tiny")
    demo = app.backpatch_demo
    ids = {getattr(block, "elem_id", None) for block in app.blocks.values()}
    assert {"bp-scale-audio-factor", "bp-source", "bp-alpha", "bp-gate-on"} <= ids
    assert demo.controls(demo.preset)["scale_audio_factor"] == 1.0
    compare = next(e for e in app.get_api_info()["named_endpoints"].values()
                   if any(p["parameter_name"] == "scale_audio_factor" for p in e["parameters"]))
    assert [p["parameter_name"] for p in compare["parameters"]][:10] == [
        "audio", "prompt", "source", "target", "scale", "mode", "positions", "alpha", "patch_on", "preset"]
    assert compare["parameters"][-1]["parameter_name"] == "scale_audio_factor"  # plugins' controls come last
    write_tone(tmp_path / "tone.wav")
    r = demo.compare(str(tmp_path / "tone.wav"), "What is said?", patch_on=False, scale_audio_factor=0.25)
    assert r.preset.patches == [] and r.preset.section("scale_audio") == ScaleAudio(layer=-2, factor=0.25)
    assert r.preset.calibration.status == "uncalibrated" and "audio x0.25" in r.verdict_html
    with pytest.raises(Exception, match=r"The audio scaling factor must be >= 0, got -1"):
        demo.compare(str(tmp_path / "tone.wav"), "What is said?", scale_audio_factor=-1)
    with pytest.raises(Exception, match=r"Nothing to compare: turn on one of back-patching, .*audio scaling"):
        demo.compare(str(tmp_path / "tone.wav"), "What is said?", patch_on=False)
    with pytest.raises(Exception, match=r"Unknown control 'scale_audio'; the controls are: patch_on, source"):
        demo.compare(str(tmp_path / "tone.wav"), "What is said?", scale_audio=0.5)
