"""Calibration on a tiny random model: the sweep's reuse is exact, and it writes a valid preset and a heatmap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import tiny_checkpoint, tiny_conflict_set

import backpatch
from backpatch.calibrate import Candidate, Setting, _settings, default_grid, passes_no_harm, prepare_batches
from backpatch.cli import main
from backpatch.engine import generation_session, resolve
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
    batches, _ = prepare_batches(wrapped, processor, items, grid, batch_size=5, progress=False)
    resolved = resolve(model, wrapped.preset, processor)
    with torch.no_grad():
        for batch in batches:
            with generation_session(resolved, precaptured=batch.states):
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
    # a random model hears nothing: the run completes, but the preset does not claim a calibration
    assert preset.name == "tiny-cal" and preset.calibration.status == "uncalibrated"
    assert preset.description.startswith("NOT CALIBRATED: ")
    assert preset.patches or preset.contrastive
    for patch in preset.patches:
        assert patch.source in (4, 5) and patch.target in (0, 1) and patch.mode in ("add", "replace")
    assert preset.contrastive is None or preset.contrastive.alpha in (1.0, 3.0)
    # (TDR may be undefined on a random model: no answer names either digit; then it is left out, not faked)
    assert {"audio_only_acc_before", "audio_only_acc_after", "consistent_acc_before", "consistent_acc_after",
            "afr_before", "afr_after"} <= set(preset.calibration.metrics)
    assert preset.calibration.metrics["n_conflict"] == 6
    assert preset.model.num_layers == 6 and preset.match.model_type == "qwen2_audio"
    # issue 28 point 4: provenance that means something on another machine (no absolute path of this one)
    import hashlib

    cal = preset.calibration
    assert cal.data == "/".join(Path(data).parts[-3:]) and not cal.data.startswith("/")
    assert cal.data_sha256 == hashlib.sha256(Path(data).read_bytes()).hexdigest()
    assert cal.command.startswith("backpatch calibrate --model ") and str(root) not in cal.command
    assert f"--data {cal.data} " in cal.command and "--alphas 1,3" in cal.command
    assert isinstance(cal.metrics["n_conflict"], int) and "n_conflict: 6\n" in out.read_text()
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
    captured = capsys.readouterr()
    assert "chosen:" in captured.out and "the preset is written with status: uncalibrated" in captured.err


@pytest.mark.parametrize("setting", [Setting(5, 0, 2.0, "add", "audio"), Setting(4, 2, 0.5, "interpolate", "last"),
                                     Setting(3, 1, 1.0, "replace", "audio")])
def test_sweep_short_path_runs_only_the_layers_after_the_target_and_equals_the_engine(setup, setting):
    """A scored setting runs layers t+1..N-1 from the shared capture's layer-t state (counted with forward hooks
    on the decoder layers), and its first-token metrics equal those of the normal engine on the same batches."""
    from backpatch.calibrate import Candidate, Scorer
    from backpatch.calibrate.writing import candidate_preset

    _, data, model, processor = setup
    items = load_conflict_set(data)
    wrapped = backpatch.wrap(model, backpatch.Preset(patches=[setting.patch()]), processor=processor)
    grid = {"sources": [setting.source], "positions": [setting.positions]}
    batches, _ = prepare_batches(wrapped, processor, items, grid, batch_size=4, progress=False, layer_states=True)
    layers = wrapped.resolved.layers
    calls = []
    handles = [layer.register_forward_hook(lambda *_a, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    try:
        short = Scorer(model, processor, wrapped.preset, "silence", None, candidate_preset)
        short_metrics = short.score(Candidate(setting), batches)
        assert short.short_path_ok is True
        calls.clear()
        short_metrics = short.score(Candidate(setting), batches)
        per_batch = len(layers) - setting.target - 1
        assert calls == list(range(setting.target + 1, len(layers))) * len(batches) and per_batch < len(layers)
        engine = Scorer(model, processor, wrapped.preset, "silence", None, candidate_preset)
        engine.short_path_ok = False
        calls.clear()
        assert engine.score(Candidate(setting), batches) == short_metrics
        assert len(calls) == len(layers) * len(batches)  # the engine runs every layer
    finally:
        for h in handles:
            h.remove()
    # and the logits themselves: bit-identical on every batch
    resolved = resolve(model, wrapped.preset, processor)
    with torch.no_grad():
        for batch in batches:
            with generation_session(resolved, precaptured=batch.states):
                full = model(**batch.inputs, use_cache=False).logits[:, -1]
            assert torch.equal(short._short_logits(resolved, resolved.setting("patches")[0], batch), full)


def test_staged_default_search_covers_the_whole_depth_and_small_scales():
    from backpatch.calibrate import band_grid, refinements

    coarse = band_grid(30)
    pairs = {(s.source, s.target) for s in coarse}
    assert {(1, 0), (2, 0), (4, 0), (10, 9), (29, 27), (29, 0)} <= pairs
    assert {s.source - s.target for s in coarse} >= {1, 2, 4, 8, 16}
    assert {(s.mode, s.positions) for s in coarse} == {("add", "audio"), ("interpolate", "audio"),
                                                     ("replace", "audio"), ("interpolate", "last"),
                                                     ("replace", "last")}
    assert min(s.scale for s in coarse if s.mode == "add") <= 0.1 and len(coarse) == 300
    fine = refinements([Setting(10, 8, 0.5, "interpolate", "audio")], 30)
    assert Setting(10, 8, 0.25, "interpolate", "audio") in fine and Setting(10, 8, 1.0, "interpolate", "audio") in fine
    assert Setting(11, 8, 0.5, "interpolate", "audio") in fine and Setting(10, 9, 0.5, "interpolate", "audio") in fine
    assert all(0 <= s.target < s.source < 30 for s in fine)


def test_staged_search_on_a_budget_records_what_it_cut(setup, tmp_path):
    from backpatch.calibrate import band_grid, calibrate, verify

    root, data, model, processor = setup
    batches = []
    real = verify.answer_items

    def counting(wrapped, processor, items, *args, **kwargs):
        batches.append(len(items))
        return real(wrapped, processor, items, *args, **kwargs)

    # a budget that cannot hold even the verification stops after one timed batch, naming the budget it needs
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(verify, "answer_items", counting)
        with pytest.raises(ValueError, match=r"time budget \(0 min\) cannot hold the generate\(\) verification.*"
                                             r"raise --budget-minutes to at least \d+"):
            calibrate(model, processor, data, tmp_path / "none.yaml", grid={"alphas": []}, batch_size=4,
                      budget_minutes=0.0, progress=False)
    assert batches == [4] and not (tmp_path / "none.yaml").exists()
    summary = calibrate(model, processor, data, tmp_path / "staged.yaml", grid={"alphas": [1.0]}, batch_size=4,
                        verify_top=1, max_new_tokens=2, budget_minutes=5.0, progress=False)
    stages = summary["search"]["stages"]
    assert summary["search"]["kind"] == "staged" and [s["name"] for s in stages] == ["coarse", "refine", "full"]
    assert stages[0]["n_settings"] + stages[0]["truncated"] == len(band_grid(6))
    assert stages[0]["n_items"] <= stages[1]["n_items"] <= stages[2]["n_items"] == summary["n_items"]
    assert summary["short_path"] is True and Path(summary["band"]).read_bytes()[:4] == b"\x89PNG"
    assert {row["stage"] for row in summary["sweep"]} <= {"coarse", "refine", "full"}
    backpatch.Preset.from_yaml(tmp_path / "staged.yaml")


def test_norm_matched_sweep_short_path_equals_the_engine(setup):
    """Scoring with match_norm on the sweep's short path gives the engine's logits for a match_norm preset."""
    _, data, model, processor = setup
    items = load_conflict_set(data)
    patch = backpatch.Patch(5, 1, 0.5, "interpolate", "audio", match_norm=True)
    wrapped = backpatch.wrap(model, backpatch.Preset(patches=[patch]), processor=processor)
    batches, _ = prepare_batches(wrapped, processor, items, {"sources": [5], "positions": ["audio"]}, batch_size=4,
                                  progress=False, layer_states=True)
    from backpatch.calibrate import Scorer
    from backpatch.calibrate.writing import candidate_preset

    scorer = Scorer(model, processor, wrapped.preset, "silence", None, candidate_preset)
    resolved = resolve(model, wrapped.preset, processor)
    unmatched = resolve(model, backpatch.Preset(patches=[backpatch.Patch(5, 1, 0.5, "interpolate")]), processor)
    with torch.no_grad():
        for batch in batches:
            with generation_session(resolved, precaptured=batch.states):
                full = model(**batch.inputs, use_cache=False).logits[:, -1]
            torch.testing.assert_close(scorer._short_logits(resolved, resolved.setting("patches")[0], batch), full)
            short = scorer._short_logits(unmatched, unmatched.setting("patches")[0], batch, match_norm=True)
            torch.testing.assert_close(short, full)


@pytest.mark.parametrize("gate", [backpatch.Gate("audio_gap", 0.0, 0.0), backpatch.Gate("audio_gap", 0.3, 0.3),
                                  backpatch.Gate("certainty", 0.0, 1.0), None])
@pytest.mark.parametrize("alpha,plausibility,agreement", [(0.0, None, None), (1.5, None, None), (1.5, 0.3, None),
                                                          (1.5, None, "median")])
@pytest.mark.parametrize("short_path", [True, False])
def test_gated_and_contrastive_scoring_equals_generate(setup, gate, alpha, plausibility, agreement, short_path):
    """What calibration scores for a candidate (stored plain and null-audio logits, cached patched logits, the
    gate per row) is what generate() with that candidate's preset gives as first-token logits."""
    from backpatch.calibrate import Candidate, Scorer
    from backpatch.calibrate.writing import candidate_preset

    _, data, model, processor = setup
    items = load_conflict_set(data)
    setting = Setting(5, 1, 1.5, "add", "audio")
    base = backpatch.wrap(model, backpatch.Preset(patches=[setting.patch()]), processor=processor)
    batches, _ = prepare_batches(base, processor, items, {"sources": [5], "positions": ["audio"]}, batch_size=4,
                          progress=False, layer_states=short_path, null=("zeros", None))
    scorer = Scorer(model, processor, base.preset, "zeros", None, candidate_preset)
    if gate is not None and gate.low == 0.3:  # a step inside the range of the signal: some rows on, some off
        gaps = torch.cat([0.5 * (b.main_logits.softmax(-1) - b.null_logits.softmax(-1)).abs().sum(-1)
                          for b in batches])
        gate = backpatch.Gate("audio_gap", float(gaps.median()), float(gaps.median()))
    if agreement == "median":  # a threshold inside the signal's range: some rows keep their answer, some do not
        from backpatch.methods.contrastive import agreement_signal

        agreement = float(torch.cat([agreement_signal(b.main_logits, b.null_logits) for b in batches]).median())
    candidate = Candidate.of(setting, alpha, gate, plausibility, agreement)
    preset = candidate_preset(base.preset, candidate, "zeros")
    assert preset.contrastive is None or preset.contrastive.plausibility == plausibility
    assert preset.contrastive is None or preset.contrastive.agreement == agreement
    wrapped = backpatch.wrap(model, preset, processor=processor)
    for index, batch in enumerate(batches):
        with torch.no_grad():
            want = wrapped.generate(**batch.inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True).logits[0].float()
            got = scorer.first_token_logits(candidate, batches, index)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert scorer.short_path_ok is (True if short_path else None)
    metrics = scorer.score(candidate, batches)
    assert len(metrics["verdicts"]) == len(items)


