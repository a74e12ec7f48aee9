"""The short path (DESIGN section 1: capture and patched prefill share layers 0..t_min), per family.

Every family says in the architecture table whether it takes the short path; these tests count decoder-layer
calls to see which path really runs (plain + s_max - t_min on the short path, plain + s_max + 1 on the two-pass
path) and check that both paths give the same logits (rtol = atol = 1e-5 against each other, 1e-4 against the
independent reference, as in test_families.py).
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
from families import BUILDERS
from reference import reference_logits
from tiny import AUDIO_TOKEN
from transformers import Qwen2AudioForConditionalGeneration

import backpatch
from backpatch import Contrastive, Patch, Preset
from backpatch.engine import ARCHITECTURES

KWARGS = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
FAMILIES = sorted(BUILDERS)
# t_min = 1, s_max = 3 of 4 layers: the short path saves 2 of the two-pass path's 4 extra layer calls
PATCHES = [Patch(source=3, target=1, scale=0.8), Patch(source=2, target=1, scale=1.0, mode="replace",
                                                        positions="last")]
SHORT_PATH_FAMILIES = {"qwen2_audio", "qwen2_5_omni_thinker", "qwen2_5_omni", "qwen3_omni_moe_thinker",
                       "qwen3_omni_moe", "voxtral", "audioflamingo3", "musicflamingo", "granite_speech",
                       "granite_speech_plus", "phi4_multimodal", "glmasr", "qwen3_asr", "fun_asr_nano"}


@functools.cache
def family(name):
    return BUILDERS[name]()


def two_pass(wrapped: backpatch.BackpatchedModel) -> backpatch.BackpatchedModel:
    """The same wrapper forced onto the two-pass path (what every family ran before the short path)."""
    wrapped._resolved = dataclasses.replace(wrapped.resolved, short_path=False)
    return wrapped


class LayerCalls:
    """Counts forward calls of ``layers`` with hooks of the test's own."""

    def __init__(self, layers) -> None:
        self.calls = 0
        self.handles = [layer.register_forward_pre_hook(self._count) for layer in layers]

    def _count(self, *_):
        self.calls += 1

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def test_the_table_says_which_families_take_the_short_path():
    assert {name for name in BUILDERS if ARCHITECTURES[name].short_path} == SHORT_PATH_FAMILIES


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_runs_its_path_and_both_paths_give_the_same_logits(name):
    fam = family(name)
    preset = Preset(patches=PATCHES)
    short, old = backpatch.wrap(fam.model, preset), two_pass(backpatch.wrap(fam.model, preset))
    generator = short.resolved.generator
    counter = LayerCalls(fam.layers)
    try:
        with torch.no_grad():
            plain = generator.generate(**fam.batch, max_new_tokens=3, **KWARGS)
            plain_calls = counter.take()
            got = short.generate(**fam.batch, max_new_tokens=3, **KWARGS)
            short_calls = counter.take()
            want = old.generate(**fam.batch, max_new_tokens=3, **KWARGS)
            old_calls = counter.take()
    finally:
        counter.close()
    expected_path = "short" if name in SHORT_PATH_FAMILIES else "two-pass"
    assert short.last_session.path == expected_path
    assert old.last_session.path == "two-pass"
    t_min, s_max = 1, 3
    assert old_calls == plain_calls + s_max + 1
    assert short_calls == plain_calls + (s_max - t_min if expected_path == "short" else s_max + 1)
    for a, b in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    reference = reference_logits(
        fam.model, fam.layers, fam.batch,
        [{"source": p.source, "target": p.target, "scale": p.scale, "mode": p.mode, "positions": p.positions}
         for p in PATCHES],
        short.resolved.audio_token_id, forward=fam.logits,
    )
    torch.testing.assert_close(got.logits[0], reference, rtol=1e-4, atol=1e-4)
    if name != "gemma3n":  # tiny Gemma 3n: layers 2-3 reuse the K/V of 0-1, a patch at layer 1 never shows
        assert not torch.allclose(got.logits[0], plain.logits[0], atol=1e-3), "the patch changed nothing"
    assert backpatch.backpatch_hook_count(fam.model) == 0


@pytest.mark.parametrize("name", sorted(SHORT_PATH_FAMILIES))
def test_scale_zero_on_the_short_path_is_bit_identical_to_plain(name):
    fam = family(name)
    wrapped = backpatch.wrap(fam.model, Preset(patches=[Patch(source=2, target=1, scale=0.0,
                                                              positions="audio+last")]))
    with torch.no_grad():
        out = wrapped.generate(**fam.batch, max_new_tokens=3, **KWARGS)
        ref = wrapped.resolved.generator.generate(**fam.batch, max_new_tokens=3, **KWARGS)
    assert wrapped.last_session.path == "short"
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits, strict=True))


