"""Calibration on a tiny random model: the sweep's reuse is exact, and it writes a valid preset and a heatmap."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_checkpoint, tiny_conflict_set

import backpatch
from backpatch._architectures import resolve
from backpatch._engine import patch_session
from backpatch.calibrate import Setting, _prepare, _settings, default_grid, passes_no_harm
from backpatch.cli import main
from backpatch.evaluate import load_conflict_set
from backpatch.loading import load_model_and_processor


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    tiny_checkpoint(root / "model")
    data = tiny_conflict_set(root / "data", 3)
    model, processor = load_model_and_processor(str(root / "model"))
    return root, data, model, processor


def test_default_grid_and_settings():
    grid = default_grid(12)
    assert grid["sources"] == list(range(6, 12)) and grid["targets"] == list(range(6))
    settings = _settings(grid)
    # 36 pairs x (3 add scales + 1 replace) x 2 positions
    assert len(settings) == 36 * 4 * 2
    assert grid["alphas"] == [1.0, 2.0, 4.0] and grid["null_audio"] == "silence"
    assert all(s.source > s.target for s in settings)
    assert {s.scale for s in settings if s.mode == "replace"} == {1.0}


def test_no_harm_rule():
    plain = {"audio_only_acc": 0.90, "consistent_acc": 1.0}
    assert passes_no_harm({"audio_only_acc": 0.885, "consistent_acc": 0.98}, plain)
    assert not passes_no_harm({"audio_only_acc": 0.87, "consistent_acc": 1.0}, plain)
    assert not passes_no_harm({"audio_only_acc": 0.95, "consistent_acc": 0.97}, plain)
    assert passes_no_harm({"audio_only_acc": None, "consistent_acc": 1.0}, {"audio_only_acc": None,
                                                                            "consistent_acc": 1.0})


@pytest.mark.parametrize("setting", [Setting(5, 0, 2.0, "add", "audio"), Setting(4, 2, 1.0, "replace", "last")])
def test_reused_capture_gives_the_same_logits_as_a_fresh_capture(setup, setting):
    """One unpatched pass per batch serves every setting: the patched logits must equal the normal engine's."""
    _, data, model, processor = setup
    items = load_conflict_set(data)
    wrapped = backpatch.wrap(model, backpatch.Preset(patches=[setting.patch()]), processor=processor)
    grid = {"sources": [setting.source], "positions": [setting.positions], "alphas": []}
    batches, _ = _prepare(wrapped, processor, items, grid, batch_size=5, progress=False)
    resolved = resolve(model, wrapped.preset, processor)
    with torch.no_grad():
        for batch in batches:
            with patch_session(resolved, precaptured=batch.states):
                reused = model(**batch.inputs).logits[:, -1]
            fresh = wrapped(**batch.inputs).logits[:, -1]
            assert torch.equal(reused, fresh)
    assert backpatch.backpatch_hook_count(model) == 0


def test_calibrate_cli_writes_valid_preset_heatmap_and_sweep(setup, capsys):
    root, data, _, _ = setup
    out = root / "tiny-cal.yaml"
    code = main(["calibrate", "--model", str(root / "model"), "--data", str(data), "--out", str(out),
                 "--sources", "4,5", "--targets", "0,1", "--scales", "1,2", "--modes", "add,replace",
                 "--positions", "audio,last", "--alphas", "1,3", "--verify-top", "2", "--max-new-tokens", "2",
                 "--batch-size", "6"])
    assert code == 0
    preset = backpatch.Preset.from_yaml(out)
    assert preset.name == "tiny-cal" and preset.calibration.status == "calibrated"
    assert preset.patches or preset.contrastive
    for patch in preset.patches:
        assert patch.source in (4, 5) and patch.target in (0, 1) and patch.mode in ("add", "replace")
    assert preset.contrastive is None or preset.contrastive.alpha in (1.0, 3.0)
    # (TDR may be undefined on a random model: no answer names either digit; then it is left out, not faked)
    assert {"audio_only_acc_before", "audio_only_acc_after", "consistent_acc_before", "consistent_acc_after",
            "afr_before", "afr_after"} <= set(preset.calibration.metrics)
    assert preset.calibration.metrics["n_conflict"] == 6
    assert preset.model.num_layers == 6 and preset.match.model_type == "qwen2_audio"
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    sweep = json.loads(out.with_suffix(".sweep.json").read_text())
    # pairs x positions x (2 add scales + 1 replace), then each alpha alone and with the 3 best patch settings
    assert sweep["n_settings"] == 2 * 2 * 2 * 3 + 2 * 4
    labels = [row["setting"] for row in sweep["sweep"]]
    assert "contrastive a=1" in labels and sum("+ contrastive a=3" in label for label in labels) == 3
    assert len(sweep["sweep"]) == sweep["n_settings"] and len(sweep["verified"]) <= 2
    assert sweep["chosen"] in [row["setting"] for row in sweep["sweep"]]
    # the written preset loads back onto the model it was calibrated for
    model, processor = load_model_and_processor(str(root / "model"))
    backpatch.wrap(model, preset, processor=processor)
    assert "chosen:" in capsys.readouterr().out
