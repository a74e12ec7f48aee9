"""The shipped organism reproduces the README's numbers on the shipped examples (deterministic, greedy).

docs/organism-report.json is written by scripts/organism_report.py; the README's organism tables come from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import backpatch
from backpatch import Preset, organism
from backpatch.evaluate import evaluate
from backpatch.loading import load_model_and_processor

REPORT = json.loads((Path(__file__).resolve().parent.parent / "docs" / "organism-report.json").read_text())
COUNTS = ("followed_text", "followed_audio", "other", "n_conflict", "n_consistent", "n_audio_only")


@pytest.fixture(scope="module")
def organism_model():
    return load_model_and_processor()


@pytest.mark.parametrize("name", sorted(REPORT["configurations"]))
def test_shipped_weights_reproduce_the_examples_metrics(organism_model, name):
    model, processor = organism_model
    stored = REPORT["configurations"][name]
    wrapped = backpatch.wrap(model, Preset.from_dict(stored["preset"]), processor=processor)
    report = evaluate(wrapped, processor, organism.examples_path(), batch_size=50, max_new_tokens=4,
                      progress=False)
    for column, key in (("plain", "plain"), ("method", "backpatched")):
        for metric in (*COUNTS, "tdr", "afr", "audio_only_acc", "consistent_acc"):
            assert report[key][metric] == stored["examples"][column][metric], (name, column, metric)


def test_the_bundled_organism_preset_is_the_calibrated_one():
    preset = backpatch.load_preset("organism-digits")
    assert preset.calibration.status == "calibrated"
    assert preset.calibration.metrics["tdr_after"] < preset.calibration.metrics["tdr_before"]
