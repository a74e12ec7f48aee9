"""Diagnostics: the probe finds a planted signal (and only there), clip grouping is honoured, and the full run on a
tiny random model writes every file with the documented keys, reflects the patch, and leaves no hooks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny import tiny_conflict_set, tiny_with_processor

import backpatch
from backpatch import Patch, Preset
from backpatch.audio_io import load_audio
from backpatch.diagnose import (
    _lens_fn,
    _Recorder,
    class_mean_convergence,
    diagnose,
    linear_probe,
    probe_layers,
    text_takeover_layer,
)
from backpatch.diagnose.probes import _group_folds
from backpatch.engine import final_norm
from backpatch.evaluate import load_conflict_set
from backpatch.inputs import build_inputs

REQUIRED = ("layer", "probe_audio_conflict", "probe_audio_audio_only", "lens_audio_prob", "lens_text_prob",
            "convergence", "attn_audio", "attn_text")
FIGURES = ("probes.png", "logit_lens.png", "convergence.png", "attention.png")
# replace at the last prompt position: the target layer's last state becomes the source layer's plain state
PRESET = Preset(patches=[Patch(source=4, target=1, mode="replace", positions="last")], name="tiny-test")


def test_probe_finds_the_planted_layer_only():
    g = torch.Generator().manual_seed(0)
    n, dim, layers, planted = 300, 24, 6, 3
    labels = torch.randint(0, 10, (n,), generator=g)
    groups = [i // 3 for i in range(n)]
    states = torch.randn(layers, n, dim, generator=g)
    states[planted] += 1.5 * torch.randn(10, dim, generator=g)[labels]
    acc = probe_layers(states.to(torch.bfloat16), labels.tolist(), groups)
    assert int(np.argmax(acc)) == planted
    assert acc[planted] > 0.9
    assert all(a < 0.25 for i, a in enumerate(acc) if i != planted)  # chance is 0.1


def test_probe_never_tests_on_a_training_clip():
    """Features that identify the clip (and labels constant per clip) are memorisable but carry no label signal:
    an ungrouped split would score high; the grouped probe must stay near chance."""
    g = torch.Generator().manual_seed(1)
    groups = [i // 3 for i in range(300)]
    clip = torch.randn(100, 24, generator=g)
    clip_label = torch.randint(0, 10, (100,), generator=g)
    features = clip[groups] + 0.01 * torch.randn(300, 24, generator=g)
    labels = clip_label[groups].tolist()
    assert linear_probe(features, labels, groups) < 0.25
    assert linear_probe(features, labels, list(range(300))) > 0.6  # what leakage would look like
    folds = _group_folds(groups, 5, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(300))
    assert all(not ({groups[i] for i in a} & {groups[i] for i in b}) for a in folds for b in folds if a is not b)


def test_probe_degenerate_inputs_give_none():
    assert linear_probe(torch.randn(6, 4), ["a"] * 6, range(6)) is None  # one class
    assert linear_probe(torch.randn(6, 4), ["a", "b"] * 3, [0] * 6) is None  # one clip
    x = torch.randn(8, 4)
    x[0] = float("nan")  # items without that state (e.g. no claim word) are left out, not propagated
    assert linear_probe(x, ["a", "b"] * 4, range(8)) is not None


def test_convergence_and_takeover():
    g = torch.Generator().manual_seed(2)
    means = torch.randn(10, 16, generator=g)
    labels = [str(i % 10) for i in range(100)]
    audio = means[[i % 10 for i in range(100)]] + 0.1 * torch.randn(100, 16, generator=g) + 5.0  # offset ignored
    text = means[[i % 10 for i in range(100)]] + 0.1 * torch.randn(100, 16, generator=g)
    same = class_mean_convergence(audio, labels, text, labels)
    assert same["cosine"] > 0.95 and same["nc_acc"] == 1.0 and same["baseline"] < 0.2 and same["n_classes"] == 10
    other = class_mean_convergence(audio, labels, torch.randn(100, 16, generator=g), labels)
    assert abs(other["cosine"]) < 0.5 and other["nc_acc"] < 0.5
    assert text_takeover_layer([0.5, 0.2, 0.1, 0.1], [0.1, 0.3, 0.8, 0.9]) == 1
    assert text_takeover_layer([0.1, 0.5, 0.1], [0.2, 0.3, 0.8]) == 2
    assert text_takeover_layer([0.1, 0.9], [0.2, 0.3]) is None


def test_text_ahead_ranges_show_a_middle_lead_that_the_takeover_layer_hides():
    from backpatch.diagnose.probes import text_ahead_ranges

    # smol-whisper's shape: nothing readable early, the text ahead in the middle, the audio level at the end
    audio = [0.0, 0.0, 0.05, 0.1, 0.2, 0.5]
    text = [0.0, 0.001, 0.2, 0.3, 0.1, 0.45]
    assert text_takeover_layer(audio, text) is None
    assert text_ahead_ranges(audio, text) == [[2, 3]]  # layer 1 is below the readability floor
    assert text_ahead_ranges([0.1, 0.1, 0.1], [0.2, 0.05, 0.3]) == [[0, 0], [2, 2]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    model, processor = tiny_with_processor()
    data = tiny_conflict_set(root / "data", 10)
    report = diagnose(model, processor, data, root / "out", preset=PRESET, batch_size=16, progress=False)
    return root, model, processor, data, report


def test_files_and_report_keys(tiny):
    root, model, _, _, report = tiny
    out = root / "out"
    for name in ("report.json", "report.md", "suggested_preset.yaml", *FIGURES):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "report.json").read_text())
    assert saved["layers"] == report["layers"]
    assert len(saved["layers"]) == 6 and [r["layer"] for r in saved["layers"]] == list(range(6))
    for row in saved["layers"]:
        for key in REQUIRED:
            assert isinstance(row[key], (int, float)) and not isinstance(row[key], bool), (row["layer"], key)
            if key != "layer":
                assert isinstance(row[f"{key}_patched"], (int, float)), (row["layer"], key)
    assert saved["counts"] == {"conflict": 20, "audio_only": 10, "consistent": 10}
    markdown = (out / "report.md").read_text()
    assert all(f"]({name})" in markdown for name in FIGURES)
    # the suggestion is a valid preset for this model, and the sweep that chose it is recorded
    suggested = Preset.from_dict(saved["suggested_preset"])
    assert suggested.to_dict() == Preset.from_yaml(out / "suggested_preset.yaml").to_dict()
    assert suggested.patches[0].source > suggested.patches[0].target
    backpatch.wrap(model, suggested)
    assert saved["sweep"] and all(0 <= r["audio_only_acc"] <= 1 for r in saved["sweep"])


def test_no_hooks_left_and_attention_restored(tiny):
    _, model, _, _, _ = tiny
    assert backpatch.backpatch_hook_count(model) == 0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert model.config._attn_implementation != "eager"  # switched for the run only


def test_patched_curves_reflect_the_patch(tiny):
    """Replace 4 -> 1 at the last position: the last-position state of layer 1 is the plain layer-4 state, so
    everything read there (lens, probe) must equal layer 4's plain values; layer 0 is untouched."""
    layers = tiny[4]["layers"]
    for key in ("lens_audio_prob", "lens_text_prob", "lens_audio_rank", "probe_audio_conflict"):
        assert layers[1][f"{key}_patched"] == pytest.approx(layers[4][key], abs=2e-4), key
        assert layers[0][f"{key}_patched"] == pytest.approx(layers[0][key], abs=2e-4), key
    assert layers[1]["lens_text_prob_patched"] != pytest.approx(layers[1]["lens_text_prob"], abs=1e-3)
    # attention shares sum to at most 1 and the lens at the last layer is the model's own first-token answer
    assert all(0 <= r["attn_audio"] + r["attn_text"] <= 1 + 1e-4 for r in layers)
    assert tiny[4]["first_token"]["plain"]["n_conflict"] == 20


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_half_precision_and_no_preset(tmp_path, dtype):
    model, processor = tiny_with_processor()
    model = model.to(dtype)
    data = tiny_conflict_set(tmp_path / "data", 4)
    report = diagnose(model, processor, data, tmp_path / "out", preset=None, limit=12, progress=False, sweep=False)
    assert report["preset"] is None  # nothing matches a random model: plain curves only
    assert all(isinstance(r["lens_audio_prob"], float) and isinstance(r["attn_audio"], float)
               for r in report["layers"])
    assert Preset.from_dict(report["suggested_preset"]).patches
    assert backpatch.backpatch_hook_count(model) == 0


