"""Evaluation: judging answers, metrics with intervals, conflict-set checks, and `backpatch eval` mechanics."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny import tiny_checkpoint, tiny_conflict_set

import backpatch
from backpatch import Patch, Preset
from backpatch.cli import main
from backpatch.evaluate import (
    ConflictItem,
    ConflictSetError,
    evaluate,
    format_table,
    judge,
    load_conflict_set,
    metrics,
    wilson,
)
from backpatch.loading import load_model_and_processor


def item(kind, audio="seven", text="three"):
    return ConflictItem("x", None, "p", audio, text if kind != "audio_only" else None, kind)


@pytest.mark.parametrize(
    "answer,kind,expected",
    [
        ("seven", "conflict", "audio"),
        ("Three.", "conflict", "text"),
        ("The digit is seven.", "conflict", "audio"),
        ("seven, not three", "conflict", "audio"),
        ("three, not seven", "conflict", "text"),
        ("sevenfold", "conflict", "other"),
        ("", "conflict", "other"),
        ("nine", "conflict", "other"),
        ("seven", "audio_only", "audio"),
        ("three", "audio_only", "other"),
    ],
)
def test_judge(answer, kind, expected):
    it = item(kind) if kind != "consistent" else item(kind, "seven", "seven")
    assert judge(answer, it) == expected


def test_metrics_on_hand_made_answers():
    items = [item("conflict")] * 5 + [item("consistent", "seven", "seven")] * 2 + [item("audio_only")] * 4
    verdicts = ["text", "text", "text", "audio", "other", "audio", "other", "audio", "audio", "audio", "other"]
    m = metrics(items, verdicts)
    assert m["tdr"] == 0.75 and m["afr"] == 0.2 and m["other_rate"] == 0.2
    assert m["consistent_acc"] == 0.5 and m["audio_only_acc"] == 0.75
    assert (m["n_conflict"], m["n_consistent"], m["n_audio_only"]) == (5, 2, 4)
    assert m["ci95"]["tdr"] == wilson(3, 4)
    lo, hi = m["ci95"]["tdr"]
    assert 0 <= lo < 0.75 < hi <= 1


def test_zero_denominators_are_null_not_zero():
    m = metrics([item("conflict")] * 3, ["other"] * 3)  # conflicts, but none followed either side
    assert m["tdr"] is None and m["ci95"]["tdr"] is None
    assert m["afr"] == 0.0 and m["other_rate"] == 1.0
    assert m["consistent_acc"] is None and m["audio_only_acc"] is None
    m = metrics([], [])
    assert all(m[k] is None for k in ("tdr", "afr", "other_rate", "consistent_acc", "audio_only_acc"))


def test_wilson_interval():
    assert wilson(0, 0) is None
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", "not valid JSON"),
        ('{"id": 1, "audio": "wav/c0.wav", "prompt": "p", "kind": "conflict"}', "missing field(s) audio_answer"),
        ('{"id": 1, "audio": "wav/c0.wav", "prompt": "p", "audio_answer": "a", "kind": "odd"}', "kind 'odd'"),
        ('{"id": 1, "audio": "wav/c0.wav", "prompt": "p", "audio_answer": "a", "kind": "conflict"}',
         "conflict item needs a text_answer"),
        ('{"id": 1, "audio": "wav/c0.wav", "prompt": "p", "audio_answer": "a", "text_answer": "b", '
         '"kind": "consistent"}', "text_answer == audio_answer"),
        ('{"id": 1, "audio": "wav/none.wav", "prompt": "p", "audio_answer": "a", "text_answer": "b", '
         '"kind": "conflict"}', "audio file 'wav/none.wav' not found"),
        # a "conflict" whose claim is the audio's answer is no conflict (judged alike: case and punctuation aside)
        ('{"id": 1, "audio": "wav/c0.wav", "prompt": "p", "audio_answer": "seven", "text_answer": "Seven.", '
         '"kind": "conflict"}', "a conflict item needs a text_answer that differs from its audio_answer"),
    ],
)
def test_conflict_set_errors_name_file_and_line(tmp_path, line, message):
    path = tiny_conflict_set(tmp_path, 1)
    good = path.read_text().splitlines()[0]
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(ConflictSetError) as info:
        load_conflict_set(path)
    assert str(info.value).startswith(f"{path}:2: ") and message in str(info.value)


@pytest.mark.parametrize("limit", [0, -5, True, 1.5])
def test_limit_must_be_a_positive_number_of_items(tmp_path, limit):
    path = tiny_conflict_set(tmp_path, 1)
    with pytest.raises(ConflictSetError, match="limit must be a positive number of items"):
        load_conflict_set(path, limit)
    assert len(load_conflict_set(path, 2)) == 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tiny_checkpoint(root / "model")
    data = tiny_conflict_set(root / "data", 4)
    preset = root / "p.yaml"
    Preset(patches=[Patch(source=-1, target=0, scale=3.0, positions="audio+last")], name="p").to_yaml(preset)
    return root, data, preset


def test_evaluate_report_mechanics(setup):
    root, data, preset = setup
    model, processor = load_model_and_processor(str(root / "model"))
    wrapped = backpatch.wrap(model, str(preset))
    report = evaluate(wrapped, processor, data, batch_size=3, max_new_tokens=3, progress=False)
    assert {"model", "preset", "data", "plain", "backpatched", "items"} <= set(report)
    assert report["preset"] == wrapped.preset.to_dict()
    assert len(report["items"]) == 16
    for column in ("plain", "backpatched"):
        m = report[column]
        assert (m["n_conflict"], m["n_consistent"], m["n_audio_only"]) == (8, 4, 4)
        for key in ("afr", "other_rate", "consistent_acc", "audio_only_acc"):
            assert 0.0 <= m[key] <= 1.0
        verdicts = [row[f"{column}_follows"] for row in report["items"]]
        assert verdicts.count("text") == m["followed_text"]
    # the batched back-patched answers are what wrap().generate gives item by item
    from backpatch.audio_io import load_audio
    from backpatch.inputs import build_inputs, decode_new_tokens

    items = load_conflict_set(data)
    for it, row in list(zip(items, report["items"], strict=True))[:4]:
        inputs = build_inputs(processor, [load_audio(it.audio, 16000)], [it.prompt])
        with torch.no_grad():
            out = wrapped.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert decode_new_tokens(processor, out, inputs["input_ids"].shape[1])[0] == row["backpatched"]


def test_cli_eval_writes_report(setup, capsys):
    root, data, preset = setup
    out = root / "report.json"
    assert main(["eval", "--model", str(root / "model"), "--preset", str(preset), "--data", str(data),
                 "--out", str(out), "--max-new-tokens", "3", "--batch-size", "5"]) == 0
    report = json.loads(out.read_text())
    assert report["plain"]["n_conflict"] == 8
    printed = capsys.readouterr().out
    assert "tdr" in printed and "audio_only_acc" in printed and "report written to" in printed


def _table_header(report):
    return next(line for line in format_table(report).splitlines() if line.startswith("metric")).split(None, 2)


def test_table_names_the_second_column_by_the_presets_methods():
    """Issue 25: the table's header names what the preset does (a preset without patches is not labelled
    back-patched); the JSON keys stay "plain"/"backpatched"."""
    m = metrics([item("conflict"), item("audio_only")], ["text", "audio"])
    report = {"plain": m, "backpatched": m, "preset": backpatch.load_preset("smol-whisper").to_dict(),
              "settings": {"mitigation": "preset", "instruction": None}}
    assert _table_header(report) == ["metric", "plain", "back-patched 20->18"]
    report["preset"] = Preset(contrastive=backpatch.Contrastive(alpha=1.0), name="c").to_dict()
    assert _table_header(report) == ["metric", "plain", "contrastive a=1"]
    assert "backpatched" not in format_table(report) and "back-patched" not in format_table(report)
    report["preset"] = Preset(patches=[Patch(20, 18)], name="p").to_dict()
    assert _table_header(report)[2] == "back-patched 20->18"
    report["settings"]["instruction"] = {"text": "Trust the audio.", "role": "user"}
    assert _table_header(report)[2] == "back-patched 20->18 + instruction"
    report["settings"]["mitigation"] = "none"
    assert _table_header(report)[2] == "no preset + instruction"
    assert _table_header({"plain": m, "backpatched": m})[2] == "with preset"  # no preset recorded
    report["settings"]["mitigation"], report["preset"]["name"] = "preset", "a-preset-with-a-long-label"
    report["preset"]["patches"].append({"source": 26, "target": 10})
    rows = format_table(report).splitlines()  # "back-patched (2 patches) + instruction": wider than 24
    assert len({len(line) for line in rows if line.startswith(("metric", "tdr ", "afr "))}) == 1  # aligned


def test_cli_eval_table_names_a_contrastive_preset_by_its_methods(setup, tmp_path, capsys):
    root, data, _ = setup
    preset = tmp_path / "c.yaml"
    Preset(name="c", contrastive=backpatch.Contrastive(alpha=2.0), gate=backpatch.Gate("audio_gap", 0.1, 0.3)
           ).to_yaml(preset)
    out = tmp_path / "c.json"
    assert main(["eval", "--model", str(root / "model"), "--preset", str(preset), "--data", str(data),
                 "--max-new-tokens", "2", "--limit", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("metric"))
    assert header.split(None, 2)[2] == "contrastive a=2 + gate" and "back-patched" not in printed
    assert {"plain", "backpatched"} <= set(json.loads(out.read_text()))  # the report's keys are a contract


def test_cli_eval_bad_data_is_one_sentence(setup, capsys):
    root, _, preset = setup
    assert main(["eval", "--model", str(root / "model"), "--data", str(root / "missing.jsonl")]) == 2
    assert "conflict set not found" in capsys.readouterr().err


def test_accelerate_two_processes_merge_to_the_single_process_report(setup):
    root, data, preset = setup
    reports = {}
    for name, extra in (("single", []), ("multi", ["--launcher", "accelerate", "--num-processes", "2"])):
        out = root / f"{name}.json"
        cmd = [sys.executable, "-m", "backpatch", "eval", "--model", str(root / "model"), "--preset", str(preset),
               "--data", str(data), "--out", str(out), "--max-new-tokens", "3", "--batch-size", "3", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        reports[name] = json.loads(out.read_text())
    assert reports["single"]["settings"]["num_processes"] == 1
    assert reports["multi"]["settings"]["num_processes"] == 2
    assert reports["multi"]["items"] == reports["single"]["items"]
    assert reports["multi"]["plain"] == reports["single"]["plain"]
    assert reports["multi"]["backpatched"] == reports["single"]["backpatched"]


def test_breakdowns_by_framing_and_label_and_their_table():
    from backpatch.evaluate import breakdown

    def annotated(kind, framing, label, text="three"):
        return ConflictItem("x", None, "p", label, text if kind != "audio_only" else None, kind, framing, label)

    items = [annotated("conflict", "quote", "seven")] * 4 + [annotated("conflict", "bare", "two")] * 2 + [
        annotated("consistent", "quote", "seven", "seven"), annotated("audio_only", None, "two")]
    plain = ["text", "text", "text", "audio", "audio", "other", "audio", "audio"]
    patched = ["audio", "audio", "text", "audio", "audio", "audio", "other", "audio"]
    by_framing = breakdown(items, plain, patched, "framing")
    assert list(by_framing) == ["quote", "bare"]  # audio-only items carry no framing and are left out
    assert by_framing["quote"]["plain"]["tdr"] == 0.75 and by_framing["quote"]["backpatched"]["tdr"] == 0.25
    assert by_framing["quote"]["plain"]["consistent_acc"] == 1.0
    assert by_framing["quote"]["backpatched"]["consistent_acc"] == 0.0
    assert by_framing["bare"]["plain"]["tdr"] == 0.0 and by_framing["bare"]["plain"]["other_rate"] == 0.5
    by_label = breakdown(items, plain, patched, "label")
    assert by_label["two"]["plain"]["n_audio_only"] == 1 and by_label["two"]["plain"]["n_conflict"] == 2
    assert breakdown([item("conflict")], ["text"], ["text"], "framing") is None
    report = {"plain": metrics(items, plain), "backpatched": metrics(items, patched),
              "by_framing": by_framing, "by_label": by_label}
    table = format_table(report).splitlines()
    quote = next(line for line in table if line.startswith("quote"))
    assert quote.split()[:2] == ["quote", "4"] and "0.750 [" in quote and "0.250 [" in quote
    assert any(line.startswith("label") for line in table) and any(line.startswith("seven") for line in table)
    assert "framing" not in format_table({"plain": report["plain"], "backpatched": report["backpatched"]})


def test_evaluate_reports_tdr_per_framing_and_label(setup, tmp_path):
    root, data, preset = setup
    lines = [json.loads(line) for line in data.read_text().splitlines()]
    for n, row in enumerate(lines):
        row["label"] = row["audio_answer"]
        row["group"] = "g"
        row["task"] = "digit" if n < len(lines) // 2 else "word"  # a multi-task set (smol-audio)
        if row["kind"] != "audio_only":
            row["framing"] = "quote" if n % 2 else "bare"
    annotated = data.parent / "annotated.jsonl"
    annotated.write_text("".join(json.dumps(row) + "\n" for row in lines))
    model, processor = load_model_and_processor(str(root / "model"))
    wrapped = backpatch.wrap(model, str(preset))
    report = evaluate(wrapped, processor, annotated, batch_size=8, max_new_tokens=3, progress=False)
    plain_report = evaluate(wrapped, processor, data, batch_size=8, max_new_tokens=3, progress=False)
    assert "by_framing" not in plain_report and "by_label" not in plain_report
    for key in ("plain", "backpatched"):  # the existing keys are unchanged by the annotations
        assert report[key] == plain_report[key]
    assert set(report["by_framing"]) == {"quote", "bare"}
    assert sum(v["plain"]["n_conflict"] for v in report["by_framing"].values()) == report["plain"]["n_conflict"]
    assert set(report["by_label"]) == {row["audio_answer"] for row in lines}
    for name, parts in report["by_framing"].items():
        rows = [r for r in report["items"] if r.get("framing") == name and r["kind"] == "conflict"]
        assert parts["backpatched"]["followed_text"] == sum(r["backpatched_follows"] == "text" for r in rows)
    assert report["items"][0]["group"] == "g" and report["items"][0]["label"] == lines[0]["audio_answer"]
    assert list(report["by_task"]) == ["digit", "word"] and "by_task" not in plain_report
    assert sum(v["plain"]["n_conflict"] + v["plain"]["n_audio_only"] for v in report["by_task"].values()) == (
        report["plain"]["n_conflict"] + report["plain"]["n_audio_only"])
    assert any(line.startswith("task") for line in format_table(report).splitlines())


def test_evaluate_reports_by_perturbation_and_paired_harm(setup):
    from backpatch.evaluate import harmed

    root, data, preset = setup
    lines = [json.loads(line) for line in data.read_text().splitlines()]
    for n, row in enumerate(lines):
        if n % 2:
            row["perturbation"] = "snr0"
    stressed = data.parent / "stressed.jsonl"
    stressed.write_text("".join(json.dumps(row) + "\n" for row in lines))
    model, processor = load_model_and_processor(str(root / "model"))
    wrapped = backpatch.wrap(model, str(preset))
    report = evaluate(wrapped, processor, stressed, batch_size=8, max_new_tokens=3, progress=False)
    assert set(report["by_perturbation"]) == {"snr0"}
    assert report["by_perturbation"]["snr0"]["plain"]["n_conflict"] == sum(
        1 for r in lines if r.get("perturbation") and r["kind"] == "conflict")
    assert set(report["paired"]["harm"]) == {"clean", "perturbed"}
    rows = [r for r in report["items"] if r.get("perturbation") and r["kind"] == "audio_only"]
    lost = sum(r["plain_follows"] == "audio" and r["backpatched_follows"] != "audio" for r in rows)
    assert report["paired"]["harm"]["perturbed"]["audio_only"]["lost"] == lost
    assert "perturbation" in format_table(report) and "audio-only" in format_table(report)
    # the JSON marks exactly what the table marks with "!"
    marked = {name: harmed(report, name) for name in ("audio_only_acc", "consistent_acc") if harmed(report, name)}
    assert report["beyond_harm_bound"] == marked


def test_table_marks_a_control_metric_beyond_the_harm_bound():
    from backpatch.evaluate import harmed, metrics

    m = metrics([item("audio_only")] * 2, ["audio", "audio"])
    harm = {"clean": {"audio_only": {"n": 40, "lost": 6, "gained": 0, "loss": 0.15, "upper": 0.3}}}
    report = {"plain": m, "backpatched": m, "max_harm": 0.02,
              "paired": {"harm": harm, "harm_upper": 0.3, "tdr_reduction": None}}
    assert harmed(report, "audio_only_acc") == ["clean"] and harmed(report, "consistent_acc") == []
    table = format_table(report)
    assert [line for line in table.splitlines() if line.startswith("audio_only_acc")][0].endswith(" !")
    assert "! harm: the paired 95% upper bound on the accuracy loss exceeds 0.02 for audio_only_acc (clean)" in table
    harm["clean"]["audio_only"]["upper"] = 0.01
    assert " !" not in format_table(report)


def test_evaluate_records_the_gate_per_item(setup):
    root, data, _ = setup
    model, processor = load_model_and_processor(str(root / "model"))
    gated = Preset(patches=[Patch(source=-1, target=0, scale=3.0)], name="g",
                   gate=backpatch.Gate("certainty", 1.0, 1.0))  # never opens: plain answers everywhere
    report = evaluate(backpatch.wrap(model, gated), processor, data, batch_size=8, max_new_tokens=3, progress=False)
    assert all(r["gate"]["patch"] == 0.0 and r["plain"] == r["backpatched"] for r in report["items"])
    assert report["gate"]["patch"] == {"mean": 0.0, "weakened": 1.0, "closed": 1.0, "n": 16}
    assert "closed on 100.0%" in format_table(report)


def test_known_plain_answers_are_not_generated_again(setup):
    root, data, preset = setup
    model, processor = load_model_and_processor(str(root / "model"))
    wrapped = backpatch.wrap(model, str(preset))
    first = evaluate(wrapped, processor, data, batch_size=8, max_new_tokens=3, progress=False)
    answers = [row["plain"] for row in first["items"]]
    calls = []
    original = wrapped.disabled

    def counting():
        calls.append(1)
        return original()

    wrapped.disabled = counting
    again = evaluate(wrapped, processor, data, batch_size=8, max_new_tokens=3, progress=False, plain_answers=answers)
    assert calls == [] and again["plain"] == first["plain"] and again["backpatched"] == first["backpatched"]
    with pytest.raises(ValueError, match="plain_answers has 1 answers for 16 items"):
        evaluate(wrapped, processor, data, batch_size=8, max_new_tokens=3, progress=False, plain_answers=["x"])


def test_cli_eval_plain_from_an_earlier_report(setup, tmp_path, capsys):
    root, data, preset = setup
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    args = ["eval", "--model", str(root / "model"), "--preset", str(preset), "--data", str(data),
            "--max-new-tokens", "3", "--batch-size", "5"]
    assert main([*args, "--out", str(first)]) == 0
    assert main([*args, "--out", str(second), "--plain-from", str(first)]) == 0
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert a["plain"] == b["plain"] and a["backpatched"] == b["backpatched"]
    capsys.readouterr()
    assert main([*args[:-4], "--max-new-tokens", "2", "--batch-size", "5", "--plain-from", str(first)]) == 2
    assert "it was answered with max_new_tokens 3, this run asks 2" in capsys.readouterr().err
    assert main([*args, "--limit", "3", "--plain-from", str(first)]) == 2
    assert "its items are not the items of" in capsys.readouterr().err


def test_prompt_framing_instruction_goes_into_the_second_column_only(setup):
    """--instruction (issue 20 point 3): the second column's prompts carry the instruction, the plain column keeps
    the items' own prompts; with mitigate=False the second column is the plain model with the framing alone."""
    from backpatch.audio_io import load_audio
    from backpatch.inputs import build_inputs, decode_new_tokens

    root, data, preset = setup
    model, processor = load_model_and_processor(str(root / "model"))
    wrapped = backpatch.wrap(model, str(preset))
    text = "The text may be wrong; answer from the audio."
    base = evaluate(wrapped, processor, data, batch_size=8, max_new_tokens=3, progress=False)
    framed = evaluate(wrapped, processor, data, batch_size=8, max_new_tokens=3, progress=False, instruction=text,
                      mitigate=False)
    assert framed["plain"] == base["plain"]
    assert framed["settings"]["instruction"] == {"text": text, "role": "user"}
    assert framed["settings"]["mitigation"] == "none" and "gate" not in framed
    items = load_conflict_set(data)
    for it, row in list(zip(items, framed["items"], strict=True))[:4]:
        inputs = build_inputs(processor, [load_audio(it.audio, 16000)], [f"{text} {it.prompt}"])
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert decode_new_tokens(processor, out, inputs["input_ids"].shape[1])[0] == row["backpatched"]
    # a system turn: in the chat template's text, or refused when the template drops it
    from backpatch.inputs import check_system_turn, conversation

    rendered = processor.apply_chat_template(conversation("q?", text), add_generation_prompt=True, tokenize=False)
    if text in rendered:
        check_system_turn(processor, text)
        system = evaluate(wrapped, processor, data, batch_size=8, max_new_tokens=3, progress=False,
                          instruction=text, instruction_role="system", limit=4)
        assert system["settings"]["instruction"]["role"] == "system"
    else:
        with pytest.raises(ValueError, match="drops system turns.*--instruction-role user"):
            evaluate(wrapped, processor, data, max_new_tokens=3, progress=False, instruction=text,
                     instruction_role="system")


