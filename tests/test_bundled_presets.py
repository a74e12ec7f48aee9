"""Bundled presets for real checkpoints: generated from one table by one rule, and found by wrap(model)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from families import BUILDERS

import backpatch
from backpatch.bundled import find_matching_preset
from backpatch.engine import resolve

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("make_presets", REPO / "scripts" / "make_presets.py")
make_presets = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_presets)

# real hub ids -> the preset wrap(model) must pick for them
HUB_IDS = {
    "Qwen/Qwen2-Audio-7B-Instruct": ("qwen2_audio", "qwen2-audio-7b-instruct"),
    "Qwen/Qwen2.5-Omni-7B": ("qwen2_5_omni", "qwen2.5-omni-7b"),
    "Qwen/Qwen2.5-Omni-3B": ("qwen2_5_omni", "qwen2.5-omni-3b"),
    "Qwen/Qwen3-Omni-30B-A3B-Instruct": ("qwen3_omni_moe", "qwen3-omni-30b-a3b"),
    "mistralai/Voxtral-Mini-3B-2507": ("voxtral", "voxtral-mini-3b"),
    "mistralai/Voxtral-Small-24B-2507": ("voxtral", "voxtral-small-24b"),
    "nvidia/audio-flamingo-3-hf": ("audioflamingo3", "audio-flamingo-3"),
    "nvidia/music-flamingo-hf": ("musicflamingo", "music-flamingo"),
    "ibm-granite/granite-speech-3.3-8b": ("granite_speech", "granite-speech-3.3-8b"),
    "ibm-granite/granite-speech-3.3-2b": ("granite_speech", "granite-speech-3.3-2b"),
    "microsoft/Phi-4-multimodal-instruct": ("phi4_multimodal", "phi-4-multimodal"),
    "zai-org/GLM-ASR-Nano-2512": ("glmasr", "glm-asr"),
    "google/gemma-3n-E2B-it": ("gemma3n", "gemma-3n-e2b"),
    "google/gemma-3n-E4B-it": ("gemma3n", "gemma-3n-e4b"),
}


@pytest.mark.parametrize("name", sorted(make_presets.CHECKPOINTS))
def test_bundled_file_is_what_the_script_writes(name):
    on_disk = backpatch.load_preset(name)
    assert on_disk == make_presets.build(name), f"presets/{name}.yaml is stale: run python scripts/make_presets.py"


@pytest.mark.parametrize("name", sorted(make_presets.CHECKPOINTS))
def test_uncalibrated_presets_follow_the_one_rule(name):
    preset = backpatch.load_preset(name)
    n = preset.model.num_layers
    assert preset.calibration.status == "uncalibrated"
    assert [(p.source, p.target, p.mode, p.scale, p.positions) for p in preset.patches] == [
        (round(0.9 * n), round(n / 2), "add", 0.05, "audio")
    ]
    assert f"{n} decoder layers" in preset.description and "Uncalibrated" in preset.description


@pytest.mark.parametrize("hub_id", sorted(HUB_IDS))
def test_matching_preset_for_real_hub_ids(hub_id):
    model_type, expected = HUB_IDS[hub_id]
    assert find_matching_preset(model_type, hub_id).name == expected


def test_every_family_with_a_checkpoint_preset_resolves_on_a_tiny_model_of_the_real_depth():
    """The preset's layer path and audio span fit the real class (only the depth is the real one's)."""
    seen = set()
    for name, (_, model_type, _, _, num_layers, _, _) in sorted(make_presets.CHECKPOINTS.items()):
        builder = next(b for b in BUILDERS.values() if b.__name__ == model_type)
        if model_type in seen:
            continue
        seen.add(model_type)
        fam = builder()
        preset = backpatch.load_preset(name)
        with pytest.raises(backpatch.PresetError, match=f"preset is for a model with {num_layers} decoder layers, "
                                                        f"but this model has 4"):
            resolve(fam.model, preset)
        preset.model.num_layers = None
        preset.patches = [backpatch.Patch(source=3, target=1)]
        resolved = resolve(fam.model, preset)
        assert resolved.layers is fam.layers
        assert int((fam.batch["input_ids"] == resolved.audio_token_id).sum()) > 0


def test_the_rule_was_measured_to_do_no_harm_on_both_organisms_test_splits():
    """docs/uncalibrated-rule.json (scripts/uncalibrated_rule.py) measured exactly today's rule: change the rule
    and this fails until it is measured again."""
    import json

    from backpatch.methods.backpatching import UNCALIBRATED_RULE, uncalibrated_patch

    report = json.loads((REPO / "docs" / "uncalibrated-rule.json").read_text())
    assert report["rule"] == UNCALIBRATED_RULE
    assert {"smol-whisper", "digits"} <= set(report["organisms"])
    for name, entry in report["organisms"].items():
        patch = uncalibrated_patch(entry["num_layers"])
        assert entry["patch"] == backpatch.Preset(patches=[patch]).to_dict()["patches"][0], name
        # both organisms on both splits; any further model (a fresh projector) on the test split at least
        splits = ("validation", "test") if name in ("smol-whisper", "digits") else ("test",)
        assert set(splits) <= set(entry["splits"]), name
        for split in entry["splits"]:
            result = entry["splits"][split]
            assert f"/{split}/" in result["data"], (name, split, result["data"])
            for key in ("audio_only_acc", "consistent_acc"):
                assert result["plain"][key] - result["backpatched"][key] <= report["max_harm"] == 0.02, (name, split)
            assert result["backpatched"]["tdr"] <= result["plain"]["tdr"] + 0.02, (name, split)


@pytest.mark.parametrize("n", [2, 3, 12, 30, 48])
def test_the_rule_gives_a_valid_late_to_early_patch_at_every_depth(n):
    from backpatch.methods.backpatching import uncalibrated_patch

    patch = uncalibrated_patch(n)
    assert 0 <= patch.target < patch.source <= n - 1
    assert (patch.scale, patch.mode, patch.positions) == (0.05, "add", "audio")


def test_the_rule_refuses_a_one_layer_decoder_naming_the_count():
    from backpatch.methods.backpatching import uncalibrated_patch

    with pytest.raises(ValueError, match="at least 2 layers.*has 1"):
        uncalibrated_patch(1)


def test_diagnose_suggestion_sweep_tries_the_gentle_rule_and_the_early_targets():
    from backpatch.diagnose.suggest import _sweep_settings
    from backpatch.methods.backpatching import uncalibrated_patch

    layers = [{"layer": i, "probe_audio_conflict": 0.5 + 0.01 * i} for i in range(30)]
    settings = _sweep_settings(layers, 30)
    labels = [s.label() for s in settings]
    assert len(labels) == len(set(labels))
    assert all(0 <= s.target < s.source < 30 for s in settings)
    rule = uncalibrated_patch(30)
    assert any((s.source, s.target, s.scale, s.mode) == (rule.source, rule.target, 0.05, "add") for s in settings)
    assert "29->0 replace x1 @last" in labels  # the digits organism's kind stays in


def test_calibrated_bundled_presets_carry_provenance_that_travels():
    """Issue 28 point 4: the data by a portable name (no absolute path of the machine it was made on), counts as
    integers in the file, and the command that made the preset: `backpatch calibrate`, or a script of this repository
    (smol-whisper's preset was chosen by scripts/agreement_frontier.py under the per-family rule)."""
    import yaml

    for name in backpatch.list_presets():
        preset = backpatch.load_preset(name)
        cal = preset.calibration
        if cal is None or cal.status != "calibrated":
            continue
        raw = yaml.safe_load((backpatch_presets_dir() / f"{name}.yaml").read_text())["calibration"]
        assert cal.data and not cal.data.startswith(("/", "~")), name
        assert cal.command and cal.command.startswith(("backpatch ", "python scripts/")), name
        assert " /" not in cal.command, name
        for script in re.findall(r"scripts/\S+\.py", cal.command):
            assert (REPO / script).is_file(), (name, script)
        counts = {k: v for k, v in raw["metrics"].items() if k.startswith("n_") or "_n_" in k}
        assert counts and all(type(v) is int for v in counts.values()), (name, counts)


def backpatch_presets_dir():
    from backpatch.bundled import bundled_preset_dir

    return bundled_preset_dir()
