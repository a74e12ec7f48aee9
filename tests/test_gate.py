"""The audio-confidence gate (preset key ``gate``): schema, semantics against an independent reference, edge cases."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from reference import reference_logits
from tiny import AUDIO_TOKEN

import backpatch
from backpatch import Contrastive, Gate, Patch, Preset, PresetError

GEN = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
PATCH = Patch(source=4, target=1, scale=1.5, mode="add", positions="audio")


def _null(batch):
    return dict(batch, input_features=torch.zeros_like(batch["input_features"]))


def _tv(a, b):
    return 0.5 * (a.float().softmax(-1) - b.float().softmax(-1)).abs().sum(-1)


def _assert_same_generation(got, want):
    """Same tokens, and each step's logits equal to float tolerance."""
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _certainty(logits):
    log_p = logits.float().log_softmax(-1)
    return torch.exp((log_p.exp() * log_p).sum(-1))


# ------------------------------------------------------------------------------------------------ schema
@pytest.mark.parametrize(("gate", "where", "says"), [
    ({"signal": "loudness"}, "gate.signal", "use one of: audio_gap, certainty"),
    ({"low": 0.5, "high": 0.2}, "gate.low", "must not exceed high"),
    ({"high": 1.5}, "gate.high", "must be in [0, 1]"),
    ({"low": "0.1"}, "gate.low", "expected a number"),
    ({"threshold": 0.1}, "gate.threshold", "unknown key; allowed keys here: signal, low, high"),
])
def test_invalid_gate_names_the_key(gate, where, says):
    data = {"name": "g", "patches": [{"source": 4, "target": 1}], "contrastive": {"alpha": 1.0}, "gate": gate}
    with pytest.raises(PresetError, match=rf"my\.yaml: {where}: .*{re.escape(says)}"):
        Preset.from_dict(data, origin="my.yaml")


def test_audio_gap_gate_needs_the_null_rows_of_a_contrastive_block():
    with pytest.raises(PresetError, match=r"gate\.signal: audio_gap .* add `contrastive: \{alpha: 0\.0\}`"):
        Preset.from_dict({"name": "g", "patches": [{"source": 4, "target": 1}], "gate": {"signal": "audio_gap"}})
    Preset.from_dict({"name": "g", "patches": [{"source": 4, "target": 1}], "gate": {"signal": "certainty"}})


def test_gate_round_trips_and_is_absent_when_unset(tmp_path):
    preset = Preset(patches=[PATCH], contrastive=Contrastive(alpha=0.0, null_audio="zeros"),
                    gate=Gate(signal="audio_gap", low=0.05, high=0.25))
    path = tmp_path / "g.yaml"
    preset.to_yaml(path)
    assert yaml.safe_load(path.read_text())["gate"] == {"signal": "audio_gap", "low": 0.05, "high": 0.25}
    assert Preset.from_yaml(path).gate == preset.gate
    assert "gate" not in Preset(patches=[PATCH]).to_dict()


def test_strength_is_a_clipped_ramp_and_a_step_when_low_equals_high():
    ramp = Gate(signal="certainty", low=0.2, high=0.6)
    got = ramp.strength(torch.tensor([0.0, 0.2, 0.4, 0.6, 0.9]))
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    step = Gate(signal="certainty", low=0.3, high=0.3)
    assert step.strength(torch.tensor([0.29, 0.3, 0.8])).tolist() == [0.0, 1.0, 1.0]


# --------------------------------------------------------------------------------------------- semantics
def _signals(model, batch):
    with torch.no_grad():
        return model(**batch).logits[:, -1], model(**_null(batch)).logits[:, -1]


def test_gated_patch_and_contrastive_equal_the_reference(model, batch):
    """Gate per row from the unpatched audio/null distributions; patched states h + g (patched - h); first-step
    contrastive alpha scaled by the gate of the patched main vs the null distribution."""
    main, null = _signals(model, batch)
    gap = _tv(main, null)
    gate = Gate(signal="audio_gap", low=0.0, high=float(gap[:2].max()) * 1.5)  # every audio row strictly inside
    alpha = 1.5
    preset = Preset(patches=[PATCH], contrastive=Contrastive(alpha=alpha, null_audio="zeros"), gate=gate)
    wrapped = backpatch.wrap(model, preset)
    with torch.no_grad():
        got = wrapped.generate(**batch, max_new_tokens=1, **GEN).logits[0]
    g_patch = gate.strength(gap)
    assert ((g_patch[:2] > 0.05) & (g_patch[:2] < 0.95)).all(), "the test needs partial gates"
    layers = model.model.language_model.layers
    patched = reference_logits(model, layers, batch, [vars(PATCH)], AUDIO_TOKEN, row_gate=g_patch)
    g_alpha = (alpha * gate.strength(_tv(patched, null))).unsqueeze(-1)
    want = (1 + g_alpha) * patched - g_alpha * null
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    report = wrapped.last_gate()
    torch.testing.assert_close(torch.tensor(report["patch"]), g_patch, rtol=0, atol=1e-4)
    assert len(report["contrastive"]) == 3 and len(report["contrastive"][0]) == 1
    assert backpatch.backpatch_hook_count(model) == 0


