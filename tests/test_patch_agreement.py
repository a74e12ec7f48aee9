"""The back-patch's agreement guard (patch key ``agreement``, issue 28): a row whose unpatched answer the audio raised
by at least the guard over the null-audio stream is not patched. Schema, and semantics against the independent
reference of tests/reference.py."""

from __future__ import annotations

import pytest
import torch
import yaml
from reference import reference_logits
from test_gate import GEN, PATCH, _assert_same_generation, _null, _tv
from tiny import AUDIO_TOKEN

import backpatch
from backpatch import Contrastive, Gate, Patch, Preset, PresetError
from backpatch.methods import patch_label
from backpatch.methods.contrastive import agreement_signal

GUARDED = Patch(source=4, target=1, scale=1.5, mode="add", positions="audio", agreement=0.0)
ROWS = Contrastive(alpha=0.0, null_audio="zeros")  # the null-audio rows the guard reads, no contrastive term


def test_the_guard_needs_the_null_rows_of_a_contrastive_block_and_names_its_key():
    with pytest.raises(PresetError, match=r"my\.yaml: patches\[0\]\.agreement: .* add `contrastive: \{alpha: 0\.0\}`"):
        Preset.from_dict({"name": "g", "patches": [{"source": 4, "target": 1, "agreement": 1.0}]}, origin="my.yaml")
    with pytest.raises(PresetError, match=r"patches\[0\]\.agreement: expected a number"):
        Preset.from_dict({"name": "g", "patches": [{"source": 4, "target": 1, "agreement": "high"}],
                          "contrastive": {"alpha": 0.0}})


def test_the_guard_round_trips_is_absent_when_unset_and_is_labelled(tmp_path):
    preset = Preset(patches=[GUARDED], contrastive=ROWS)
    path = tmp_path / "g.yaml"
    preset.to_yaml(path)
    assert yaml.safe_load(path.read_text())["patches"][0]["agreement"] == 0.0
    assert Preset.from_yaml(path).patches == [GUARDED]
    assert "agreement" not in Preset(patches=[PATCH]).to_dict()["patches"][0]
    assert patch_label(GUARDED) == "4->1 add x1.5 @audio unless audio agrees by 0 nats"
    assert patch_label(PATCH) == "4->1 add x1.5 @audio"


def _agreement(model, batch):
    with torch.no_grad():
        return agreement_signal(model(**batch).logits[:, -1], model(**_null(batch)).logits[:, -1])


def _guarded(threshold: float) -> Patch:
    return Patch(**{**vars(PATCH), "agreement": threshold})


def test_guarded_rows_stay_plain_and_the_others_equal_the_reference(model, batch):
    """A threshold between the two audio rows' signals: the row at or above it is left as it was, the row below it
    gets the full patch, each equal to the reference patched with that row's 0/1 strength."""
    signal = _agreement(model, batch)[:2]
    assert signal[0] != signal[1], "the test needs two audio rows with different agreement"
    threshold = float(signal.mean())
    wrapped = backpatch.wrap(model, Preset(patches=[_guarded(threshold)], contrastive=ROWS))
    with torch.no_grad():
        got = wrapped.generate(**batch, max_new_tokens=1, **GEN).logits[0]
    keep = (_agreement(model, batch) < threshold).float()
    assert keep[:2].tolist() in ([0.0, 1.0], [1.0, 0.0])
    layers = model.model.language_model.layers
    want = reference_logits(model, layers, batch, [vars(PATCH)], AUDIO_TOKEN, row_gate=keep)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    plain = reference_logits(model, layers, batch, [vars(PATCH)], AUDIO_TOKEN, row_gate=torch.zeros(3))
    skipped = int(keep[:2].argmin())
    torch.testing.assert_close(got[skipped], plain[skipped], rtol=1e-5, atol=1e-5)
    assert backpatch.backpatch_hook_count(model) == 0


def test_the_guard_multiplies_the_gate(model, batch):
    with torch.no_grad():
        main, null = model(**batch).logits[:, -1], model(**_null(batch)).logits[:, -1]
    gap = _tv(main, null)
    gate = Gate(signal="audio_gap", low=0.0, high=float(gap[:2].max()) * 1.5)
    signal = _agreement(model, batch)
    threshold = float(signal[:2].mean())
    wrapped = backpatch.wrap(model, Preset(patches=[_guarded(threshold)], contrastive=ROWS, gate=gate))
    with torch.no_grad():
        got = wrapped.generate(**batch, max_new_tokens=1, **GEN).logits[0]
    strength = gate.strength(gap) * (signal < threshold).float()
    want = reference_logits(model, model.model.language_model.layers, batch, [vars(PATCH)], AUDIO_TOKEN,
                            row_gate=strength)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # last_gate() reports the gate alone, as documented; the guard's rows are those of the session's signal
    torch.testing.assert_close(torch.tensor(wrapped.last_gate()["patch"]), gate.strength(gap), rtol=0, atol=1e-4)


@pytest.mark.parametrize("threshold", [-1e9, 1e9])
def test_a_guard_that_holds_everywhere_is_plain_and_one_that_never_holds_is_the_unguarded_patch(model, batch,
                                                                                                  threshold):
    guarded = backpatch.wrap(model, Preset(patches=[_guarded(threshold)], contrastive=ROWS))
    reference = model if threshold < 0 else backpatch.wrap(model, Preset(patches=[PATCH]))
    with torch.no_grad():
        got = guarded.generate(**batch, max_new_tokens=3, **GEN)
        want = reference.generate(**batch, max_new_tokens=3, **GEN)
    _assert_same_generation(got, want)
