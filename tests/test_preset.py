"""Preset schema (DESIGN section 3): round trips, bundled presets, and one test per validation rule."""

from __future__ import annotations

import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import tiny_qwen2_audio

import backpatch
from backpatch import AudioSpan, Calibration, Match, ModelFacts, Patch, Preset, PresetError

REPO = Path(__file__).resolve().parent.parent

VALID = {
    "name": "my-model",
    "description": "test",
    "match": {"model_type": "qwen2_audio", "name_or_path": "org/*"},
    "model": {"layers": "model.language_model.layers", "num_layers": 6},
    "audio_span": {"token_id": 7},
    "patches": [{"source": 4, "target": 1, "scale": 0.5, "mode": "interpolate", "positions": "last"}],
    "calibration": {"status": "calibrated", "data": "val.jsonl", "metrics": {"tdr_before": 0.9, "tdr_after": 0.5}},
}


def with_change(path: str, value, delete: bool = False) -> dict:
    """A copy of VALID with one key (dotted, list indices as ints) changed or deleted."""
    data = yaml.safe_load(yaml.safe_dump(VALID))
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = data
    for p in parents:
        node = node[p]
    if delete:
        del node[last]
    else:
        node[last] = value
    return data


# (change, expected key path in the message, expected words naming what is allowed)
INVALID = [
    # unknown keys
    (("nmae", "x"), "nmae", "unknown key; allowed keys here: version, name"),
    (("patches.0.scael", 1.0), "patches[0].scael", "allowed keys here: source, target, scale, mode, positions"),
    (("match.modeltype", "x"), "match.modeltype", "allowed keys here: model_type, name_or_path"),
    (("audio_span.tokenid", 3), "audio_span.tokenid", "token_id, token, config"),
    (("calibration.foo", 1), "calibration.foo", "status, data, metrics"),
    (("model.n_layers", 3), "model.n_layers", "layers, num_layers"),
    # wrong types
    (("patches.0.source", "four"), "patches[0].source", "expected an integer"),
    (("patches.0.target", 1.5), "patches[0].target", "expected an integer"),
    (("patches.0.source", True), "patches[0].source", "expected an integer"),
    (("patches.0.scale", "big"), "patches[0].scale", "expected a number"),
    (("patches.0.scale", float("nan")), "patches[0].scale", "finite"),
    (("name", 3), "name", "expected a non-empty string"),
    (("patches", {"source": 1}), "patches", "non-empty list"),
    (("patches.0", [4, 1]), "patches[0]", "expected a mapping"),
    (("match", "qwen2_audio"), "match", "expected a mapping"),
    (("model.num_layers", "32"), "model.num_layers", "expected an integer"),
    (("model.num_layers", 0), "model.num_layers", "must be >= 1"),
    (("audio_span.token_id", "7"), "audio_span.token_id", "expected an integer"),
    (("audio_span.token_id", -1), "audio_span.token_id", "must be >= 0"),
    (("calibration.metrics", [0.1]), "calibration.metrics", "mapping"),
    (("calibration.metrics.tdr_after", "low"), "calibration.metrics.tdr_after", "expected a number"),
    (("description", ["a"]), "description", "expected a string"),
    # missing required keys
    (("name", None, True), "name", "required key is missing"),
    (("patches", None, True), "patches", "required key is missing"),
    (("patches.0.source", None, True), "patches[0].source", "required key is missing"),
    (("patches.0.target", None, True), "patches[0].target", "required key is missing"),
    (("match.model_type", None, True), "match.model_type", "required key is missing"),
    (("patches", []), "patches", "non-empty list"),
    # unknown modes / positions / statuses / versions
    (("patches.0.mode", "addd"), "patches[0].mode", "use one of: add, replace, interpolate"),
    (("patches.0.positions", "text"), "patches[0].positions", "use one of: audio, last, audio+last"),
    (("calibration.status", "done"), "calibration.status", "use one of: uncalibrated, calibrated"),
    (("version", 2), "version", "unsupported schema version"),
    # source must be later than target
    (("patches.0.source", 1), "patches[0].source", "must be a later layer than target"),
    (("patches.0.target", 9), "patches[0].source", "must be a later layer than target"),
    (("patches.0", {"source": -3, "target": -2}), "patches[0].source", "must be a later layer than target"),
    # audio span: only one way at a time
    (("audio_span", {"token_id": 7, "token": "<|AUDIO|>"}), "audio_span", "give only one of"),
]