def test_recorded_states_are_layer_outputs_and_the_lens_ends_at_the_logits(tiny):
    """Layer i's output is read at layer i+1's input; it must equal what the model itself reports (HF's last
    hidden state is after the final norm), and the lens at the last layer must be the model's own distribution."""
    _, model, processor, data, _ = tiny
    items = load_conflict_set(data)[:5]
    inputs = build_inputs(processor, [load_audio(it.audio, 16000) for it in items], [it.prompt for it in items])
    resolved = backpatch.wrap(model, PRESET).resolved
    recorder = _Recorder(resolved, [None] * resolved.num_layers, None)
    recorder.prepare(inputs["input_ids"], inputs["attention_mask"], torch.zeros_like(inputs["input_ids"], dtype=bool))
    with torch.no_grad(), recorder.hooks():
        out = model(**inputs, output_hidden_states=True)
    norm = final_norm(resolved.text_model)
    for i in range(resolved.num_layers):
        mine = recorder.reduced[i]["last_device"]
        expected = out.hidden_states[i + 1][:, -1]
        torch.testing.assert_close(norm(mine) if i == resolved.num_layers - 1 else mine, expected)
    ids = [[int(t)] for t in out.logits[:, -1].argmax(-1)]
    with torch.no_grad():
        lens = _lens_fn(resolved.generator, norm)(recorder.reduced[5]["last_device"], (ids, ids))
    torch.testing.assert_close(lens["audio_prob"], out.logits[:, -1].softmax(-1).max(-1).values)
    assert lens["audio_rank"].tolist() == [1.0] * 5
    assert backpatch.backpatch_hook_count(model) == 0


