"""One test body, every audio-LLM family: reference equivalence per mode, scale-0 identity, apply() hygiene."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from families import BUILDERS
from reference import reference_logits

import backpatch
from backpatch import Patch, Preset
from backpatch.engine import ARCHITECTURES

KWARGS = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)


@functools.cache
def family(name):
    return BUILDERS[name]()


FAMILIES = sorted(BUILDERS)
# (mode, positions): every mode, and every kind of positions along the way
SETTINGS = [("add", "audio"), ("replace", "last"), ("interpolate", "audio+last")]


def test_every_family_is_in_the_registry():
    assert set(BUILDERS) <= set(ARCHITECTURES)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("mode,positions", SETTINGS)
def test_first_token_logits_equal_reference(name, mode, positions):
    fam = family(name)
    # target 0: in tiny Gemma 3n, layers 2-3 reuse layer 0-1 K/V, so audio states patched at layer 1 would
    # never reach the answer position (a real property of KV sharing, not a bug)
    wrapped = backpatch.wrap(fam.model, Preset(patches=[Patch(source=-1, target=0, scale=0.8, mode=mode,
                                                              positions=positions)]))
    assert wrapped.resolved.layers is fam.layers
    with torch.no_grad():
        got = wrapped.generate(**fam.batch, max_new_tokens=1, **KWARGS).logits[0]
        plain = wrapped.resolved.generator.generate(**fam.batch, max_new_tokens=1, **KWARGS).logits[0]
    audio_token = wrapped.resolved.audio_token_id
    assert int((fam.batch["input_ids"] == audio_token).sum()) > 0
    want = reference_logits(
        fam.model, fam.layers, fam.batch,
        [{"source": len(fam.layers) - 1, "target": 0, "scale": 0.8, "mode": mode, "positions": positions}],
        audio_token, forward=fam.logits,
    )
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3), "the patch did not change the logits: the test proves nothing"
    assert backpatch.backpatch_hook_count(fam.model) == 0


@pytest.mark.parametrize("name", FAMILIES)
def test_scale_zero_is_bit_identical_to_plain_generate(name):
    fam = family(name)
    wrapped = backpatch.wrap(fam.model, Preset(patches=[Patch(source=-1, target=0, scale=0.0,
                                                              positions="audio+last")]))
    with torch.no_grad():
        out = wrapped.generate(**fam.batch, max_new_tokens=3, **KWARGS)
        ref = wrapped.resolved.generator.generate(**fam.batch, max_new_tokens=3, **KWARGS)
    assert wrapped.last_session.patched_prefills == 1
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits, strict=True))


@pytest.mark.parametrize("name", FAMILIES)
def test_apply_patches_generate_in_place_and_leaves_no_hooks(name):
    fam = family(name)
    preset = Preset(patches=[Patch(source=-1, target=0, scale=1.5)])
    wrapped = backpatch.wrap(fam.model, preset)
    generator = wrapped.resolved.generator
    with torch.no_grad():
        expected = wrapped.generate(**fam.batch, max_new_tokens=2, **KWARGS).logits
        with backpatch.apply(fam.model, preset):
            inside = generator.generate(**fam.batch, max_new_tokens=2, **KWARGS).logits
        after = generator.generate(**fam.batch, max_new_tokens=2, **KWARGS).logits
    assert all(torch.equal(a, b) for a, b in zip(inside, expected, strict=True))
    assert not torch.allclose(after[0], expected[0], atol=1e-3)
    assert "generate" not in generator.__dict__
    assert backpatch.backpatch_hook_count(fam.model) == 0


def test_full_omni_generate_is_back_patched_inside_apply():
    """Qwen3-Omni's own generate() (text only) goes through .thinker, which apply() patches."""
    fam = family("qwen3_omni_moe")
    preset = Preset(patches=[Patch(source=-1, target=1, scale=1.5)])
    wrapped = backpatch.wrap(fam.model, preset)
    assert wrapped.resolved.generator is fam.model.thinker
    kwargs = dict(return_audio=False, thinker_max_new_tokens=2, thinker_do_sample=False)
    with torch.no_grad():
        expected = wrapped.generate(**fam.batch, max_new_tokens=2, do_sample=False)
        plain = fam.model.generate(**fam.batch, **kwargs)
        with backpatch.apply(fam.model, preset):
            inside = fam.model.generate(**fam.batch, **kwargs)
    assert torch.equal(inside, expected)
    assert plain.shape == inside.shape
    assert backpatch.backpatch_hook_count(fam.model) == 0