@pytest.mark.parametrize("gate", [None, "median"])
@pytest.mark.parametrize("alpha", [0.0, 1.5])
@pytest.mark.parametrize("short_path", [True, False])
def test_a_patch_agreement_guard_scores_as_generate_runs_it(setup, gate, alpha, short_path):
    """The patch's agreement guard (issue 28) folded into the row strength from the stored logits is what generate()
    with the guarded patch gives, alone, under a gate step and with contrastive decoding."""
    from backpatch.calibrate import Candidate, Scorer
    from backpatch.calibrate.writing import candidate_preset
    from backpatch.methods.contrastive import agreement_signal

    _, data, model, processor = setup
    setting = Setting(5, 1, 1.5, "add", "audio")
    base = backpatch.wrap(model, backpatch.Preset(patches=[setting.patch()]), processor=processor)
    batches, _ = prepare_batches(base, processor, load_conflict_set(data), {"sources": [5], "positions": ["audio"]},
                                 batch_size=4, progress=False, layer_states=short_path, null=("zeros", None))
    scorer = Scorer(model, processor, base.preset, "zeros", None, candidate_preset)
    signal = torch.cat([agreement_signal(b.main_logits, b.null_logits) for b in batches])
    threshold = float(signal.median())  # some rows guarded, some patched
    assert 0 < int((signal < threshold).sum()) < len(signal)
    if gate == "median":
        gaps = torch.cat([0.5 * (b.main_logits.softmax(-1) - b.null_logits.softmax(-1)).abs().sum(-1)
                          for b in batches])
        gate = backpatch.Gate("audio_gap", float(gaps.median()), float(gaps.median()))
    candidate = Candidate(setting, alpha, gate, patch_agreement=threshold)
    preset = candidate_preset(base.preset, candidate, "zeros")
    assert preset.patches[0].agreement == threshold and preset.contrastive.alpha == alpha
    wrapped = backpatch.wrap(model, preset, processor=processor)
    unguarded = Candidate(setting, alpha, gate)
    differs = False
    for index, batch in enumerate(batches):
        with torch.no_grad():
            want = wrapped.generate(**batch.inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True).logits[0].float()
            got = scorer.first_token_logits(candidate, batches, index)
            differs |= not torch.allclose(got, scorer.first_token_logits(unguarded, batches, index), atol=1e-3)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert differs, "the guard must change some row"


