"""The peer methods' preset blocks (issue 20): attention to audio (MATA) and audio-silence steering. Schema and
validation here; their semantics on every family are in test_families.py (reference implementations)."""

from __future__ import annotations

import re

import pytest
import yaml
from tiny import tiny_checkpoint

import backpatch
from backpatch import Attention, Contrastive, Preset, PresetError, Steering
from backpatch.loading import load_model_and_processor


@pytest.mark.parametrize(("block", "where", "says"), [
    ({"attention": {"layers": [3], "alpha": 0.1}}, "attention.layers", "expected [first, last]"),
    ({"attention": {"layers": [5, 2]}}, "attention.layers", "the first layer (5) comes after the last (2)"),
    ({"attention": {"layers": [1, "2"]}}, "attention.layers[1]", "expected an integer"),
    ({"attention": {"layers": [1, 2], "alpha": -0.1}}, "attention.alpha", "must be >= 0"),
    ({"attention": {"layers": [1, 2], "form": "mul"}}, "attention.form", "use one of: scale, add"),
    ({"attention": {"layers": [1, 2], "heads": 3}}, "attention.heads", "unknown key; allowed keys here: layers, alpha, "
                                                                       "form"),
    ({"attention": {"alpha": 0.1}}, "attention.layers", "required"),
    ({"steering": {"layers": [1, 2], "beta": "1"}, "contrastive": {"alpha": 0.0}}, "steering.beta",
     "expected a number"),
    ({"steering": {"layers": [1, 2]}}, "steering", "needs the null-audio rows of a contrastive block"),
    ({"attention": {"layers": [1, 2]}, "gate": {"signal": "certainty"}}, "gate", "does not yet act on attention"),
])
def test_invalid_blocks_name_the_key(block, where, says):
    with pytest.raises(PresetError, match=rf"my\.yaml: {re.escape(where)}: .*{re.escape(says)}"):
        Preset.from_dict({"name": "p", **block}, origin="my.yaml")


def test_blocks_round_trip_and_stand_alone(tmp_path):
    preset = Preset(name="both", attention=Attention(layers=[10, 20], alpha=0.1, form="add"),
                    steering=Steering(layers=[4, -4], beta=1.5), contrastive=Contrastive(alpha=0.0))
    path = tmp_path / "p.yaml"
    preset.to_yaml(path)
    data = yaml.safe_load(path.read_text())
    assert data["attention"] == {"layers": [10, 20], "alpha": 0.1, "form": "add"} and "patches" not in data
    assert data["steering"] == {"layers": [4, -4], "beta": 1.5}
    back = Preset.from_yaml(path)
    assert back.attention == preset.attention and back.steering == preset.steering
    assert "attention" not in Preset(name="x", contrastive=Contrastive()).to_dict()
    with pytest.raises(PresetError, match="or a contrastive, attention or steering block"):
        Preset.from_dict({"name": "none"})


def test_layer_ranges_are_checked_against_the_model(tmp_path):
    tiny_checkpoint(tmp_path / "m")
    model, _ = load_model_and_processor(str(tmp_path / "m"))
    n = len(backpatch.wrap(model, Preset(name="a", attention=Attention(layers=[0, -1]))).resolved.layers)
    resolved = backpatch.wrap(model, Preset(name="a", attention=Attention(layers=[1, -1]))).resolved
    assert resolved.setting("attention").layers == [1, n - 1]
    with pytest.raises(PresetError, match=rf"attention\.layers\[1\]: layer {n} is out of range .* has {n} decoder"):
        backpatch.wrap(model, Preset(name="a", attention=Attention(layers=[0, n])))
    with pytest.raises(PresetError, match=r"steering\.layers: \[-1, 2\] runs backwards"):
        backpatch.wrap(model, Preset(name="s", steering=Steering(layers=[-1, 2]), contrastive=Contrastive(alpha=0)))


def test_attention_block_refuses_flash_attention_with_the_fix(tmp_path):
    import torch

    from backpatch.inputs import build_inputs

    tiny_checkpoint(tmp_path / "m")
    model, processor = load_model_and_processor(str(tmp_path / "m"))
    wrapped = backpatch.wrap(model, Preset(name="a", attention=Attention(layers=[0, 1], alpha=0.2)))
    config = wrapped.resolved.layers[0].self_attn.config
    inputs = build_inputs(processor, [torch.zeros(16000).numpy()], ["Which digit?"])
    config._attn_implementation_internal = "flash_attention_2"
    try:
        with pytest.raises(PresetError, match=r"'flash_attention_2' attention does not take.*attn_implementation="
                                              r"'sdpa' or 'eager'"):
            wrapped.generate(**inputs, max_new_tokens=1)
    finally:
        config._attn_implementation_internal = "sdpa"
    assert backpatch.backpatch_hook_count(model) == 0