@pytest.mark.parametrize("change,where,allowed", INVALID, ids=[c[1] + ":" + c[2][:20] for c in INVALID])
def test_invalid_preset_rule(tmp_path, change, where, allowed):
    data = with_change(*change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PresetError) as info:
        Preset.from_yaml(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {where}:"), message
    assert allowed in message


def test_valid_preset_loads_and_round_trips(tmp_path):
    preset = Preset.from_dict(VALID)
    assert preset.patches[0] == Patch(source=4, target=1, scale=0.5, mode="interpolate", positions="last")
    assert preset.to_dict() == VALID
    path = tmp_path / "p.yaml"
    preset.to_yaml(path)
    assert Preset.from_yaml(path) == preset
    assert Preset.from_dict(preset.to_dict()) == preset


def test_python_constructed_preset_defaults_and_yaml(tmp_path):
    preset = Preset(patches=[Patch(source=-4, target=8)])
    assert preset.patches[0].scale == 1.0 and preset.patches[0].mode == "add" and preset.patches[0].positions == "audio"
    preset.to_yaml(tmp_path / "my.yaml")
    assert Preset.from_yaml(tmp_path / "my.yaml") == preset


def test_python_construction_validates_too():
    with pytest.raises(PresetError, match=r"Patch.mode: 'sub' is not allowed"):
        Patch(source=3, target=1, mode="sub")
    with pytest.raises(PresetError, match="at least one patch"):
        Preset(patches=[])
    with pytest.raises(PresetError, match="must be a later layer"):
        Patch(source=2, target=2)


def test_yaml_is_read_with_safe_load_only(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\npatches: [{source: 2, target: 1}]\n")
    with pytest.raises(PresetError, match="not valid YAML"):
        Preset.from_yaml(path)


def test_missing_file_and_not_a_mapping(tmp_path):
    with pytest.raises(PresetError, match="file not found"):
        Preset.from_yaml(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(PresetError, match="expected a mapping"):
        Preset.from_yaml(path)


patch_strategy = st.builds(
    lambda s, t, scale, mode, pos: Patch(source=s + t + 1 if s >= 0 else -1, target=t, scale=scale, mode=mode,
                                         positions=pos),
    st.integers(0, 40), st.integers(0, 40),
    st.floats(-8, 8, allow_nan=False, allow_infinity=False),
    st.sampled_from(["add", "replace", "interpolate"]), st.sampled_from(["audio", "last", "audio+last"]),
)


@settings(max_examples=60, deadline=None)
@given(
    patches=st.lists(patch_strategy, min_size=1, max_size=4),
    name=st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1, max_size=20),
    num_layers=st.one_of(st.none(), st.integers(1, 100)),
    token_id=st.one_of(st.none(), st.integers(0, 200_000)),
)
def test_round_trip_property(patches, name, num_layers, token_id):
    preset = Preset(
        patches=patches, name=name, match=Match(model_type="x"),
        model=ModelFacts(num_layers=num_layers), audio_span=AudioSpan(token_id=token_id),
        calibration=Calibration(metrics={"tdr": 0.5}),
    )
    assert Preset.from_yaml_text(preset.to_yaml()) == preset
    assert Preset.from_dict(preset.to_dict()) == preset


# ------------------------------------------------------------------------------------ checks at wrap() time
@pytest.mark.parametrize("source,target,key", [(6, 1, "source"), (3, -7, "target"), (-7, 0, "source")])
def test_layer_out_of_range_names_the_model_layer_count(model, source, target, key):
    with pytest.raises(PresetError, match=rf"patches\[0\]\.{key}: layer -?\d+ is out of range .* has 6 decoder layers"):
        backpatch.wrap(model, Preset(patches=[Patch(source=source, target=target)]))


def test_mixed_sign_source_not_after_target_is_caught_at_wrap(model):
    with pytest.raises(PresetError, match=r"patches\[0\]: source -5 \(layer 1\) must be later than target 3"):
        backpatch.wrap(model, Preset(patches=[Patch(source=-5, target=3)]))


def test_num_layers_mismatch(model):
    preset = Preset(patches=[Patch(source=4, target=1)], model=ModelFacts(num_layers=32))
    with pytest.raises(PresetError, match="preset is for a model with 32 decoder layers, but this model has 6"):
        backpatch.wrap(model, preset)


def test_bad_layers_path(model):
    with pytest.raises(PresetError, match="has no module at 'model.decoder.layers'"):
        preset = Preset(patches=[Patch(source=4, target=1)], model=ModelFacts(layers="model.decoder.layers"))
        backpatch.wrap(model, preset)


class _Tokenizer:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)


def test_audio_span_by_token_id_token_config_and_auto(model):
    patches = [Patch(source=4, target=1)]
    assert backpatch.wrap(model, Preset(patches=patches)).resolved.audio_token_id == 7  # auto: audio_token_index
    assert backpatch.wrap(model, Preset(patches=patches, audio_span=AudioSpan(token_id=9))).resolved.audio_token_id == 9
    by_config = Preset(patches=patches, audio_span=AudioSpan(config="text_config.pad_token_id"))
    assert backpatch.wrap(model, by_config).resolved.audio_token_id == 0
    by_token = Preset(patches=patches, audio_span=AudioSpan(token="<|AUDIO|>"))
    tokenizer = _Tokenizer({"<|AUDIO|>": 11})
    assert backpatch.wrap(model, by_token, processor=tokenizer).resolved.audio_token_id == 11

    class Processor:
        pass

    processor = Processor()
    processor.tokenizer = tokenizer
    assert backpatch.wrap(model, by_token, processor=processor).resolved.audio_token_id == 11


def test_audio_span_errors(model):
    patches = [Patch(source=4, target=1)]
    with pytest.raises(PresetError, match="needs a tokenizer"):
        backpatch.wrap(model, Preset(patches=patches, audio_span=AudioSpan(token="<|AUDIO|>")))
    with pytest.raises(PresetError, match="the tokenizer does not know '<|AUDIO|>'"):
        backpatch.wrap(model, Preset(patches=patches, audio_span=AudioSpan(token="<|AUDIO|>")),
                       processor=_Tokenizer({"a": 1}))
    with pytest.raises(PresetError, match="no integer attribute 'audio_token'"):
        backpatch.wrap(model, Preset(patches=patches, audio_span=AudioSpan(config="audio_token")))


@pytest.mark.parametrize("path", ["audio_token_index", "audio_token_id", "audio_config.audio_token_id"])
def test_audio_token_auto_detection_paths(path):
    from transformers import PretrainedConfig

    from backpatch.engine.architectures import _resolve_audio_token_id

    holder = _with_config()
    if path.startswith("audio_config."):
        holder.config.audio_config = PretrainedConfig(audio_token_id=42)
    else:
        setattr(holder.config, path, 42)
    assert _resolve_audio_token_id(holder, Preset(patches=[Patch(source=2, target=1)]), None, None) == 42
    with pytest.raises(PresetError, match="could not find the audio token id"):
        _resolve_audio_token_id(_with_config(), Preset(patches=[Patch(source=2, target=1)]), None, None)


def _with_config():
    from transformers import PretrainedConfig

    holder = torch.nn.Module()
    holder.config = PretrainedConfig()
    return holder

# ----------------------------------------------------------------------------------------- bundled presets
def test_bundled_presets_are_valid_and_named_after_their_file():
    names = backpatch.list_presets()
    assert "qwen2-audio-7b-instruct" in names
    for name in names:
        preset = backpatch.load_preset(name)
        assert preset.name == name
        assert preset.match is not None
        assert preset.calibration is not None


def test_load_preset_unknown_name_lists_bundled():
    with pytest.raises(PresetError, match="no bundled preset named 'nope'; bundled presets: .*qwen2-audio-7b-instruct"):
        backpatch.load_preset("nope")


def test_load_preset_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    Preset(patches=[Patch(source=3, target=1)], name="mine").to_yaml(path)
    assert backpatch.load_preset(str(path)).name == "mine"
    assert backpatch.load_preset(path).name == "mine"


def test_wrap_without_preset_picks_matching_bundled_one(caplog):
    model = tiny_qwen2_audio(num_layers=32)
    model.config._name_or_path = "Qwen/Qwen2-Audio-7B-Instruct"
    with caplog.at_level(logging.INFO, logger="backpatch"):
        wrapped = backpatch.wrap(model)
    assert wrapped.preset.name == "qwen2-audio-7b-instruct"
    assert "using bundled preset 'qwen2-audio-7b-instruct'" in caplog.text
    assert [(p.source, p.target) for p in wrapped.resolved.setting("patches")] == [(29, 16)]  # round(0.9 * 32), 32 / 2


def test_an_uncalibrated_bundled_preset_is_picked_with_one_warning_naming_calibrate(caplog, monkeypatch):
    from backpatch import wrapper

    monkeypatch.setattr(wrapper, "_WARNED", set())
    model = tiny_qwen2_audio(num_layers=32)
    model.config._name_or_path = "Qwen/Qwen2-Audio-7B-Instruct"
    with caplog.at_level(logging.WARNING, logger="backpatch"):
        backpatch.wrap(model)
        backpatch.wrap(model)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "NOT calibrated" in warnings[0].getMessage()
    assert "`backpatch calibrate`" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="backpatch"):
        backpatch.wrap(model, "qwen2-audio-7b-instruct")  # named explicitly: the user chose it
    assert not caplog.records