def test_a_patch_guard_candidate_reads_back_from_its_sweep_row_and_writes_its_guard():
    from backpatch.calibrate import Candidate
    from backpatch.calibrate.report import _row
    from backpatch.calibrate.resume import candidate_of_row
    from backpatch.calibrate.writing import candidate_preset

    candidate = Candidate(Setting(5, 1, 1.0, "add", "audio"), patch_agreement=1.0)
    assert candidate.null_rows
    m = {"tdr": 0.1, "afr": 0.0, "other_rate": 0.0, "audio_only_acc": 1.0, "consistent_acc": 1.0}
    row = _row(candidate, m, m, 0.02, bounded=False)
    assert row["patch_agreement"] == 1.0 and row["setting"] == "5->1 add x1 @audio unless audio agrees by 1 nats"
    assert candidate_of_row(json.loads(json.dumps(row))) == candidate
    preset = candidate_preset(backpatch.Preset(patches=[backpatch.Patch(5, 1)]), candidate, "silence")
    assert preset.patches == [backpatch.Patch(5, 1, 1.0, "add", "audio", agreement=1.0)]
    assert preset.contrastive == backpatch.Contrastive(alpha=0.0, null_audio="silence")  # rows for the guard only
    assert "unless audio agrees by 1 nats" in backpatch.preset.methods_details(preset)


def test_staged_search_with_stress_data_and_gates(setup, tmp_path):
    """Perturbed items join the search as their own split of the no-harm rule; the refine stage tries gates on the
    strongest settings; every sweep row records its paired harm bound and TDR reduction bound."""
    from backpatch.calibrate import calibrate

    root, data, model, processor = setup
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    stress = data.parent / "stress.jsonl"
    stress.write_text("".join(json.dumps({**row, "id": "s" + row["id"], "perturbation": "snr0"}) + "\n"
                              for row in rows))
    summary = calibrate(model, processor, data, tmp_path / "g.yaml", grid={"alphas": [1.0]}, batch_size=4,
                        verify_top=1, max_new_tokens=2, budget_minutes=5.0, progress=False, stress_data=stress)
    assert summary["n_items"] == 2 * len(rows) and summary["stress_data"] == str(stress)
    refine = [row for row in summary["sweep"] if row["stage"] == "refine"]
    assert {row["gate"]["signal"] for row in refine if row["gate"]} == {"audio_gap", "certainty"}
    assert {row.get("patch_agreement") for row in refine} >= {None, 0.5, 1.0, 2.0}
    assert {s["harm_rule"] for s in summary["search"]["stages"]} == {"point loss", "upper bound"}
    for row in summary["sweep"]:
        assert set(row["harm"]) == {"clean", "perturbed"}
        assert row["harm_upper"] == max(b["upper"] for kinds in row["harm"].values() for b in kinds.values())
        assert row["no_harm"] == (row["harm_upper"] <= 0.02 if row["stage"] == "full" else
                                  all(b["loss"] <= 0.02 for kinds in row["harm"].values() for b in kinds.values()))
    verified = summary["verified"][0]
    assert "perturbed" in verified and set(verified["paired"]["harm"]) == {"clean", "perturbed"}
    preset = backpatch.Preset.from_yaml(tmp_path / "g.yaml")
    assert preset.calibration.metrics["harm_upper_bound"] == summary["chosen_paired"]["harm_upper"]
    assert "perturbed_consistent_acc_before" in preset.calibration.metrics  # (TDR is None on a random model)
    assert "audio-confidence gates" in summary["searched"] and summary["searched"] in preset.description
    assert "patch agreement guards" in summary["searched"]


def test_calibration_can_skip_the_full_stage_and_reuses_plain_answers_in_verification(setup, tmp_path, monkeypatch):
    """The verification's plain answers are generated once, before the search (they price the verification), and
    every finalist's verification reuses them."""
    from backpatch import evaluate as evaluate_module
    from backpatch.calibrate import calibrate, verify

    _, data, model, processor = setup
    seen, plain_runs = [], []
    real, real_answers = evaluate_module.evaluate, evaluate_module.answer_items

    def spy(*args, **kwargs):
        seen.append(kwargs.get("plain_answers"))
        return real(*args, **kwargs)

    def answers_spy(*args, **kwargs):
        plain_runs.append(kwargs.get("backpatched", True))
        return real_answers(*args, **kwargs)

    monkeypatch.setattr(verify, "evaluate", spy)
    monkeypatch.setattr(verify, "answer_items", answers_spy)
    summary = calibrate(model, processor, data, tmp_path / "s.yaml", grid={"alphas": [1.0]}, batch_size=4,
                        verify_top=2, max_new_tokens=2, budget_minutes=5.0, progress=False, full_stage=False)
    assert [s["name"] for s in summary["search"]["stages"]] == ["coarse", "refine"]
    assert plain_runs == [False, False] and len(summary["verified"]) == 2  # the timed first batch, then the rest
    assert seen[0] is not None and seen[0] == seen[1]
    assert summary["verified"][0]["plain"] == summary["verified"][1]["plain"]
    assert summary["budget"]["plain_seconds"] > 0 and summary["skipped"] == []