def test_gemma3n_patches_every_altup_stream():
    fam = family("gemma3n")
    seen = []
    handle = fam.layers[1].register_forward_hook(lambda m, a, o: seen.append(o.dim()))
    try:
        backpatch.wrap(fam.model, Preset(patches=[Patch(source=3, target=1)])).generate(**fam.batch, max_new_tokens=1)
    finally:
        handle.remove()
    assert seen[0] == 4  # [K, B, T, H]; equality with the reference above covers all K streams


@pytest.mark.parametrize("name", FAMILIES)
def test_contrastive_decoding_equals_two_forward_reference(name):
    """The null stream rides along as extra batch rows; M-RoPE positions, features re-sent on decode (Phi-4)
    and per-family feature keys must all survive the doubling."""
    fam = family(name)
    preset = Preset(patches=[Patch(source=-1, target=0, scale=0.5)],
                    contrastive=backpatch.Contrastive(alpha=1.0, null_audio="zeros"))
    wrapped = backpatch.wrap(fam.model, preset)
    null = {k: torch.zeros_like(v) if k in wrapped.resolved.audio_feature_keys else v for k, v in fam.batch.items()}
    assert any(k in wrapped.resolved.audio_feature_keys for k in fam.batch)
    with torch.no_grad():
        out = wrapped.generate(**fam.batch, max_new_tokens=3, **KWARGS)
        main = reference_logits(
            fam.model, fam.layers, fam.batch,
            [{"source": len(fam.layers) - 1, "target": 0, "scale": 0.5, "mode": "add", "positions": "audio"}],
            wrapped.resolved.audio_token_id, forward=fam.logits,
        )
        want = 2 * main - fam.logits(null)[:, -1].float()
    torch.testing.assert_close(out.logits[0], want, rtol=1e-4, atol=1e-4)
    assert out.sequences.shape[0] == fam.batch["input_ids"].shape[0]
    assert backpatch.backpatch_hook_count(fam.model) == 0


@pytest.mark.parametrize("name", FAMILIES)
def test_gated_patches_equal_the_reference_with_the_measured_gate(name):
    """The audio-confidence gate on every family: the capture runs the whole text model and the LM head for the
    unpatched distribution (audio_gap: both streams), each row's patch is scaled by its own strength, and a
    closed gate is plain generation bit for bit."""
    fam = family(name)
    patch = {"source": len(fam.layers) - 1, "target": 0, "scale": 0.8, "mode": "add", "positions": "audio"}
    contrastive = backpatch.Contrastive(alpha=0.0, null_audio="zeros")
    probe = backpatch.wrap(fam.model, Preset(patches=[Patch(**patch)], contrastive=contrastive,
                                             gate=backpatch.Gate("audio_gap", 0.0, 0.0)))
    with torch.no_grad():
        probe.generate(**fam.batch, max_new_tokens=1, **KWARGS)
    measured = torch.tensor(probe.last_gate()["patch"])
    assert measured.shape[0] == fam.batch["input_ids"].shape[0] and bool((measured == 1.0).all())
    # random audio barely moves a tiny model's answer (audio_gap ~ 1e-8, all float noise): the numbers are
    # checked with the certainty signal, which is O(1) on every family
    with torch.no_grad():
        log_p = fam.logits(fam.batch)[:, -1].float().log_softmax(-1)
    certainty = torch.exp((log_p.exp() * log_p).sum(-1))
    # a ramp around the measured values (whatever the random init made them) so every row's strength is partial
    c_min, c_max = float(certainty.min()), float(certainty.max())
    width = max(c_max - c_min, 1e-3)
    gate = backpatch.Gate("certainty", max(0.0, c_min - width / 2), min(1.0, c_max + width / 2))
    wrapped = backpatch.wrap(fam.model, Preset(patches=[Patch(**patch)], gate=gate))
    with torch.no_grad():
        got = wrapped.generate(**fam.batch, max_new_tokens=1, **KWARGS).logits[0]
        strength = wrapped.last_session.gate_values
        torch.testing.assert_close(strength, gate.strength(certainty), rtol=0, atol=1e-4)
        assert bool(((strength > 0.05) & (strength < 0.95)).any()), "the test needs a partial gate"
        want = reference_logits(fam.model, fam.layers, fam.batch, [patch], wrapped.resolved.audio_token_id,
                                forward=fam.logits, row_gate=strength)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        closed = backpatch.wrap(fam.model, Preset(patches=[Patch(**patch)], gate=backpatch.Gate("certainty", 1.0, 1.0)))
        out = closed.generate(**fam.batch, max_new_tokens=2, **KWARGS)
        plain = wrapped.resolved.generator.generate(**fam.batch, max_new_tokens=2, **KWARGS)
    assert torch.equal(out.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, plain.logits, strict=True))
    assert backpatch.backpatch_hook_count(fam.model) == 0


