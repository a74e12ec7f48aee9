"""Perturbed stress splits: seeded, every level used, the SNR as asked, items annotated with their level."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import soundfile as sf

from backpatch import organism
from backpatch.evaluate import load_conflict_set
from backpatch.organism import perturb
from backpatch.organism.corpus import MAX_SECONDS
from backpatch.organism.processor import SAMPLING_RATE


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A two-split corpus laid out like corpus.py's, from the shipped example clips."""
    root = tmp_path_factory.mktemp("corpus")
    wavs = sorted((organism.examples_path().parent / "wav").glob("*.wav"))
    for split in perturb.SPLITS:
        (root / split / "wav").mkdir(parents=True)
        with open(root / split / "manifest.jsonl", "w") as f:
            for wav in wavs:
                (root / split / "wav" / wav.name).write_bytes(wav.read_bytes())
                f.write(json.dumps({"id": wav.stem, "path": f"wav/{wav.name}", "word": wav.stem.split("-")[1]}) + "\n")
    return root, wavs


@pytest.mark.parametrize("level", perturb.LEVELS, ids=lambda level: level.name)
def test_every_level_is_seeded_and_fits_the_window(corpus, level):
    _, wavs = corpus
    audio, _ = sf.read(wavs[0], dtype="float32")
    one = perturb.perturb(audio, level, perturb._rng(0, "validation", "x", level))
    two = perturb.perturb(audio, level, perturb._rng(0, "validation", "x", level))
    assert np.array_equal(one, two) and one.dtype == np.float32
    assert len(one) <= MAX_SECONDS * SAMPLING_RATE and np.abs(one).max() <= 1.0
    assert not (len(one) == len(audio) and np.allclose(one, audio, atol=1e-4)), "the level changed nothing"


def test_noise_reaches_the_asked_snr():
    t = np.arange(SAMPLING_RATE) / SAMPLING_RATE
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    noisy = perturb.add_noise(tone, 5.0, np.random.default_rng(0))
    snr = 10 * np.log10(np.mean(tone**2) / np.mean((noisy - tone) ** 2))
    assert snr == pytest.approx(5.0, abs=0.3)


def test_levels_cycle_over_the_clips():
    rows = [{"id": str(i)} for i in range(3 * len(perturb.LEVELS))]
    counts = Counter(level.name for level in perturb.assign_levels(rows, 0, "test"))
    assert set(counts) == set(perturb.LEVELS_BY_NAME) and set(counts.values()) == {3}
    assert perturb.assign_levels(rows, 0, "test") == perturb.assign_levels(rows, 0, "test")
    assert perturb.assign_levels(rows, 0, "test") != perturb.assign_levels(rows, 1, "test")


def test_build_writes_conflict_sets_whose_items_carry_their_level(corpus, tmp_path):
    root, wavs = corpus
    paths = perturb.build(root, tmp_path / "out", seed=0)
    for split in perturb.SPLITS:
        items = load_conflict_set(paths[split])
        assert len(items) == 5 * len(wavs)  # 3 conflicts, 1 consistent, 1 audio-only per clip
        assert all(it.perturbation in perturb.LEVELS_BY_NAME for it in items)
        assert all(it.perturbation in it.audio.name for it in items)
    again = perturb.build(root, tmp_path / "again", seed=0)
    assert again["test"].read_text() == paths["test"].read_text()
    assert json.loads((tmp_path / "out" / "perturbations.json").read_text())["seed"] == 0


def test_curve_figure_from_a_result(tmp_path):
    result = {"model": "m", "split": "validation", "n_clips": 3, "clean": 1.0,
              "levels": [{"name": lv.name, "family": lv.family, "strength": lv.strength, "audio_only_acc": 0.5,
                          "n": 3} for lv in perturb.LEVELS]}
    perturb.plot_curve(result, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_every_family_puts_every_clip_under_each_family(corpus, tmp_path):
    root, wavs = corpus
    rows = [{"id": str(i)} for i in range(12)]
    for family in perturb.FAMILIES:
        levels = perturb.assign_family_levels(rows, 0, "validation", family)
        assert {lv.family for lv in levels} == {family}
        within = [lv.name for lv in perturb.LEVELS if lv.family == family]
        counts = Counter(lv.name for lv in levels)
        assert set(counts) == set(within[:12]) and max(counts.values()) - min(counts.values()) <= 1
    with pytest.raises(ValueError, match="unknown perturbation family 'pich'.*pitch"):
        perturb.assign_family_levels(rows, 0, "validation", "pich")
    paths = perturb.build(root, tmp_path / "every", seed=0, every_family=True)
    items = load_conflict_set(paths["validation"])
    assert len(items) == 5 * len(wavs) * len(perturb.FAMILIES)
    family_of = {lv.name: lv.family for lv in perturb.LEVELS}
    for family in perturb.FAMILIES:
        clips = {it.audio.name.split("-" + it.perturbation)[0] for it in items if family_of[it.perturbation] == family}
        assert clips == {w.stem for w in wavs}, family
    assert json.loads((tmp_path / "every" / "perturbations.json").read_text())["every_family"] is True