class FakeClock:
    """perf_counter for a calibration whose costly steps take known times: only they advance the clock."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("budget_minutes", [4.0, 9.0])
def test_budget_is_a_hard_bound_with_verification_and_names_what_it_cut(setup, tmp_path, monkeypatch, budget_minutes):
    """--budget-minutes bounds the whole run within 10%: plain answers 20 s, each setting scored 10 s, each
    capture 5 s, each verification (factor x plain) timed; what the budget cut is named in the summary and the
    preset description, and the description claims only the kinds that were scored."""
    import time as time_module

    from backpatch.calibrate import calibrate, run_search, verify
    from backpatch.calibrate.budget import verification_factor
    from backpatch.calibrate.sweep import Scorer

    _, data, model, processor = setup
    clock = FakeClock()
    monkeypatch.setattr(time_module, "perf_counter", clock)
    real_score, real_answers, real_evaluate = Scorer.score, verify.answer_items, verify.evaluate
    real_prepare = run_search.prepare_batches
    verified = []

    def score(self, candidate, batches):
        clock.now += 10.0
        return real_score(self, candidate, batches)

    def answers(wrapped, processor, items, *args, **kwargs):
        clock.now += 1.25 * len(items)  # 20 s for the 16 items
        return real_answers(wrapped, processor, items, *args, **kwargs)

    def evaluate(wrapped, *args, **kwargs):
        from backpatch.calibrate.grid import Candidate

        patch = wrapped.preset.patches[0] if wrapped.preset.patches else None
        setting = Setting(patch.source, patch.target, patch.scale, patch.mode, patch.positions) if patch else None
        alpha = wrapped.preset.contrastive.alpha if wrapped.preset.contrastive else 0.0
        clock.now += 20.0 * verification_factor(Candidate(setting, alpha, wrapped.preset.gate))
        verified.append(wrapped.preset)
        return real_evaluate(wrapped, *args, **kwargs)

    def prepare(*args, **kwargs):
        clock.now += 5.0
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(Scorer, "score", score)
    monkeypatch.setattr(verify, "answer_items", answers)
    monkeypatch.setattr(verify, "evaluate", evaluate)
    monkeypatch.setattr(run_search, "prepare_batches", prepare)
    started = clock.now
    summary = calibrate(model, processor, data, tmp_path / "b.yaml", grid={"alphas": [1.0]}, batch_size=4,
                        verify_top=3, max_new_tokens=2, budget_minutes=budget_minutes, progress=False)
    elapsed = clock.now - started
    assert elapsed <= 1.1 * budget_minutes * 60, elapsed
    assert summary["total_seconds"] == pytest.approx(elapsed, abs=0.1)
    stages = summary["search"]["stages"]
    assert stages[0]["truncated"] > 0 and isinstance(stages[0]["truncated"], int)
    total = stages[0]["n_settings"] + stages[0]["truncated"]
    assert any(f"{stages[0]['truncated']} of {total} settings of the coarse stage" in s for s in summary["skipped"])
    preset = backpatch.Preset.from_yaml(tmp_path / "b.yaml")
    assert "cut short by the budget" in preset.description and summary["searched"] in preset.description
    assert isinstance(preset.calibration.metrics["n_conflict"], int)
    assert 1 <= len(verified) <= 3 and len(summary["verified"]) == len(verified)
    if not any(s["name"] == "full" for s in stages):
        assert any(s.startswith("the full stage") for s in summary["skipped"])
    if len(verified) < 3:
        assert any("generate() verification" in s for s in summary["skipped"])
    if "contrastive decoding" not in summary["searched"]:
        assert "contrastive decoding (the budget ran out before it)" in summary["skipped"]


def test_refine_order_groups_settings_by_priority_not_by_name():
    """A budget cut must drop the least promising refine candidates: groups keep the order of their first
    candidate, and one setting's alphas and gates stay together (they share its patched logits)."""
    from backpatch.calibrate import Candidate
    from backpatch.calibrate.search import by_priority

    late, early = Setting(28, 15, 0.1, "add", "audio"), Setting(10, 9, 1.0, "replace", "last")
    gate = backpatch.Gate("audio_gap", 0.2, 0.2)
    listed = [Candidate(None, 2.0), Candidate(late), Candidate(early), Candidate(late, 1.0), Candidate(None, 2.0, gate),
              Candidate(early, 0.0, gate)]
    assert by_priority(listed) == [Candidate(None, 2.0), Candidate(None, 2.0, gate), Candidate(late),
                                   Candidate(late, 1.0), Candidate(early), Candidate(early, 0.0, gate)]