def test_wrap_without_matching_preset_explains_how_to_write_one(model):
    with pytest.raises(PresetError, match="no bundled preset matches this model.*Bundled presets: .*write your own"):
        backpatch.wrap(model)


def test_wheel_ships_presets_and_load_preset_works_from_it(tmp_path):
    """Build the wheel, install it (no deps) into a fresh directory, and load a bundled preset from there."""
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(REPO)],
        check=True, capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("backpatch-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "backpatch/presets/qwen2-audio-7b-instruct.yaml" in names
    assert "backpatch/organism/smol-audio/tasks.json" in names  # smol-audio's tasks are data users build sets from
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = (
        "import backpatch, pathlib; p = backpatch.load_preset('qwen2-audio-7b-instruct'); "
        "assert pathlib.Path(backpatch.__file__).is_relative_to(pathlib.Path(r'%s')), backpatch.__file__; "
        "print(p.name, len(backpatch.list_presets()))"
    ).replace("%s", str(target))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "qwen2-audio-7b-instruct"


def test_match_norm_is_written_only_when_on_and_must_be_a_boolean():
    off = Preset(patches=[Patch(source=3, target=1)])
    assert "match_norm" not in off.to_dict()["patches"][0]
    on = Preset(patches=[Patch(source=3, target=1, match_norm=True)])
    assert on.to_dict()["patches"][0]["match_norm"] is True
    assert Preset.from_yaml_text(yaml.safe_dump(on.to_dict())) == on
    with pytest.raises(PresetError, match=r"patches\[0\]\.match_norm: expected true or false, got 'yes'"):
        Preset.from_dict({"name": "x", "patches": [{"source": 3, "target": 1, "match_norm": "yes"}]})
