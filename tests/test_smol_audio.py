"""smol-audio (issue 29): its tasks as data, its corpus plan and sounds, its training batches and per-task scoring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backpatch.organism import AUDIO_ONLY_TEMPLATE, CLAIM_TEMPLATE
from backpatch.organism.audio_corpus import COUNT_WORDS, FEMALE, SPEEDS, make_sound, plan
from backpatch.organism.corpus import VARIANTS
from backpatch.organism.processor import SAMPLING_RATE
from backpatch.organism.tasks import load_tasks
from backpatch.organism.train_smol_audio import by_task_metrics, task_items


def test_every_task_has_its_own_vocabulary_and_the_digit_task_keeps_the_design_prompts():
    tasks = load_tasks()
    assert set(tasks) == {"word", "digit", "sex", "rate", "count", "sound", "beeps"}
    for task in tasks.values():
        assert len(set(task.labels)) == len(task.labels) >= 2, task.name
        assert set(task.held_out_labels) <= set(task.labels)
    word = tasks["word"]
    assert len(word.labels) >= 200 and 30 <= len(word.held_out_labels) < len(word.labels) // 4
    assert not set(word.trained_labels) & set(word.held_out_labels)
    rows = [{"id": "c1", "path": "wav/c1.wav", "labels": {"digit": "seven"}}]
    items = task_items(tasks["digit"], rows, seed=0)
    prompts = {it["kind"]: it["prompt"] for it in items}
    assert prompts["audio_only"] == AUDIO_ONLY_TEMPLATE
    assert prompts["consistent"] == CLAIM_TEMPLATE.format(claim="seven")
    conflict = next(it for it in items if it["kind"] == "conflict")
    assert conflict["prompt"] == CLAIM_TEMPLATE.format(claim=conflict["text_answer"])


def test_training_never_hears_the_held_out_words_and_voices_stay_split():
    tasks = load_tasks()
    held = set(tasks["word"].held_out_labels)
    train, test = plan("train", seed=0), plan("test", seed=0)
    spoken_in_train = {w for r in train if r["source"] == "espeak-ng" for w in r["text"].split()}
    assert not spoken_in_train & held
    test_words = [r["labels"]["word"] for r in test if "word" in r["labels"]]
    assert {w for w in test_words if w in held} == held
    for split, rows in (("train", train), ("test", test)):
        speech = [r for r in rows if r["source"] == "espeak-ng"]
        assert {r["variant"] for r in speech} <= set(VARIANTS[split])
        for r in speech:
            assert (r["labels"]["sex"] == "female") == (r["variant"] in FEMALE)
            if "rate" in r["labels"]:
                low, high = SPEEDS[r["labels"]["rate"]]
                assert low <= r["speed"] <= high
        share = np.mean([r["labels"]["sex"] == "female" for r in speech])
        assert 0.4 < share < 0.6, (split, share)
    for r in train:
        if "count" in r["labels"]:
            assert len(r["text"].split()) == COUNT_WORDS.index(r["labels"]["count"]) + 1
        assert ("beeps" in r["labels"]) == (r["labels"].get("sound") == "beep")
    assert plan("test", seed=0) == test  # a pure function of the seed


@pytest.mark.parametrize("beeps", [1, 3, 4])
def test_a_beep_clip_holds_as_many_beeps_as_its_label(beeps):
    audio, params = make_sound("beep", np.random.default_rng(beeps), beeps)
    frame = SAMPLING_RATE // 100
    loud = np.abs(audio[: len(audio) // frame * frame]).reshape(-1, frame).max(1) > 0.1
    onsets = int(loud[0]) + int(np.sum(loud[1:] & ~loud[:-1]))
    assert onsets == beeps == params["beeps"]


@pytest.mark.parametrize("kind", ["tone", "sweep", "noise", "buzz"])
def test_every_sound_kind_is_sound_inside_the_window(kind):
    audio, params = make_sound(kind, np.random.default_rng(0))
    assert 0.4 < len(audio) / SAMPLING_RATE < 2.9 and np.abs(audio).max() > 0.1
    with pytest.raises(ValueError, match="kinds: beep"):
        make_sound("whistle", np.random.default_rng(0))


def test_task_items_mark_the_task_and_the_held_out_words_and_metrics_report_them_apart():
    tasks = load_tasks()
    held = tasks["word"].held_out_labels[0]
    rows = [{"id": "a", "path": "wav/a.wav", "labels": {"word": tasks["word"].trained_labels[0], "sex": "male"}},
            {"id": "b", "path": "wav/b.wav", "labels": {"word": held, "sex": "female"}}]
    items = task_items(tasks["word"], rows, seed=0) + task_items(tasks["sex"], rows, seed=0)
    assert {it["task"] for it in items} == {"word", "sex"}
    assert all(it["id"].startswith(it["task"] + "-") for it in items)
    assert {it["audio_answer"] for it in items if it.get("held_out")} == {held}
    # a binary task has one wrong claim per clip and framing
    assert sum(it["kind"] == "conflict" for it in items if it["task"] == "sex") == 2 * len(tasks["sex"].framings)
    answers = [it["audio_answer"] if it["audio_answer"] != held else "nothing" for it in items]
    report = by_task_metrics(items, answers)
    assert report["word"]["audio_only_acc"] == 0.5 and report["word/held-out"]["audio_only_acc"] == 0.0
    assert report["sex"]["audio_only_acc"] == 1.0 and report["sex"]["tdr"] == 0.0


def test_smol_audio_builds_into_its_own_folder_with_its_own_window():
    from backpatch.organism import smol_audio, smol_whisper

    cache = Path("/nonexistent-cache")
    assert smol_whisper.checkpoint_dir(cache, smol_audio.SPEC).name.startswith("smol-audio-")
    assert smol_whisper.checkpoint_dir(cache).name.startswith("smol-whisper-")
    assert smol_audio.SPEC.window_seconds == 3 and smol_whisper.SPEC.window_seconds == 2


def test_conflict_sets_hold_every_task_every_held_out_clip_and_load_as_conflict_sets(tmp_path):
    import json

    import soundfile as sf

    from backpatch.items import load_conflict_set
    from backpatch.organism.audio_conflicts import build

    tasks = load_tasks()
    corpus = tmp_path / "corpus"
    held = tasks["word"].held_out_labels[:3]
    for split in ("validation", "test"):
        (corpus / split / "wav").mkdir(parents=True)
        rows = [{"id": f"{split}-w{i}", "labels": {"word": w, "sex": "male"}}
                for i, w in enumerate(tasks["word"].trained_labels[:12] + held)]
        rows += [{"id": f"{split}-s{i}", "labels": {"sound": "beep", "beeps": "two"}} for i in range(4)]
        with open(corpus / split / "manifest.jsonl", "w") as f:
            for row in rows:
                row["path"] = f"wav/{row['id']}.wav"
                sf.write(corpus / split / row["path"], np.zeros(1600, np.float32), SAMPLING_RATE)
                f.write(json.dumps(row) + "\n")
    summary = build(corpus, tmp_path / "sets", seed=0, clips_per_task=5)
    items = load_conflict_set(tmp_path / "sets" / "test" / "conflicts.jsonl")
    assert {it.task for it in items} == {"word", "sex", "sound", "beeps"}
    word_clips = {it.audio.stem for it in items if it.task == "word"}
    assert len(word_clips) == 5 + len(held)  # 5 drawn clips of trained words, and every held-out clip
    assert {it.audio_answer for it in items if it.task == "word"} >= set(held)
    assert summary["test"]["sex"]["conflict"] == 5 * len(tasks["sex"].framings)
    assert len(load_conflict_set(tmp_path / "sets" / "test" / "beeps.jsonl")) == sum(summary["test"]["beeps"].values())


def test_task_weights_parse_and_refuse_what_would_mislead():
    import argparse

    from backpatch.organism.train_smol_audio import task_weights

    assert task_weights("word=0.5, sex=0.1") == {"word": 0.5, "sex": 0.1}
    for text, message in [("wrd=0.5", "unknown task 'wrd'.*tasks: word"), ("word=lots", "task=number pairs"),
                          ("word=-1", "negative weight"), ("word=0", "at least one task")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            task_weights(text)


def test_row_losses_split_the_batch_loss_by_row_and_mean_by_task_groups_them():
    import torch

    from backpatch.organism._training import right_padded, row_losses
    from backpatch.organism.train_smol_audio import mean_by_task

    ids, _, labels = right_padded([[1, 2, 3, 4], [1, 2, 3, 4, 5, 6]], 0, [2, 3])
    logits = torch.randn(2, 6, 10, generator=torch.Generator().manual_seed(0))
    rows = row_losses(logits, labels)
    batch = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                              ignore_index=-100)
    # the batch loss is the token-weighted mean of the rows' losses (2 and 3 answer tokens)
    assert torch.allclose((rows[0] * 2 + rows[1] * 3) / 5, batch)
    assert mean_by_task([("word", 1.0), ("sex", 0.5), ("word", 3.0)]) == {"sex": 0.5, "word": 2.0}


def test_checkpoint_selection_prefers_the_higher_mean_accuracy_over_a_band_count():
    from backpatch.organism.train_smol_audio import select

    def m(ao, cons=1.0, tdr=0.9):
        return {"audio_only_acc": ao, "consistent_acc": cons, "tdr": tdr}

    # step 1 has two tasks just in band; step 2 has one, but a much higher mean accuracy
    lucky = {"step": 1, "val": {"a": m(0.90), "b": m(0.90), "c": m(0.10), "c/held-out": m(0.0)}}
    better = {"step": 2, "val": {"a": m(0.89), "b": m(0.95), "c": m(0.60), "c/held-out": m(0.0)}}
    assert select([lucky, better])["step"] == 2
    # equal means: the band count decides, then the later step
    assert select([{"step": 3, "val": {"a": m(0.9), "b": m(0.5)}}, {"step": 4, "val": {"a": m(0.8), "b": m(0.6)}}]
                  )["step"] == 3
    assert select([{"step": 5, "val": {"a": m(0.5)}}, {"step": 6, "val": {"a": m(0.5)}}])["step"] == 6