def test_resume_reuses_what_an_earlier_run_scored_and_refuses_another_run(setup, tmp_path, monkeypatch):
    """A search cut short goes on where it stopped: settings in the earlier sweep JSON are not scored again, the
    rest are; a sweep of other data, seed or batch size is refused with the flag to fix."""
    from backpatch.calibrate import calibrate
    from backpatch.calibrate.sweep import Scorer

    _, data, model, processor = setup
    kwargs = dict(grid={"alphas": [1.0]}, verify_top=1, max_new_tokens=2, budget_minutes=5.0, progress=False)
    first = calibrate(model, processor, data, tmp_path / "a.yaml", batch_size=4, **kwargs)
    sweep = json.loads((tmp_path / "a.sweep.json").read_text())
    coarse = [row for row in sweep["sweep"] if row["stage"] == "coarse"]
    dropped = coarse[::2]  # as if the budget had cut these
    sweep["sweep"] = [row for row in sweep["sweep"] if row not in dropped]
    (tmp_path / "cut.sweep.json").write_text(json.dumps(sweep))
    scored = []
    real = Scorer.score

    def counting(self, candidate, batches):
        scored.append(candidate.label())
        return real(self, candidate, batches)

    monkeypatch.setattr(Scorer, "score", counting)
    second = calibrate(model, processor, data, tmp_path / "b.yaml", batch_size=4, resume=tmp_path / "cut.sweep.json",
                       **kwargs)
    coarse_stage = second["search"]["stages"][0]
    assert coarse_stage["reused"] == len(coarse) - len(dropped)
    assert sorted(scored[: len(dropped)]) == sorted(row["setting"] for row in dropped)
    assert second["chosen"] == first["chosen"] and second["search"]["resumed_from"] == str(tmp_path / "cut.sweep.json")
    with pytest.raises(ValueError, match=r"seed 0 there, 1 here.*same --data, --stress-data, --seed"):
        calibrate(model, processor, data, tmp_path / "c.yaml", batch_size=4, seed=1, resume=tmp_path / "a.sweep.json",
                  **kwargs)
    sweep["search"]["stages"][0]["n_items"] += 1  # as a run with another batch size would have recorded
    (tmp_path / "other.sweep.json").write_text(json.dumps(sweep))
    with pytest.raises(ValueError, match=r"coarse stage scored \d+ items, this one would score .*--batch-size"):
        calibrate(model, processor, data, tmp_path / "c.yaml", batch_size=4, resume=tmp_path / "other.sweep.json",
                  **kwargs)
    with pytest.raises(ValueError, match=r"not the .sweep.json of a staged"):
        (tmp_path / "x.json").write_text("{}")
        calibrate(model, processor, data, tmp_path / "c.yaml", batch_size=4, resume=tmp_path / "x.json", **kwargs)
    assert not (tmp_path / "c.yaml").exists()


def test_staged_search_scores_the_peer_blocks_and_their_scores_match_generate(setup, tmp_path):
    """Issue 20 point 4: the refine stage scores the attention and steering grids (same harm rule); a block
    candidate's first-token answers are those of generate() with its preset; --no-blocks leaves them out."""
    from backpatch.calibrate import Candidate, Scorer, calibrate
    from backpatch.calibrate.writing import candidate_preset

    _, data, model, processor = setup
    summary = calibrate(model, processor, data, tmp_path / "b.yaml", grid={"alphas": [1.0]}, batch_size=4,
                        verify_top=1, max_new_tokens=2, budget_minutes=5.0, progress=False, gates=False)
    refine = [row for row in summary["sweep"] if row["stage"] == "refine"]
    assert any("attention" in row.get("blocks", {}) for row in refine)
    assert any("steering" in row.get("blocks", {}) for row in refine)
    assert "attention to audio" in summary["searched"] and "audio-silence steering" in summary["searched"]
    assert all("harm" in row for row in refine)
    combined = [row for row in refine if row.get("blocks") and (row["patch"] or row["alpha"])]
    assert combined and "the blocks combined with the other methods" in summary["searched"]
    items = load_conflict_set(data)
    base = backpatch.wrap(model, backpatch.Preset(patches=[backpatch.Patch(1, 0)]), processor=processor)
    batches, _ = prepare_batches(base, processor, items, {"sources": [1], "positions": ["audio"]}, batch_size=4,
                          progress=False, null=("zeros", None))
    scorer = Scorer(model, processor, base.preset, "zeros", None, candidate_preset)
    for candidate in (Candidate.of(attention=backpatch.Attention([1, 3], 1.0, "add")),
                      Candidate.of(steering=backpatch.Steering([1, 3], 50.0))):
        got = scorer.score(candidate, batches)["verdicts"]
        preset = candidate_preset(base.preset, candidate, "zeros")
        assert got == _generate_verdicts(model, processor, preset, batches, items)
    plain = calibrate(model, processor, data, tmp_path / "n.yaml", grid={"alphas": []}, batch_size=4, verify_top=1,
                      max_new_tokens=2, budget_minutes=5.0, progress=False, gates=False, blocks=False)
    assert not any(row.get("blocks") for row in plain["sweep"])


def test_a_full_stage_cut_by_the_budget_does_not_choose_among_the_few_it_reached():
    from backpatch.calibrate.run import selection_stage
    from backpatch.calibrate.search import StageRecord

    refine = StageRecord("refine", 30, {}, results=[("a", {}), ("b", {})])
    full = StageRecord("full", 100, {}, results=[("b", {})], truncated=5)
    assert selection_stage([StageRecord("coarse", 10, {}), refine, full]) is refine
    full.truncated = 0
    assert selection_stage([refine, full]) is full
    assert selection_stage([refine, StageRecord("full", 100, {})]) is refine
    assert selection_stage([StageRecord("coarse", 10, {})]) is None


def test_a_gated_patchless_base_preset_only_contributes_its_facts(setup, tmp_path):
    """Calibrating a model whose preset is gated contrastive decoding without patches (the shipped smol-whisper
    preset) starts from its facts: the gate without the rows it reads must not break the run."""
    from backpatch.calibrate import calibrate

    _, data, model, processor = setup
    gated = backpatch.Preset(name="gated", contrastive=backpatch.Contrastive(alpha=2.0, null_audio="zeros"),
                             gate=backpatch.Gate("audio_gap", 0.1, 0.3))
    summary = calibrate(model, processor, data, tmp_path / "g.yaml", base_preset=gated, grid={"alphas": [1.0]},
                        batch_size=4, verify_top=1, max_new_tokens=2, budget_minutes=5.0, progress=False,
                        gates=False, blocks=False)
    assert backpatch.Preset.from_yaml(tmp_path / "g.yaml").name == "g" and summary["n_settings"] > 0