def test_cli_eval_instruction_and_preset_none(setup, tmp_path, capsys):
    root, data, preset = setup
    args = ["eval", "--model", str(root / "model"), "--data", str(data), "--max-new-tokens", "3", "--limit", "4"]
    assert main([*args, "--preset", "none"]) == 2
    assert "--preset none compares the plain model with itself: add --instruction" in capsys.readouterr().err
    out = tmp_path / "framing.json"
    assert main([*args, "--preset", "none", "--instruction", "Trust the audio.", "--out", str(out)]) == 0
    assert "second column: preset none + instruction (user turn): 'Trust the audio.'" in capsys.readouterr().out
    report = json.loads(out.read_text())
    settings = report["settings"]
    assert settings["mitigation"] == "none" and settings["instruction"]["text"] == "Trust the audio."
    assert main([*args, "--preset", str(preset), "--instruction", "Trust the audio."]) == 0
    assert "second column: preset p [" in capsys.readouterr().out


def test_perturbation_families_are_named_as_the_stress_sets_name_them():
    from backpatch.organism.perturb import LEVELS
    from backpatch.paired import perturbation_family

    assert {level.name: perturbation_family(level.name) for level in LEVELS} == \
        {level.name: level.family for level in LEVELS}
    assert perturbation_family("flite-slt") == "flite-slt" and perturbation_family(None) is None


