"""The command line: `backpatch presets` and `backpatch run` on a tiny checkpoint saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import tiny_checkpoint, write_tone

import backpatch
from backpatch import Patch, Preset
from backpatch.audio_io import load_audio
from backpatch.cli import main
from backpatch.inputs import build_inputs, decode_new_tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    tiny_checkpoint(directory)
    audio = directory / "tone.wav"
    write_tone(audio, rate=22050)  # not the model's rate: the CLI must resample
    preset = directory / "p.yaml"
    Preset(patches=[Patch(source=-1, target=0, scale=3.0, positions="audio+last")], name="p").to_yaml(preset)
    return directory, audio, preset


def test_presets_lists_bundled_presets(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["name", "model_type", "layers", "methods", "calibration"]
    row = next(line for line in out if line.startswith("qwen2-audio-7b-instruct"))
    assert row.split()[1:3] == ["qwen2_audio", "32"] and row.split()[-1] == "uncalibrated"
    organism = next(line for line in out if line.startswith("organism-digits"))
    assert "11->0 replace x1 @last; contrastive alpha 2 (silence)" in organism and organism.endswith("calibrated")


def test_method_labels_name_the_attention_and_steering_blocks():
    from backpatch.preset import methods_details

    preset = backpatch.Preset(name="m", attention=backpatch.Attention([10, 20], 0.1, "add"),
                              steering=backpatch.Steering([4, 12], 1.5), contrastive=backpatch.Contrastive(alpha=0.0))
    assert methods_details(preset) == ("contrastive alpha 0 (silence); attention to audio 10..20 add alpha 0.1; "
                                       "steering 4..12 beta 1.5")
    assert backpatch.methods_label(preset) == "attention a=0.1 + steering b=1.5"  # alpha 0 rows only feed steering


def test_methods_label_names_what_a_preset_does():
    """Issue 25: a label names the methods a preset runs; one without patches is not "back-patched"."""
    label = backpatch.methods_label
    contrastive = backpatch.Contrastive(alpha=2.0)
    gate = backpatch.Gate("audio_gap", 0.1, 0.3)
    # (its contrastive block is at alpha 0: rows for the patch's agreement guard, which the patch's details name)
    assert label(backpatch.load_preset("smol-whisper")) == "back-patched 20->18"
    previous = Path(__file__).parents[1] / "docs" / "stress" / "smol-whisper-patch-agreement.yaml"
    assert label(backpatch.load_preset(previous)) == "back-patched 20->18 + contrastive a=3 + gate"
    assert label(Preset(name="c", contrastive=contrastive)) == "contrastive a=2"
    assert label(Preset(name="c0", contrastive=backpatch.Contrastive(alpha=0.0))) == "contrastive a=0"
    assert label(Preset(name="p", patches=[Patch(20, 18)])) == "back-patched 20->18"
    assert label(Preset(name="pg", patches=[Patch(20, 18)], contrastive=backpatch.Contrastive(alpha=0.0),
                        gate=gate)) == "back-patched 20->18 + gate"
    assert label(Preset(name="pp", patches=[Patch(20, 18), Patch(26, 10)], contrastive=contrastive)) == \
        "back-patched (2 patches) + contrastive a=2"
    assert label(backpatch.load_preset("organism-digits")) == "back-patched 11->0 + contrastive a=2"


def test_run_prints_plain_and_backpatched_answers(checkpoint, capsys):
    directory, audio, preset = checkpoint
    code = main(["run", "--model", str(directory), "--preset", str(preset), "--audio", str(audio),
                 "--prompt", 'The speaker says "three". Which digit is spoken?', "--max-new-tokens", "3"])
    assert code == 0
    out = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    # the CLI's answers must be what the library gives for the same inputs
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    model = Qwen2AudioForConditionalGeneration.from_pretrained(directory).eval()
    processor = AutoProcessor.from_pretrained(directory)
    inputs = build_inputs(processor, [load_audio(audio, 16000)],
                          ['The speaker says "three". Which digit is spoken?'])
    wrapped = backpatch.wrap(model, str(preset))
    with torch.no_grad():
        patched = wrapped.generate(**inputs, max_new_tokens=3, do_sample=False)
        plain = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    n = inputs["input_ids"].shape[1]
    assert out["plain"].strip() == decode_new_tokens(processor, plain, n)[0]
    # the second answer is labelled with what the preset does
    assert out["back-patched -1->0"].strip().removesuffix("(same)").strip() == decode_new_tokens(processor, patched,
                                                                                                  n)[0]
    assert out["preset"].strip() == "p [-1->0 add x3 @audio+last]"


def test_run_labels_a_preset_without_patches_by_its_methods(checkpoint, tmp_path, capsys):
    """Issue 25: a contrastive, gated preset (like smol-whisper's) is not called back-patched."""
    directory, audio, _ = checkpoint
    preset = tmp_path / "c.yaml"
    Preset(name="c", contrastive=backpatch.Contrastive(alpha=2.0),
           gate=backpatch.Gate("audio_gap", 0.1, 0.3)).to_yaml(preset)
    assert main(["run", "--model", str(directory), "--preset", str(preset), "--audio", str(audio),
                 "--prompt", "Which digit is spoken?", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    lines = dict(line.split(":", 1) for line in out.splitlines())
    assert "contrastive a=2 + gate" in lines and "back-patched" not in out and "backpatched" not in out
    assert lines["preset"].strip() == "c [contrastive alpha 2 (silence); gate audio_gap 0.1..0.3]"


def test_answer_lines_align_the_two_answers():
    from backpatch.cli.run_eval import _answer_lines

    plain, other = _answer_lines("contrastive a=2 + gate", "three", "seven")
    assert plain.index("three") == other.index("seven") and other.startswith("contrastive a=2 + gate: ")
    assert _answer_lines("x", "a", "a")[1] == "x:            a   (same)"


def _subparsers(parser):
    """Every subcommand parser under ``parser``, nested ones (organism build) included, with its command path."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for nested, deeper in _subparsers(sub):
                    yield f"{name} {nested}", deeper


def test_every_subcommand_help_page_says_what_it_does():
    from backpatch.cli import build_parser

    found = dict(_subparsers(build_parser()))
    assert {"presets", "run", "eval", "calibrate", "demo", "serve", "diagnose", "conflicts", "organism",
            "organism build"} <= set(found)
    for name, sub in found.items():
        assert sub.description and sub.description.endswith("."), name
        assert " ".join(sub.description.split()) in " ".join(sub.format_help().split()), name  # on its -h page
    # no help text calls the preset's column back-patched: the default preset does no back-patching
    for name in ("run", "eval", "demo", "serve"):
        assert "back-patched" not in found[name].description, name


def _option_help(parser, option):
    return next(a.help for a in parser._actions if option in a.option_strings)


def test_option_help_strings_say_what_budget_and_batch_size_bound():
    from backpatch.cli import build_parser

    found = dict(_subparsers(build_parser()))
    budget = _option_help(found["calibrate"], "--budget-minutes")
    assert "whole run" in budget and "verification included" in budget
    for name in ("eval", "calibrate", "diagnose"):
        assert _option_help(found[name], "--batch-size"), name


@pytest.mark.parametrize(
    "change,message",
    [
        (("--audio", "{dir}/missing.wav"), "audio file not found"),
        (("--audio", "{dir}/p.yaml"), "cannot read"),
        (("--preset", "no-such-preset"), "no bundled preset named 'no-such-preset'"),
        (("--prompt", "  "), "the prompt is empty"),
        (("--model", "/nonexistent/model"), "/nonexistent/model"),
    ],
)
def test_run_user_mistakes_are_one_sentence_and_exit_2(checkpoint, capsys, change, message):
    directory, audio, preset = checkpoint
    args = {"--model": str(directory), "--preset": str(preset), "--audio": str(audio), "--prompt": "Which digit?"}
    args[change[0]] = change[1].format(dir=directory)
    assert main(["run", *[x for kv in args.items() for x in kv], "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: transformers' loading progress bar
    assert err.startswith("backpatch: error: ")
    assert message in err


def test_run_preset_that_does_not_fit_the_model(checkpoint, capsys):
    directory, audio, _ = checkpoint
    bad = directory / "bad.yaml"
    Preset(patches=[Patch(source=30, target=1)], name="bad").to_yaml(bad)
    assert main(["run", "--model", str(directory), "--preset", str(bad), "--audio", str(audio),
                 "--prompt", "Which digit is spoken?"]) == 2
    assert "out of range for this model, which has 6 decoder layers" in capsys.readouterr().err


def test_run_with_dtype_and_device_map(checkpoint, capsys):
    directory, audio, preset = checkpoint
    code = main(["run", "--model", str(directory), "--preset", str(preset), "--audio", str(audio), "--prompt",
                 "Which digit is spoken?", "--dtype", "bfloat16", "--device-map", "cpu", "--max-new-tokens", "2"])
    assert code == 0
    assert "back-patched -1->0:" in capsys.readouterr().out


def test_load_model_and_processor_honours_dtype_and_device_map(checkpoint):
    import torch

    from backpatch.loading import load_model_and_processor

    directory, _, _ = checkpoint
    model, processor = load_model_and_processor(str(directory), dtype="float16", device_map="auto")
    assert model.dtype == torch.float16 and model.device.type == "cpu"
    assert type(model).__name__ == "Qwen2AudioForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2AudioProcessor"
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        load_model_and_processor(str(directory), dtype="int3")


def test_demo_subcommand_calls_launch(monkeypatch):
    calls = []
    monkeypatch.setattr("backpatch.demo.launch", lambda *a, **k: calls.append((a, k)))
    assert main(["demo", "--port", "7999"]) == 0
    assert calls[0][0] == (None, None) and calls[0][1]["port"] == 7999 and calls[0][1]["host"] == "127.0.0.1"


def test_diagnose_subcommand_writes_the_report(checkpoint, tmp_path, capsys):
    from tiny import tiny_conflict_set

    directory, _, preset = checkpoint
    data = tiny_conflict_set(tmp_path / "data", 4)
    out = tmp_path / "diag"
    assert main(["diagnose", "--model", str(directory), "--preset", str(preset), "--data", str(data),
                 "--out", str(out), "--no-sweep", "--batch-size", "8"]) == 0
    import json

    report = json.loads((out / "report.json").read_text())
    assert len(report["layers"]) == 6 and (out / "report.md").is_file()
    assert "wrote" in capsys.readouterr().out
    assert main(["diagnose", "--model", str(directory), "--data", str(tmp_path / "none.jsonl"),
                 "--out", str(out)]) == 2


def test_presets_line_names_the_gate():
    from backpatch.preset import methods_details

    preset = backpatch.Preset(patches=[backpatch.Patch(5, 2, 0.1)], contrastive=backpatch.Contrastive(alpha=0.0),
                              gate=backpatch.Gate("audio_gap", 0.2, 0.2))
    assert methods_details(preset) == "5->2 add x0.1 @audio; contrastive alpha 0 (silence); gate audio_gap >= 0.2"
    ramp = backpatch.Preset(patches=[backpatch.Patch(5, 2)], gate=backpatch.Gate("certainty", 0.3, 0.7))
    assert methods_details(ramp).endswith("; gate certainty 0.3..0.7")