def test_the_search_scores_the_best_blocks_on_top_of_the_best_other_methods(tmp_path):
    """Issue 20 point 4 ("the best combination"): after stage 2, the best no-harm attention and steering settings
    are scored with the best ungated back-patching and contrastive settings and with each other; a harmful block
    is never the one combined; with blocks=False nothing of the kind is scored."""
    from backpatch.calibrate.grid import Candidate
    from backpatch.calibrate.search import staged_search
    from backpatch.calibrate.writing import candidate_preset

    def score(c: Candidate) -> dict:
        attention, steering = c.block("attention"), c.block("steering")
        harmful = steering is not None and steering.beta >= 8 or c.gate is not None
        tdr = 0.8 - 0.1 * (c.setting is not None) - 0.1 * bool(c.alpha) - 0.05 * (attention is not None) \
            - 0.02 * (steering.beta if steering is not None else 0) - 0.001 * (c.setting.scale if c.setting else 0)
        return {"tdr": round(tdr, 4), "audio_only_acc": 0.5 if harmful else 0.9, "consistent_acc": 1.0}

    plain = {"tdr": 0.8, "audio_only_acc": 0.9, "consistent_acc": 1.0}
    scorers = [(score, plain, 10, ()), (score, plain, 30, ())]

    def run(blocks: bool) -> list[Candidate]:
        records = staged_search(12, scorers, full_stage=None, alphas=[1.0, 2.0], budget_s=1e6, gates=True,
                                full=False, progress=False, blocks=blocks)
        return [c for c, _ in records[1].results]

    refine = run(blocks=True)
    # issue 28 point 1: every contrastive candidate is also tried under each plausibility guard, gated or not
    from backpatch.calibrate.grid import AGREEMENT_GRID, PLAUSIBILITY_GRID

    guarded = {(c.setting, c.alpha, c.plausibility) for c in refine if c.alpha and c.gate is None}
    assert all((s, a, p) in guarded for s, a, _ in guarded for p in PLAUSIBILITY_GRID)
    assert any(c.plausibility is not None and c.gate is not None for c in refine)
    # and under each agreement guard
    agreeing = {(c.setting, c.alpha, c.agreement) for c in refine if c.alpha and c.gate is None}
    assert all((s, a, g) in agreeing for s, a, _ in agreeing for g in AGREEMENT_GRID)
    assert any(c.agreement is not None and c.gate is not None for c in refine)
    alone = [c for c in refine if c.has_blocks and c.setting is None and not c.alpha]
    combined = [c for c in refine if c.has_blocks and c not in alone or len(c.blocks) > 1]
    best_attention = min((c for c in alone if c.block("attention") is not None), key=lambda c: score(c)["tdr"])
    best_steering = min((c for c in alone if c.block("steering") is not None and c.block("steering").beta < 8),
                        key=lambda c: score(c)["tdr"])
    assert best_steering.block("steering").beta == 4.0  # beta 8 cuts more but harms: not the one combined
    plain_methods = [c for c in refine if not c.has_blocks and c.gate is None]
    best_patch = min((c for c in plain_methods if not c.alpha), key=lambda c: score(c)["tdr"])
    best_alpha = min((c for c in plain_methods if c.alpha), key=lambda c: score(c)["tdr"])
    assert best_alpha.setting is not None and best_alpha.alpha
    expected = {base.with_blocks(attention=best_attention.block("attention")) for base in (best_patch, best_alpha)}
    expected |= {base.with_blocks(steering=best_steering.block("steering")) for base in (best_patch, best_alpha)}
    expected.add(Candidate.of(attention=best_attention.block("attention"), steering=best_steering.block("steering")))
    assert set(combined) == expected and len(combined) == 5
    for candidate in combined:  # each one is a preset the engine takes (steering rides the contrastive rows)
        preset = candidate_preset(backpatch.Preset(patches=[backpatch.Patch(11, 0)]), candidate, "zeros")
        assert preset.contrastive is not None or candidate.block("steering") is None
    assert not any(c.has_blocks for c in run(blocks=False))


@pytest.mark.parametrize("name", ["gemma3n", "gemma4"])
def test_the_short_path_is_taken_and_exact_on_gemma(name):
    """Gemma 3n's layers carry AltUp streams that its text model combines after the last layer, and both Gemmas
    soft-cap their logits: the short path applies both (the architecture table's final combine, the one readout),
    so the scorer takes it and it equals the engine on the stored states."""
    import families

    from backpatch.calibrate import Candidate, Scorer
    from backpatch.calibrate.sweep import capture_batch
    from backpatch.calibrate.writing import candidate_preset

    fam = getattr(families, name)()
    # the last position: in these tiny Gemmas the layers after 1 reuse earlier layers' KV (shared KV), so a patch at
    # the audio positions alone could not reach the answer
    setting = Setting(3, 1, 0.7, "add", "last")
    base = backpatch.Preset(patches=[setting.patch()])
    resolved = backpatch.wrap(fam.model, base).resolved
    batch = capture_batch(resolved, fam.batch, [3], {"last"}, layer_states=True)
    scorer = Scorer(fam.model, None, base, "zeros", None, candidate_preset)
    assert scorer._short_path_usable(Candidate(setting), batch)  # its own check: within SHORT_PATH_ATOL
    with torch.no_grad():
        short = scorer._short_logits(resolved, resolved.setting("patches")[0], batch)
        with generation_session(resolved, precaptured=batch.states):
            full = fam.model(**fam.batch, use_cache=False).logits[:, -1]
        plain = fam.model(**fam.batch, use_cache=False).logits[:, -1]
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full, plain, atol=1e-4)  # the patch changes the logits: the equality says something


def test_the_block_grid_is_read_from_the_methods_calibration_grids():
    """Each method owns its search space (Method.calibration_grid); the refine stage's block candidates are the
    registry's, in registry order: MATA's six (form, alpha) on the middle third, steering's five betas on two ranges."""
    from backpatch.calibrate.grid import block_grid

    grid = block_grid(30)
    attention = [c.block("attention") for c in grid if c.block("attention") is not None]
    steering = [c.block("steering") for c in grid if c.block("steering") is not None]
    assert len(grid) == 16 and grid[:6] == [Candidate.of(attention=a) for a in attention]
    assert {(a.form, a.alpha) for a in attention} == {("scale", 0.1), ("scale", 0.3), ("scale", 1.0), ("add", 0.5),
                                                      ("add", 1.0), ("add", 2.0)}
    assert {tuple(a.layers) for a in attention} == {(10, 20)}
    assert {(tuple(s.layers), s.beta) for s in steering} == {(layers, beta) for layers in ((10, 20), (15, 29))
                                                             for beta in (0.5, 1.0, 2.0, 4.0, 8.0)}