def test_dispatched_model_with_disk_offload_gives_the_same_report(tmp_path):
    """device_map models (layers 1 and 4, the patch's target and source, offloaded to disk) give the same curves."""
    from transformers import Qwen2AudioForConditionalGeneration

    model, processor = tiny_with_processor()
    data = tiny_conflict_set(tmp_path / "data", 4)
    kwargs = dict(preset=PRESET, progress=False, sweep=False, batch_size=8)
    expected = diagnose(model, processor, data, tmp_path / "a", **kwargs)["layers"]
    model.save_pretrained(tmp_path / "ckpt")
    device_map = {name: "cpu" for name in ("model.audio_tower", "model.multi_modal_projector", "lm_head",
                                           "model.language_model.embed_tokens", "model.language_model.norm",
                                           "model.language_model.rotary_emb")}
    device_map |= {f"model.language_model.layers.{i}": "disk" if i in (1, 4) else "cpu" for i in range(6)}
    dispatched = Qwen2AudioForConditionalGeneration.from_pretrained(
        tmp_path / "ckpt", device_map=device_map, offload_folder=str(tmp_path / "offload")).eval()
    got = diagnose(dispatched, processor, data, tmp_path / "b", **kwargs)["layers"]
    for g, e in zip(got, expected, strict=True):
        assert g.keys() == e.keys()
        for key in g:
            assert g[key] == pytest.approx(e[key], abs=2e-4), (g["layer"], key)
    assert backpatch.backpatch_hook_count(dispatched) == 0


def test_a_patchless_gated_preset_is_diagnosed_with_its_layers_only(tmp_path):
    """The shipped smol-whisper preset has no patch, only contrastive decoding behind an audio_gap gate: diagnose
    keeps its facts (layers, audio span), leaves the rest out and draws the plain curves."""
    model, processor = tiny_with_processor()
    data = tiny_conflict_set(tmp_path / "data", 4)
    gated = Preset(name="gated", contrastive=backpatch.Contrastive(alpha=2.0, null_audio="zeros"),
                   gate=backpatch.Gate("audio_gap", 0.1, 0.3))
    report = diagnose(model, processor, data, tmp_path / "out", preset=gated, limit=8, progress=False, sweep=False)
    assert all("lens_audio_prob_patched" not in r for r in report["layers"])
    assert backpatch.backpatch_hook_count(model) == 0