def test_certainty_gate_on_patches_alone_equals_the_reference(model, batch):
    main, _ = _signals(model, batch)
    c = _certainty(main)
    gate = Gate(signal="certainty", low=float(c.min()) * 0.5, high=float(c.max()) * 1.2)
    wrapped = backpatch.wrap(model, Preset(patches=[PATCH], gate=gate))
    with torch.no_grad():
        got = wrapped.generate(**batch, max_new_tokens=1, **GEN).logits[0]
    g = gate.strength(c)
    want = reference_logits(model, model.model.language_model.layers, batch, [vars(PATCH)], AUDIO_TOKEN, row_gate=g)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert wrapped.last_gate()["contrastive"] is None


def test_a_closed_gate_is_plain_generation_bit_for_bit(model, batch):
    """certainty < 1 for every soft distribution, so a step at 1.0 never opens: h + 0 (patched - h) is h."""
    closed = Gate(signal="certainty", low=1.0, high=1.0)
    wrapped = backpatch.wrap(model, Preset(patches=[PATCH], gate=closed))
    with torch.no_grad():
        got = wrapped.generate(**batch, max_new_tokens=4, **GEN)
        plain = model.generate(**batch, max_new_tokens=4, **GEN)
    assert torch.equal(got.sequences, plain.sequences)
    for a, b in zip(got.logits, plain.logits, strict=True):
        assert torch.equal(a, b)
    assert wrapped.last_gate()["patch"] == [0.0, 0.0, 0.0]
    ungated = backpatch.wrap(model, Preset(patches=[PATCH]))
    with torch.no_grad():
        assert not torch.allclose(ungated.generate(**batch, max_new_tokens=1, **GEN).logits[0][:2], plain.logits[0][:2],
                                  atol=1e-3)


def test_an_open_gate_equals_the_ungated_preset(model, batch):
    opened = Gate(signal="audio_gap", low=0.0, high=0.0)  # TV >= 0 always: full strength everywhere
    contrastive = Contrastive(alpha=1.0, null_audio="zeros")
    gated = backpatch.wrap(model, Preset(patches=[PATCH], contrastive=contrastive, gate=opened))
    ungated = backpatch.wrap(model, Preset(patches=[PATCH], contrastive=contrastive))
    with torch.no_grad():
        a = gated.generate(**batch, max_new_tokens=4, **GEN)
        b = ungated.generate(**batch, max_new_tokens=4, **GEN)
    _assert_same_generation(a, b)
    assert all(v == 1.0 for row in gated.last_gate()["contrastive"] for v in row)


def test_gate_only_null_rows_leave_the_answer_alone_where_the_gate_is_closed(model, batch):
    """alpha 0 + audio_gap gate: the null rows only feed the gate; a closed gate gives plain logits."""
    closed = Gate(signal="audio_gap", low=1.0, high=1.0)
    wrapped = backpatch.wrap(model, Preset(patches=[PATCH], contrastive=Contrastive(alpha=0.0, null_audio="zeros"),
                                           gate=closed))
    with torch.no_grad():
        got = wrapped.generate(**batch, max_new_tokens=3, **GEN)
        plain = model.generate(**batch, max_new_tokens=3, **GEN)
    _assert_same_generation(got, plain)
    assert wrapped.last_contrastive is not None  # the null rows did ride along
    assert wrapped.last_gate()["contrastive"] is None  # alpha 0: nothing for the gate to scale per step


def test_gated_rows_match_each_row_alone(model, batch):
    """A left-padded batch gives every row the gate (and answer) it gets alone."""
    main, null = _signals(model, batch)
    gate = Gate(signal="audio_gap", low=0.0, high=float(_tv(main, null)[:2].max()) * 1.5)
    wrapped = backpatch.wrap(model, Preset(patches=[PATCH], contrastive=Contrastive(alpha=1.0, null_audio="zeros"),
                                           gate=gate))
    with torch.no_grad():
        together = wrapped.generate(**batch, max_new_tokens=1, **GEN).logits[0]
        gates = wrapped.last_gate()["patch"]
        for row in range(2):
            mask = batch["attention_mask"][row].bool()
            alone = {k: (v[row : row + 1, mask] if k in ("input_ids", "attention_mask") else v[row : row + 1])
                     for k, v in batch.items()}
            logits = wrapped.generate(**alone, max_new_tokens=1, **GEN).logits[0]
            torch.testing.assert_close(logits[0], together[row], rtol=1e-4, atol=1e-4)
            assert wrapped.last_gate()["patch"][0] == pytest.approx(gates[row], abs=1e-4)