def test_a_registered_methods_grid_is_searched_and_its_scores_match_generate(setup):
    """Issue 26: calibration reads a plugin's grid from the registry like the built-ins': its candidates are in the
    refine stage's block grid, scored through the engine exactly as generate() answers with their preset, and their
    sweep rows read back as the same candidates."""
    from test_plugin_method import ScaleAudio, ScaleAudioMethod

    from backpatch.calibrate import Candidate, Scorer
    from backpatch.calibrate.grid import block_grid
    from backpatch.calibrate.report import _row
    from backpatch.calibrate.resume import candidate_of_row
    from backpatch.calibrate.writing import candidate_preset

    class Searched(ScaleAudioMethod):
        def calibration_grid(self, num_layers):
            return [ScaleAudio(layer=num_layers - 2, factor=f) for f in (0.0, 4.0)]

    _, data, model, processor = setup
    backpatch.register_method(Searched())
    try:
        grid = block_grid(30)
        mine = [c for c in grid if c.block("scale_audio") is not None]
        assert len(grid) == 18 and mine == [Candidate.of(scale_audio=ScaleAudio(28, f)) for f in (0.0, 4.0)]
        items = load_conflict_set(data)
        base = backpatch.wrap(model, backpatch.Preset(patches=[backpatch.Patch(1, 0)]), processor=processor)
        batches, _ = prepare_batches(base, processor, items, {"sources": [1], "positions": ["audio"]}, batch_size=4,
                                     progress=False, null=("zeros", None))
        scorer = Scorer(model, processor, base.preset, "zeros", None, candidate_preset)
        candidate = Candidate.of(scale_audio=ScaleAudio(layer=-2, factor=0.0))
        preset = candidate_preset(base.preset, candidate, "zeros")
        assert preset.patches == [] and preset.section("scale_audio") == ScaleAudio(-2, 0.0)
        assert scorer.score(candidate, batches)["verdicts"] == _generate_verdicts(model, processor, preset, batches,
                                                                                   items)
        row = _row(candidate, {"tdr": 0.1, "afr": 0.0, "other_rate": 0.0, "audio_only_acc": 1.0,
                               "consistent_acc": 1.0}, {"tdr": 0.1, "audio_only_acc": 1.0, "consistent_acc": 1.0},
                   0.02, bounded=False)
        assert row["blocks"] == {"scale_audio": {"layer": -2, "factor": 0.0}}
        assert candidate_of_row(row) == candidate and "audio x0" in row["setting"]
    finally:
        backpatch.unregister_method("scale_audio")


def _generate_verdicts(model, processor, preset, batches, items) -> list[str]:
    """What generate() with ``preset`` answers first on each batch, judged: the reference a scorer must equal."""
    from backpatch.evaluate import judge
    from backpatch.inputs import decode_new_tokens

    wrapped = backpatch.wrap(model, preset, processor=processor)
    answers = []
    for batch in batches:
        with torch.no_grad():
            out = wrapped.generate(**batch.inputs, max_new_tokens=1, do_sample=False)
        answers += decode_new_tokens(processor, out, batch.inputs["input_ids"].shape[1])
    return [judge(a, it) for a, it in zip(answers, items, strict=True)]


def test_portable_names_keep_paths_under_the_working_directory_relative_and_others_by_their_tail(tmp_path):
    from backpatch.calibrate.provenance import portable_command, portable_name

    inside = tmp_path / "work" / "data" / "val.jsonl"
    inside.parent.mkdir(parents=True)
    inside.write_text("{}\n")
    assert portable_name(inside, cwd=tmp_path / "work") == "data/val.jsonl"
    assert portable_name(inside, cwd=tmp_path / "elsewhere") == "work/data/val.jsonl"
    command = portable_command(["backpatch", "calibrate", "--data", str(inside), f"--out={inside}", "--seed", "3",
                                "/no/such/file"], cwd=tmp_path / "work")
    assert command == "backpatch calibrate --data data/val.jsonl --out=data/val.jsonl --seed 3 no/such/file"


