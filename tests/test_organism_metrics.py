"""The shipped organisms reproduce the README's numbers on the shipped examples (deterministic, greedy).

docs/organism-report.json (digits) and docs/smol-whisper-report.json are written by scripts/organism_report.py;
the README's organism tables come from them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import backpatch
from backpatch import Preset, organism
from backpatch.evaluate import evaluate
from backpatch.loading import load_model_and_processor

DOCS = Path(__file__).resolve().parent.parent / "docs"
REPORTS = {"digits": json.loads((DOCS / "organism-report.json").read_text()),
           "smol-whisper": json.loads((DOCS / "smol-whisper-report.json").read_text())}
COUNTS = ("followed_text", "followed_audio", "other", "n_conflict", "n_consistent", "n_audio_only")
CASES = [(organism_name, name) for organism_name, report in REPORTS.items()
         for name in sorted(report["configurations"])]


@pytest.fixture(scope="module")
def organism_models():
    return {}


@pytest.mark.parametrize(("organism_name", "name"), CASES)
def test_shipped_weights_reproduce_the_examples_metrics(organism_models, organism_name, name):
    if organism_name not in organism_models:
        organism_models.clear()  # one model in memory at a time
        organism_models[organism_name] = load_model_and_processor(f"organism:{organism_name}")
    model, processor = organism_models[organism_name]
    stored = REPORTS[organism_name]["configurations"][name]
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