def _mata_reference(fam, first, last, alpha, form, steps):
    """Logits of ``steps`` greedy tokens with the reference MATA eager attention in layers first..last."""
    import sys

    from reference import mata_eager

    from backpatch.methods.attention import attention_module

    wrapped = backpatch.wrap(fam.model, Preset(patches=[Patch(source=-1, target=0, scale=0.0)]))
    audio = fam.batch["input_ids"] == wrapped.resolved.audio_token_id
    targets = {id(attention_module(fam.layers[i], i)) for i in range(first, last + 1)}
    modules = {sys.modules[type(attention_module(layer, i)).__module__] for i, layer in enumerate(fam.layers)}
    saved = {m: m.eager_attention_forward for m in modules}
    config = attention_module(fam.layers[0], 0).config  # the text model's: the encoders keep theirs
    config._attn_implementation = "eager"
    try:
        for m in modules:
            m.eager_attention_forward = mata_eager(saved[m], targets, audio, alpha, form)
        with torch.no_grad():
            return wrapped.resolved.generator.generate(**fam.batch, max_new_tokens=steps, **KWARGS).logits
    finally:
        for m in modules:
            m.eager_attention_forward = saved[m]
        config._attn_implementation = "sdpa"


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("form", ["scale", "add"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_attention_block_equals_the_raw_score_reference(name, form, implementation):
    """MATA (issue 20): with SDPA and with eager attention, the attention block's logits at prefill and at two decode
    steps equal a reference eager attention that edits the raw scores of the last query row (independent code)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    fam = family(name)
    first, last, alpha = 1, 2, 0.8
    before = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    want = _mata_reference(fam, first, last, alpha, form, steps=3)
    preset = Preset(name="mata", attention=backpatch.Attention(layers=[first, last], alpha=alpha, form=form))
    wrapped = backpatch.wrap(fam.model, preset)
    config = fam.layers[0].self_attn.config
    config._attn_implementation = implementation
    try:
        with torch.no_grad():
            got = wrapped.generate(**fam.batch, max_new_tokens=3, **KWARGS).logits
            plain = wrapped.resolved.generator.generate(**fam.batch, max_new_tokens=3, **KWARGS).logits
    finally:
        config._attn_implementation = "sdpa"
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {step}")
    assert not torch.allclose(got[0], plain[0], atol=1e-4), "the block changed nothing: the test proves nothing"
    # one biased attention call per target layer and forward pass (prefill and two decode steps)
    assert wrapped.last_attention.biased_calls == (last - first + 1) * 3
    assert dict(ALL_ATTENTION_FUNCTIONS._local_mapping) == before
    assert all(layer.self_attn.config is config for layer in fam.layers)  # every module has its own config back
    assert backpatch.backpatch_hook_count(fam.model) == 0


@pytest.mark.parametrize("name", FAMILIES)
def test_attention_block_at_alpha_zero_is_bit_identical_and_composes_with_patches(name):
    fam = family(name)
    zero = Preset(name="z", attention=backpatch.Attention(layers=[0, -1], alpha=0.0))
    wrapped = backpatch.wrap(fam.model, zero)
    with torch.no_grad():
        out = wrapped.generate(**fam.batch, max_new_tokens=3, **KWARGS)
        ref = wrapped.resolved.generator.generate(**fam.batch, max_new_tokens=3, **KWARGS)
    assert torch.equal(out.sequences, ref.sequences) and wrapped.last_attention is None
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits, strict=True))
    # with a patch: the attention acts in the capture pass and the patched pass alike (one call per layer each)
    both = Preset(name="b", patches=[Patch(source=-1, target=0, scale=0.5)],
                  attention=backpatch.Attention(layers=[1, 1], alpha=0.5, form="add"))
    with torch.no_grad():
        combined = backpatch.wrap(fam.model, both)
        combined.generate(**fam.batch, max_new_tokens=1, **KWARGS)
    assert combined.last_attention.biased_calls >= 1 and backpatch.backpatch_hook_count(fam.model) == 0


@pytest.mark.parametrize("name", FAMILIES)
def test_steering_block_equals_the_two_pass_reference(name):
    """Audio-silence steering (issue 20 point 2): s from the null rows riding in the batch equals s from two separate
    forward passes; beta s on the last layer's last position at prefill and at two decode steps gives the
    reference hook's logits; with contrastive alpha 1 the first token is (1 + 1) steered - null."""
    from reference import steered, steering_vector

    fam = family(name)
    first, last = 1, len(fam.layers) - 1
    null = {k: torch.zeros_like(v) if k in backpatch.wrap(fam.model, Preset(
        patches=[Patch(-1, 0)])).resolved.audio_feature_keys else v for k, v in fam.batch.items()}
    with torch.no_grad():
        vector = steering_vector(fam.layers, fam.logits, fam.batch, null, first, last)
    # random audio barely moves some tiny models (|s| ~ 1e-6 against |h| ~ 1): a beta that makes the steering of
    # order one checks the add step; s itself is compared with the reference at float-noise tolerance
    beta = 4.0 / max(float(vector.norm(dim=-1).max()), 1e-12)
    preset = Preset(name="s", steering=backpatch.Steering(layers=[first, last], beta=beta),
                    contrastive=backpatch.Contrastive(alpha=0.0, null_audio="zeros"))
    wrapped = backpatch.wrap(fam.model, preset)
    generator = wrapped.resolved.generator
    with torch.no_grad():
        got = wrapped.generate(**fam.batch, max_new_tokens=3, **KWARGS)
        plain = generator.generate(**fam.batch, max_new_tokens=3, **KWARGS)
        ours = wrapped.last_steering.vector
        handle = steered(fam.layers, ours, beta)
        try:
            want = generator.generate(**fam.batch, max_new_tokens=3, **KWARGS)
        finally:
            handle.remove()
        moderate = dataclasses.replace(preset, steering=backpatch.Steering([first, last], 2.0),
                                       contrastive=backpatch.Contrastive(alpha=1.0, null_audio="zeros"))
        both = backpatch.wrap(fam.model, moderate).generate(**fam.batch, max_new_tokens=1, **KWARGS)
        handle = steered(fam.layers, vector, 2.0)
        try:
            steered_first = fam.logits(fam.batch)[:, -1].float()
        finally:
            handle.remove()
        null_first = fam.logits(null)[:, -1].float()
    torch.testing.assert_close(ours, vector, rtol=1e-3, atol=1e-5)
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.logits, want.logits, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {step}")
    torch.testing.assert_close(both.logits[0], 2 * steered_first - null_first, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got.logits[0], plain.logits[0], atol=1e-4), "steering changed nothing"
    assert wrapped.last_steering.steered == 3 and backpatch.backpatch_hook_count(fam.model) == 0


@pytest.mark.parametrize("name", ["qwen2_audio", "gemma3n", "phi4_multimodal"])
def test_steering_at_beta_zero_is_plain_and_composes_with_patches(name):
    fam = family(name)
    zero = Preset(name="z", steering=backpatch.Steering(layers=[0, 1], beta=0.0),
                  contrastive=backpatch.Contrastive(alpha=0.0, null_audio="zeros"))
    wrapped = backpatch.wrap(fam.model, zero)
    with torch.no_grad():
        out = wrapped.generate(**fam.batch, max_new_tokens=2, **KWARGS)
        ref = wrapped.resolved.generator.generate(**fam.batch, max_new_tokens=2, **KWARGS)
        assert wrapped.last_steering is None and wrapped.last_contrastive is None
        assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits, strict=True))
        patch = Preset(name="p", patches=[Patch(source=-2, target=0, scale=0.5)],
                       contrastive=backpatch.Contrastive(alpha=0.0, null_audio="zeros"))
        with_patch = backpatch.wrap(fam.model, patch).generate(**fam.batch, max_new_tokens=2, **KWARGS)
        combined = backpatch.wrap(fam.model, dataclasses.replace(patch, steering=backpatch.Steering([1, 2], 2.0)))
        both = combined.generate(**fam.batch, max_new_tokens=2, **KWARGS)
    assert combined.last_steering.steered == 2 and combined.last_session.patched_prefills == 1
    assert not torch.allclose(both.logits[0], with_patch.logits[0], atol=1e-4)
    assert backpatch.backpatch_hook_count(fam.model) == 0