def test_leave_one_family_out_says_whether_the_rule_predicts_harm_on_a_family_it_did_not_check():
    """Issue 28 point 2: per family F, choose with the per-family rule on everything but F, then measure on F.
    Built so that the strongest setting harms only the pitch family: chosen without pitch, it harms pitch; chosen
    without noise, the rule still sees pitch and picks the harmless one."""
    from backpatch.calibrate.holdout import leave_one_family_out
    from backpatch.calibrate.search import StageRecord
    from backpatch.evaluate import metrics
    from backpatch.items import ConflictItem

    items, plain = [], []
    for family in ("snr10", "pitch+200", None):
        for k in range(40):
            kind = ("conflict", "consistent", "audio_only")[k % 3]
            items.append(ConflictItem(f"{family}-{k}", None, "p", "seven", None if kind == "audio_only" else "three",
                                      kind, perturbation=family))
            plain.append("text" if kind == "conflict" else "audio")

    def verdicts(cut: float, harms_pitch: bool) -> list[str]:
        out = []
        for i, (it, p) in enumerate(zip(items, plain, strict=True)):
            if it.kind == "conflict":
                out.append("audio" if (i * 37 % 100) / 100 < cut else "text")  # a fixed share of conflicts flips
            elif harms_pitch and it.perturbation == "pitch+200":
                out.append("other")
            else:
                out.append(p)
        return out

    strong, gentle = Candidate(Setting(5, 1, 1.0, "add", "audio")), Candidate(Setting(4, 1, 0.5, "add", "audio"))
    rows = [(strong, verdicts(0.8, True)), (gentle, verdicts(0.3, False))]
    record = StageRecord("full", len(items), {**metrics(items, plain), "verdicts": plain},
                         results=[(c, {**metrics(items, v), "verdicts": v}) for c, v in rows], items=items,
                         bounded=True)
    report = leave_one_family_out(record, max_harm=0.02)
    assert report["n_families"] == 2 and set(report["families"]) == {"noise", "pitch"}
    pitch, noise = report["families"]["pitch"], report["families"]["noise"]
    assert pitch["chosen"] == strong.label() and pitch["chosen_harmed"] and pitch["chosen_harm"] > 0.5
    assert pitch["passed_without_it"] == 2 and pitch["of_those_harmful_on_it"] == 1
    assert noise["chosen"] == gentle.label() and not noise["chosen_harmed"] and noise["passed_without_it"] == 1
    assert report["chosen_harmed_held_out"] == 1 and report["passing_harmful_rate"] == round(1 / 3, 4)
    assert report["harm_statistic"] == "upper"
    # a screening stage chose by point loss: the estimate chooses and measures by point loss too (here the strong
    # setting harms half of the pitch controls, so its loss and its bound differ)
    from dataclasses import replace

    partial = [("other" if it.perturbation == "pitch+200" and it.kind != "conflict" and i % 2 == 0 else v)
               for i, (it, v) in enumerate(zip(items, verdicts(0.8, False), strict=True))]
    screening = replace(record, bounded=False, results=[(strong, {**metrics(items, partial), "verdicts": partial}),
                                                        rows_gentle := record.results[1]])
    by_loss, by_bound = (leave_one_family_out(replace(screening, bounded=b), max_harm=0.02) for b in (False, True))
    assert by_loss["harm_statistic"] == "loss" and by_bound["harm_statistic"] == "upper"
    pitch_controls = [i for i, it in enumerate(items) if it.perturbation == "pitch+200" and it.kind != "conflict"]
    lost = max(sum(partial[i] == "other" for i in pitch_controls if items[i].kind == kind)
               / sum(items[i].kind == kind for i in pitch_controls) for kind in ("consistent", "audio_only"))
    assert by_loss["families"]["pitch"]["chosen"] == strong.label() != rows_gentle[0].label()
    assert by_loss["families"]["pitch"]["chosen_harm"] == pytest.approx(lost, abs=1e-4)  # rounded to 4 places
    assert by_bound["families"]["pitch"]["chosen_harm"] > lost
    # the per-family rule itself: a family's bound fails a setting whose pooled splits pass
    from backpatch.calibrate.search import passes_no_harm

    fine = {"upper": 0.0, "loss": 0.0}
    pooled = {"harm": {"clean": {"consistent": fine}, "perturbed": {"consistent": fine}}}
    assert passes_no_harm({"paired": pooled}, record.plain, 0.02, bounded=True)
    one_family = {**pooled, "harm_by_family": {"noise": {"consistent": fine},
                                               "pitch": {"consistent": {"upper": 0.3, "loss": 0.1}}}}
    assert not passes_no_harm({"paired": one_family}, record.plain, 0.02, bounded=True)


def test_a_verified_finalist_must_not_lose_more_than_the_bound_on_any_perturbation_family():
    """The verification rule (issue 28): the pooled bound is not enough; one family's point loss above max_harm
    refuses the setting, named with its kind and loss; a family's wide bound with no loss does not."""
    from backpatch.calibrate.search import family_losses, verification_failures, verified_no_harm

    def bound(lost, gained, n, upper):
        return {"n": n, "lost": lost, "gained": gained, "loss": (lost - gained) / n, "upper": upper}

    paired = {"harm": {"clean": {"audio_only": bound(0, 0, 240, 0.0)}}, "harm_upper": 0.016,
              "harm_by_family": {"clean": {"audio_only": bound(1, 0, 240, 0.0042)},
                                 "band": {"audio_only": bound(1, 1, 36, 0.0527)},
                                 "pitch": {"consistent": bound(0, 0, 52, 0.0)}}}
    assert family_losses(paired) == [] and verified_no_harm(paired)
    paired["harm_by_family"]["reverb"] = {"audio_only": bound(1, 0, 25, 0.04)}
    paired["harm_by_family"]["noise"] = {"consistent": bound(2, 0, 65, 0.0308)}
    assert family_losses(paired) == ["reverb audio-only 0.04", "noise consistent 0.0308"]
    assert not verified_no_harm(paired) and verified_no_harm(paired, max_harm=0.05)
    assert not verified_no_harm({**paired, "harm_by_family": {}, "harm_upper": 0.03,
                                 "harm": {"perturbed": {"consistent": bound(2, 0, 240, 0.03)}}})
    assert verification_failures({**paired, "harm": {"perturbed": {"consistent": bound(2, 0, 240, 0.03)}}}) == [
        "perturbed consistent bound 0.03", "reverb audio-only 0.04", "noise consistent 0.0308"]


@pytest.mark.parametrize("candidate,key,label,contrastive", [
    (Candidate.of(Setting(5, 1, 1.0, "add", "audio"), 2.0, backpatch.Gate("audio_gap", 0.1, 0.3), 0.3),
     "plausibility", "contrastive a=2 plausibility 0.3",
     backpatch.Contrastive(alpha=2.0, null_audio="silence", plausibility=0.3)),
    (Candidate.of(None, 1.0, backpatch.Gate("audio_gap", 0.2, 0.4), agreement=0.3),
     "agreement", "contrastive a=1 agreement 0.3",
     backpatch.Contrastive(alpha=1.0, null_audio="silence", agreement=0.3)),
])
def test_a_guarded_candidate_reads_back_from_its_sweep_row_and_writes_its_guard(candidate, key, label, contrastive):
    from backpatch.calibrate.report import _row
    from backpatch.calibrate.resume import candidate_of_row
    from backpatch.calibrate.writing import candidate_preset

    m = {"tdr": 0.1, "afr": 0.0, "other_rate": 0.0, "audio_only_acc": 1.0, "consistent_acc": 1.0}
    row = _row(candidate, m, m, 0.02, bounded=False)
    assert row[key] == 0.3 and label in row["setting"]
    assert candidate_of_row(json.loads(json.dumps(row))) == candidate
    preset = candidate_preset(backpatch.Preset(patches=[backpatch.Patch(5, 1)]), candidate, "silence")
    assert preset.contrastive == contrastive
    assert f"{key} 0.3" in backpatch.preset.methods_details(preset)