def test_eval_breaks_down_by_perturbation_family_and_marks_a_harmed_family(setup):
    """Issue 28 point 5: each family (and the clean items) with its metrics and its own paired harm bound; a family
    beyond --max-harm is marked with "!" in the table, the others are not."""
    root, data, preset = setup
    lines = [json.loads(line) for line in data.read_text().splitlines()]
    for n, row in enumerate(lines):
        row["perturbation"] = ("snr10", "pitch+200", None)[n % 3]
    stressed = data.parent / "families.jsonl"
    stressed.write_text("".join(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n" for row in lines))
    model, processor = load_model_and_processor(str(root / "model"))
    report = evaluate(backpatch.wrap(model, str(preset)), processor, stressed, batch_size=8, max_new_tokens=3,
                      progress=False)
    families = report["by_perturbation_family"]
    assert list(families) == ["noise", "pitch", "clean"]
    for family, part in families.items():
        bounds = report["paired"]["harm_by_family"][family]
        assert part["harm_upper"] == max(b["upper"] for b in bounds.values())
        n = sum(1 for k, r in enumerate(lines) if r["kind"] == "conflict" and ("noise", "pitch", "clean")[k % 3]
                == family)
        assert part["plain"]["n_conflict"] == n
    # the marker follows each family's bound (set here: the tiny model answers no item right, so its bounds are 0)
    marked_report = {**report, "max_harm": 0.02, "by_perturbation_family": {
        family: {**part, "harm_upper": 0.3 if family == "pitch" else 0.01} for family, part in families.items()}}
    table = format_table(marked_report)
    assert [line.split()[0] for line in table.splitlines() if "! harm bound 0.300" in line] == ["pitch"]
    assert "the preset harms that kind of speech" in table
    assert "! harm bound" not in format_table({**report, "max_harm": 1.0})
