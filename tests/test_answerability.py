"""Data the model cannot answer: refused before any model work, warned about in eval, never 'calibrated'."""

from __future__ import annotations

import json

import pytest
from transformers import AutoProcessor

import backpatch
from backpatch import organism
from backpatch.answerability import UnanswerableError, chance_warning, check_labels, unwritable_labels
from backpatch.cli import main
from backpatch.evaluate import ConflictItem, load_conflict_set, metrics

COLOURS = ("red", "green", "blue", "white", "black", "brown", "yellow", "pink", "grey", "purple")


@pytest.fixture(scope="module")
def digits_processor():
    return AutoProcessor.from_pretrained(organism.path("digits"))


def _relabel(tmp_path, mapping):
    """The organism's shipped examples with their labels replaced (same clips, absolute audio paths)."""
    source = organism.examples_path()
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    out = tmp_path / "relabelled.jsonl"
    with open(out, "w") as f:
        for row in rows:
            row["audio"] = str((source.parent / row["audio"]).resolve())
            row["audio_answer"] = mapping(row["audio_answer"])
            if row.get("text_answer"):
                row["text_answer"] = mapping(row["text_answer"])
                row["prompt"] = f'The speaker says "{row["text_answer"]}". Which colour is spoken?'
            f.write(json.dumps(row) + "\n")
    return out


def test_labels_the_tokenizer_cannot_write(digits_processor):
    assert unwritable_labels(["seven", "red", "three", "purple"], digits_processor) == ["red", "purple"]


def test_a_set_of_unwritable_labels_is_refused_and_a_partial_one_warned(digits_processor, tmp_path):
    colours = load_conflict_set(_relabel(tmp_path, lambda d: COLOURS[organism.DIGITS.index(d)]))
    with pytest.raises(UnanswerableError, match=r"cannot answer this conflict set: its tokenizer cannot write any"):
        check_labels(colours, digits_processor)
    mixed = load_conflict_set(_relabel(tmp_path, lambda d: "red" if d == "seven" else d))
    warning = check_labels(mixed, digits_processor)
    assert warning.startswith("1 of 10 labels cannot be written") and "'red'" in warning
    assert check_labels(load_conflict_set(organism.examples_path()), digits_processor) is None


def test_cli_eval_and_calibrate_refuse_colour_words_before_loading_the_model(tmp_path, capsys, monkeypatch):
    data = _relabel(tmp_path, lambda d: COLOURS[organism.DIGITS.index(d)])
    from backpatch import loading

    monkeypatch.setattr(loading, "load_model_and_processor", lambda *a, **k: pytest.fail("the model was loaded"))
    for command in (["eval"], ["calibrate", "--out", str(tmp_path / "p.yaml")]):
        assert main([*command, "--model", "organism:digits", "--data", str(data)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot answer this conflict set" in err[0]
    assert not (tmp_path / "p.yaml").exists()


def _item(kind, answer):
    return ConflictItem("i", None, "p", answer, "three" if kind == "conflict" else None, kind)


def test_chance_level_hearing_is_named():
    items = [_item("audio_only", d) for d in organism.DIGITS for _ in range(10)]
    deaf = metrics(items, ["audio" if i % 20 == 0 else "other" for i in range(100)])  # 5 of 100 right
    warning = chance_warning(items, deaf)
    assert "audio-only accuracy is 0.050" in warning and "chance level for 10 labels (0.100)" in warning
    assert chance_warning(items, metrics(items, ["audio" if i % 2 else "other" for i in range(100)])) is None


def test_eval_warns_loudly_when_the_model_does_not_hear(tmp_path):
    from tiny import tiny_checkpoint, tiny_conflict_set

    from backpatch.evaluate import evaluate, format_table
    from backpatch.loading import load_model_and_processor

    tiny_checkpoint(tmp_path / "model")
    data = tiny_conflict_set(tmp_path / "data", 40)  # 40 audio-only items: 0 right is surely below chance
    model, processor = load_model_and_processor(str(tmp_path / "model"))
    wrapped = backpatch.wrap(model, backpatch.Preset(patches=[backpatch.Patch(5, 0)]))
    report = evaluate(wrapped, processor, data, batch_size=16, max_new_tokens=2, progress=False, truncate=True)
    assert report["plain"]["audio_only_acc"] < 0.1  # a random model: 1 of 40 right by luck
    assert any("about chance level" in w for w in report["warnings"])
    assert format_table(report).startswith("WARNING: the plain model's audio-only accuracy is ")