def test_contrastive_decoding_takes_the_short_path_when_it_pays_and_matches_two_pass(model, batch):
    """The short path captures both streams of the doubled batch: taken when 2 (s - t) <= s + 1."""
    contrastive = Contrastive(alpha=1.0, null_audio="zeros")
    near = Preset(patches=[Patch(source=3, target=2, scale=1.5, positions="audio+last")], contrastive=contrastive)
    far = Preset(patches=[Patch(source=5, target=0, scale=1.5)], contrastive=contrastive)
    for preset, path in ((near, "short"), (far, "two-pass")):
        wrapped = backpatch.wrap(model, preset)
        got = wrapped.generate(**batch, max_new_tokens=4, **KWARGS)
        assert wrapped.last_session.path == path
        want = two_pass(backpatch.wrap(model, preset)).generate(**batch, max_new_tokens=4, **KWARGS)
        assert torch.equal(got.sequences, want.sequences)
        for a, b in zip(got.logits, want.logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert backpatch.backpatch_hook_count(model) == 0


def test_short_path_capture_is_not_recorded_in_output_hidden_states(model, batch):
    preset = Preset(patches=[Patch(source=4, target=1, scale=1.0)])
    kwargs = dict(max_new_tokens=2, output_hidden_states=True, output_attentions=True, **KWARGS)
    # plain first: transformers installs its recording hooks on the first call that asks for outputs, and on
    # either path a hook installed after backpatch's sees the patched state of the target layer
    plain = model.generate(**batch, **kwargs)
    wrapped = backpatch.wrap(model, preset)
    got = wrapped.generate(**batch, **kwargs)
    assert wrapped.last_session.path == "short"
    want = two_pass(backpatch.wrap(model, preset)).generate(**batch, **kwargs)
    for field in ("hidden_states", "attentions"):
        assert [len(step) for step in getattr(got, field)] == [len(step) for step in getattr(plain, field)]
        for step_got, step_want in zip(getattr(got, field), getattr(want, field), strict=True):
            for a, b in zip(step_got, step_want, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_layers_of_another_attention_type_between_t_and_s_take_the_two_pass_path(model, batch):
    """A layer after t_min with another attention type gets another mask: that call takes the two-pass path."""
    config = copy.deepcopy(model.config)
    config.text_config.layer_types = ["full_attention"] * 3 + ["sliding_attention"] * 3
    config.text_config.sliding_window, config.text_config.use_sliding_window = 8, True
    sliding = Qwen2AudioForConditionalGeneration(config).eval()
    sliding.load_state_dict(model.state_dict())
    sliding.generation_config.pad_token_id, sliding.generation_config.eos_token_id = 0, None
    assert sliding.model.language_model.has_sliding_layers
    layers = sliding.model.language_model.layers
    for patch, path in ((Patch(source=2, target=0, scale=1.5), "short"), (Patch(source=4, target=1), "two-pass"),
                        (Patch(source=5, target=3, scale=1.5), "short")):
        wrapped = backpatch.wrap(sliding, Preset(patches=[patch]))
        got = wrapped.generate(**batch, max_new_tokens=1, **KWARGS).logits[0]
        assert wrapped.last_session.path == path
        want = reference_logits(sliding, layers, batch, [{"source": patch.source, "target": patch.target,
                                                          "scale": patch.scale, "mode": "add",
                                                          "positions": "audio"}], AUDIO_TOKEN)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the sliding layers really see another mask (else this test would prove nothing)
    plain_full, plain_sliding = model(**batch).logits[:, -1], sliding(**batch).logits[:, -1]
    assert not torch.allclose(plain_full, plain_sliding, atol=1e-4)


def test_a_call_with_per_layer_inputs_takes_the_two_pass_path():
    """Qwen3-Omni adds deepstack visual embeddings between early layers (image or video input): such a call
    cannot give later layers the arguments of layer t_min."""
    from backpatch.engine import Call, CallHooks
    from backpatch.methods.backpatching import PatchSession

    resolved = backpatch.wrap(family("qwen3_omni_moe_thinker").model, Preset(patches=PATCHES)).resolved
    assert resolved.per_layer_inputs == ("deepstack_visual_embeds",)
    call = Call(resolved, resolved.methods, CallHooks(), null_rows=False, resources={})
    session = PatchSession(call, resolved.setting("patches"))
    assert session._short_path_fits(resolved.text_model, {"deepstack_visual_embeds": None})
    assert not session._short_path_fits(resolved.text_model, {"deepstack_visual_embeds": [torch.zeros(1, 32)]})
