"""Cheap checks first, nonsense refused: argparse range checks, presets read before any model loads, calibration
that needs its own data and says when it is too small, and messages that cite only what the checkout has."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tiny import tiny_checkpoint, tiny_conflict_set

from backpatch import Patch, Preset
from backpatch.calibrate.run import conflict_count_warning, conflicts_for, tdr_standard_error
from backpatch.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model (or its processor) fails the test."""
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("backpatch.loading.load_model_and_processor", fail)
    monkeypatch.setattr("backpatch.preflight.processor_alone", fail, raising=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_conflict_set(tmp_path_factory.mktemp("cheap") / "data", 2)


# ----------------------------------------------------------------------------------- argparse ranges
@pytest.mark.parametrize(
    "argv,message",
    [
        (["eval", "--limit", "0"], "argument --limit: must be at least 1, got 0"),
        (["eval", "--limit", "-5"], "argument --limit: must be at least 1, got -5"),
        (["eval", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
        (["eval", "--limit", "two"], "argument --limit: 'two' is not a whole number"),
        (["eval", "--num-processes", "0"], "argument --num-processes: must be at least 1"),
        (["run", "--audio", "a.wav", "--prompt", "p", "--max-new-tokens", "0"], "argument --max-new-tokens: must be"),
        (["calibrate", "--out", "p.yaml", "--verify-top", "0"], "argument --verify-top: must be at least 1"),
        (["calibrate", "--out", "p.yaml", "--budget-minutes", "0"], "argument --budget-minutes: must be greater than"),
        (["calibrate", "--out", "p.yaml", "--budget-minutes", "nan"], "is not a finite number"),
        (["diagnose", "--out", "d", "--limit", "0"], "argument --limit: must be at least 1"),
        (["demo", "--port", "0"], "argument --port: must be a port between 1 and 65535, got 0"),
        (["demo", "--port", "70000"], "argument --port: must be a port between 1 and 65535"),
        (["conflicts", "--from", "x", "--out", "o.jsonl", "--question", "q", "--conflicts-per-clip", "0"],
         "argument --conflicts-per-clip: must be at least 1"),
        (["conflicts", "--from", "x", "--out", "o.jsonl", "--question", "q", "--consistent-share", "1.5"],
         "argument --consistent-share: must be between 0 and 1"),
    ],
)
def test_numbers_out_of_range_are_argparse_errors_with_exit_code_2(capsys, no_model, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_app_script_range_checks_its_port(capsys):
    import runpy
    import sys

    argv = sys.argv
    sys.argv = ["demo/app.py", "--port", "0"]
    try:
        with pytest.raises(SystemExit) as info:
            runpy.run_path(str(REPO / "demo" / "app.py"), run_name="__main__")
    finally:
        sys.argv = argv
    assert info.value.code == 2 and "must be a port between 1 and 65535" in capsys.readouterr().err


# ------------------------------------------------------------------------------ presets before models
@pytest.mark.parametrize("command", ["run", "eval", "calibrate", "diagnose", "demo"])
@pytest.mark.parametrize("kind", ["unknown_name", "invalid_yaml"])
def test_a_bad_preset_fails_before_any_model_loads(tmp_path, capsys, no_model, monkeypatch, data, command, kind):
    monkeypatch.setattr("backpatch.demo.launch", lambda *a, **k: (_ for _ in ()).throw(AssertionError("launched")))
    if kind == "unknown_name":
        preset, message = "no-such-preset", "no bundled preset named 'no-such-preset'"
    else:
        preset = tmp_path / "bad.yaml"
        preset.write_text("name: bad\npatches:\n  - source: 1\n    target: 0\n    mode: addd\n")
        preset, message = str(preset), "patches[0].mode"
    wav = tmp_path / "clip.wav"
    wav.write_bytes(b"")  # never read: the preset fails first
    rest = {"run": ["--audio", str(wav), "--prompt", "Which digit is spoken?"], "eval": ["--data", str(data)],
            "calibrate": ["--data", str(data), "--out", str(tmp_path / "c.yaml")],
            "diagnose": ["--data", str(data), "--out", str(tmp_path / "d")], "demo": []}[command]
    assert main([command, "--model", "organism:digits", "--preset", preset, *rest]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("backpatch: error: ") and message in err


def test_the_demo_reads_its_preset_before_loading_the_model(monkeypatch):
    pytest.importorskip("gradio")
    from backpatch import PresetError
    from backpatch.demo import launch

    monkeypatch.setattr("backpatch.loading.load_model_and_processor",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("the model was loaded")))
    with pytest.raises(PresetError, match="no bundled preset named 'nope'"):
        launch("organism:digits", "nope", port=7861)


# ------------------------------------------------------------------------------------ calibration data
def test_calibrate_without_data_names_the_fix(tmp_path, capsys, no_model):
    assert main(["calibrate", "--model", "organism:digits", "--out", str(tmp_path / "p.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("backpatch: error: calibrate needs --data VALIDATION.jsonl")
    assert "--split validation=0.5,test=0.5" in err and "test voices" in err
    assert not (tmp_path / "p.yaml").exists()


def test_small_conflict_count_warning_states_the_standard_error():
    assert tdr_standard_error(100) == pytest.approx(0.05) and conflicts_for() == 278
    assert tdr_standard_error(278) <= 0.03 < tdr_standard_error(277)
    text = conflict_count_warning(100, "the staged search", 10)
    assert text.startswith("only 100 conflict items for the staged search: a TDR measured on them has a standard "
                           "error of about 5.0 points (sqrt(p(1-p)/n) at p = 0.5)")
    assert "about 278 conflict items give ~3 points" in text and "its first stage sees 10 of them: 15.8 points" in text
    assert conflict_count_warning(278, "an exhaustive grid") is None


def test_calibrate_warns_about_few_conflicts_and_names_its_data_not_validation(tmp_path, capsys, caplog, data):
    tiny_checkpoint(tmp_path / "model")
    preset = tmp_path / "p.yaml"
    Preset(patches=[Patch(source=-1, target=0)], name="p").to_yaml(preset)
    out = tmp_path / "cal.yaml"
    with caplog.at_level("WARNING", logger="backpatch.calibrate.run"):
        assert main(["calibrate", "--model", str(tmp_path / "model"), "--data", str(data), "--out", str(out),
                     "--sources", "5", "--targets", "0", "--scales", "1", "--modes", "add", "--positions", "audio",
                     "--alphas", "", "--verify-top", "1", "--max-new-tokens", "1"]) == 0
    printed = capsys.readouterr().out
    assert "warning: only 4 conflict items for an exhaustive grid: a TDR measured on them has a standard error of " \
           "about 25.0 points" in printed
    assert any("only 4 conflict items" in r.getMessage() for r in caplog.records)
    sweep = json.loads(out.with_suffix(".sweep.json").read_text())
    assert sweep["n_conflict"] == 4 and sweep["tdr_standard_error"] == 0.25
    assert sweep["data_warning"].startswith("only 4 conflict items")
    description = Preset.from_yaml(out).description
    from backpatch.calibrate.provenance import portable_name

    # the data by a name that travels (not this machine's absolute path): issue 28 point 4
    assert "(validation)" not in description and f"(on {portable_name(data)})" in description
    assert str(Path(data).resolve()) not in description


def test_calibrate_on_the_organisms_test_voices_is_warned_about(caplog):
    from backpatch import organism
    from backpatch.calibrate.run import _warn_about_data

    with caplog.at_level("WARNING", logger="backpatch.calibrate.run"):
        _warn_about_data(organism.examples_path())
    assert "the organism's shipped examples, which are its test voices" in caplog.text


# ------------------------------------------------------------------------- references that exist here
def test_help_and_messages_cite_only_what_the_checkout_has(capsys):
    parser = build_parser()
    texts = [parser.format_help()]
    for action in parser._subparsers._group_actions:
        texts += [sub.format_help() for sub in action.choices.values()]
    assert not any("DESIGN" in text for text in texts)
    assert main(["eval", "--model", "some/hub-model"]) == 2  # no --data: the message says where the format is
    err = capsys.readouterr().err
    assert "DESIGN" not in err and 'see "Evaluation (`backpatch eval`)" in the README' in err
    headings = {line.lstrip("#").strip() for line in (REPO / "README.md").read_text().splitlines()
                if line.startswith("#")}
    sources = "\n".join(p.read_text() for p in (REPO / "backpatch").rglob("*.py"))
    cited = set(re.findall(r"""see ['"]([^'"]+)['"] in the README""", sources.replace('\\"', '"')))
    assert cited and cited <= headings, cited - headings
