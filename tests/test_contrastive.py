"""Audio-aware contrastive decoding: equals a direct two-forward reference, costs one batched forward per token."""

from __future__ import annotations

import pytest
import torch
import yaml
from reference import reference_logits
from tiny import AUDIO_TOKEN, NUM_LAYERS, tiny_with_processor

import backpatch
from backpatch import Contrastive, Patch, Preset, PresetError

GEN = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)


def null_batch(batch, null="zeros", value=0.0):
    out = dict(batch)
    out["input_features"] = torch.full_like(batch["input_features"], value)
    return out


def direct(model, batch, alpha, null_value=0.0, patches=None):
    """Two plain full forwards (audio, null audio), combined: the definition, with no cache and no hooks."""
    main = (reference_logits(model, model.model.language_model.layers, batch, patches, AUDIO_TOKEN) if patches
            else model(**batch).logits[:, -1])
    null = model(**null_batch(batch, value=null_value)).logits[:, -1]
    return (1 + alpha) * main - alpha * null


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_first_step_equals_two_forward_reference(model, batch, alpha):
    wrapped = backpatch.wrap(model, Preset(contrastive=Contrastive(alpha=alpha, null_audio="zeros")))
    with torch.no_grad():
        got = wrapped.generate(**batch, max_new_tokens=1, **GEN).logits[0]
        want = direct(model, batch, alpha)
        plain = model.generate(**batch, max_new_tokens=1, **GEN).logits[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[:2], plain[:2], atol=1e-3)
    assert backpatch.backpatch_hook_count(model) == 0


def test_later_step_equals_two_forward_reference_on_the_generated_prefix(model, batch):
    alpha = 1.5
    wrapped = backpatch.wrap(model, Preset(contrastive=Contrastive(alpha=alpha, null_audio="zeros")))
    with torch.no_grad():
        out = wrapped.generate(**batch, max_new_tokens=4, **GEN)
        prefix = out.sequences[:, : batch["input_ids"].shape[1] + 2]  # prompt + 2 generated tokens
        extended = dict(batch, input_ids=prefix,
                        attention_mask=torch.cat([batch["attention_mask"], torch.ones(3, 2, dtype=torch.long)], 1))
        want = direct(model, extended, alpha)
    torch.testing.assert_close(out.logits[2], want, rtol=1e-4, atol=1e-4)


def test_silence_null_audio_uses_the_feature_extractors_silent_frames():
    model, processor = tiny_with_processor()
    model.generation_config.eos_token_id = None
    from backpatch.inputs import build_inputs

    inputs = build_inputs(processor, [torch.randn(9000).numpy() * 0.1], ['The speaker says "three". Which digit?'])
    silent = processor.feature_extractor(torch.zeros(16000).numpy(), sampling_rate=16000,
                                         return_tensors="pt")["input_features"]
    value = float(silent[0, 0, 0])
    assert torch.all(silent == value)  # Whisper log-mel of silence is one constant
    wrapped = backpatch.wrap(model, Preset(contrastive=Contrastive(alpha=1.0, null_audio="silence")),
                             processor=processor)
    with torch.no_grad():
        got = wrapped.generate(**inputs, max_new_tokens=1, **GEN).logits[0]
        null = dict(inputs)
        null["input_features"] = torch.full_like(inputs["input_features"], value)
        want = 2 * model(**inputs).logits[:, -1] - model(**null).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(PresetError, match="silence needs the processor"):
        backpatch.wrap(model, Preset(contrastive=Contrastive(alpha=1.0, null_audio="silence")))


def test_alpha_zero_is_bit_identical_to_plain(model, batch):
    wrapped = backpatch.wrap(model, Preset(contrastive=Contrastive(alpha=0.0, null_audio="zeros")))
    out, ref = wrapped.generate(**batch, max_new_tokens=4, **GEN), model.generate(**batch, max_new_tokens=4, **GEN)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits, strict=True))


class _Calls:
    def __init__(self, module):
        self.shapes = []
        self.handle = module.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.shapes.append(tuple(kwargs["inputs_embeds"].shape[:2]))


def test_one_batched_forward_per_generated_token_never_a_full_recompute(model, batch):
    new_tokens = 5
    wrapped = backpatch.wrap(model, Preset(contrastive=Contrastive(alpha=1.0, null_audio="zeros")))
    calls = _Calls(model.model.language_model)
    try:
        wrapped.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
    finally:
        calls.handle.remove()
    rows, length = batch["input_ids"].shape
    assert len(calls.shapes) == new_tokens  # one text-model forward per generated token, both streams in it
    assert wrapped.last_contrastive.forward_calls == new_tokens
    assert calls.shapes[0] == (2 * rows, length)  # prefill: main + null rows
    assert calls.shapes[1:] == [(2 * rows, 1)] * (new_tokens - 1)  # decode: one new position, from the KV cache


def test_composes_with_backpatching_main_stream_patched_null_stream_not(model, batch):
    alpha = 1.0
    patch = dict(source=NUM_LAYERS - 1, target=0, scale=1.5, mode="add", positions="audio+last")
    preset = Preset(patches=[Patch(source=-1, target=0, scale=1.5, positions="audio+last")],
                    contrastive=Contrastive(alpha=alpha, null_audio="zeros"))
    calls = _Calls(model.model.language_model)
    try:
        with torch.no_grad():
            got = backpatch.wrap(model, preset).generate(**batch, max_new_tokens=1, **GEN).logits[0]
    finally:
        calls.handle.remove()
    with torch.no_grad():
        want = direct(model, batch, alpha, patches=[patch])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    rows, length = batch["input_ids"].shape
    # the real prefill carries both streams; the capture pass only the main rows (null rows are never patched)
    assert calls.shapes == [(2 * rows, length), (rows, length)]


def test_plausibility_cut_keeps_only_plausible_tokens(model, batch):
    preset = Preset(contrastive=Contrastive(alpha=1.0, null_audio="zeros", plausibility=0.1))
    with torch.no_grad():
        got = backpatch.wrap(model, preset).generate(**batch, max_new_tokens=1, **GEN).logits[0]
        probs = model(**batch).logits[:, -1].softmax(-1)
    eligible = probs >= 0.1 * probs.amax(-1, keepdim=True)
    assert torch.all(got[~eligible] == torch.finfo(got.dtype).min)
    torch.testing.assert_close(got[eligible], direct(model, batch, 1.0)[eligible], rtol=1e-5, atol=1e-5)


def test_agreement_guard_keeps_the_answers_the_audio_raised(model, batch):
    """Rows whose top token the audio raised over null audio by >= the threshold keep the audio-conditioned logits;
    the others get the contrastive combine (issue 28's guard)."""
    from backpatch.methods.contrastive import agreement_signal

    with torch.no_grad():
        main = model(**batch).logits[:, -1].float()
        null = model(**null_batch(batch)).logits[:, -1].float()
    signal = agreement_signal(main, null)
    threshold = float(signal.median())
    kept = signal >= threshold
    assert kept.any() and not kept.all()  # the median splits the rows: both branches are checked
    preset = Preset(contrastive=Contrastive(alpha=1.0, null_audio="zeros", agreement=threshold))
    with torch.no_grad():
        got = backpatch.wrap(model, preset).generate(**batch, max_new_tokens=1, **GEN).logits[0]
    torch.testing.assert_close(got[kept], main[kept], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[~kept], direct(model, batch, 1.0)[~kept], rtol=1e-5, atol=1e-5)
    assert backpatch.backpatch_hook_count(model) == 0


def test_sampling_beam_search_and_returned_cache(model, batch):
    wrapped = backpatch.wrap(model, Preset(contrastive=Contrastive(alpha=1.0, null_audio="zeros")))
    torch.manual_seed(0)
    a = wrapped.generate(**batch, max_new_tokens=4, do_sample=True, top_k=0)
    torch.manual_seed(0)
    assert torch.equal(a, wrapped.generate(**batch, max_new_tokens=4, do_sample=True, top_k=0))
    out = wrapped.generate(**batch, max_new_tokens=3, num_beams=3, do_sample=False, num_return_sequences=2,
                           output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape[0] == 6
    # first beam step: every beam of a row starts from the same prompt, so its logits are the reference's
    torch.testing.assert_close(out.logits[0][::3], direct(model, batch, 1.0), rtol=1e-5, atol=1e-5)
    # the cache handed back holds the main stream only
    greedy = wrapped.generate(**batch, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert greedy.cache.layers[0].keys.shape[0] == batch["input_ids"].shape[0]
    assert backpatch.backpatch_hook_count(model) == 0


@pytest.mark.parametrize(
    "block,message",
    [
        ({"alpha": -1}, "contrastive.alpha: must be >= 0"),
        ({"alpha": "big"}, "contrastive.alpha: expected a number"),
        ({"null_audio": "noise"}, "contrastive.null_audio: 'noise' is not allowed; use one of: silence, zeros"),
        ({"plausibility": 1.5}, "contrastive.plausibility: must be in [0, 1]"),
        ({"agreement": "high"}, "contrastive.agreement: expected a number"),
        ({"alhpa": 1}, "contrastive.alhpa: unknown key; allowed keys here: alpha, null_audio, plausibility, agreement"),
    ],
)
def test_contrastive_block_validation(tmp_path, block, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "c", "contrastive": block}))
    with pytest.raises(PresetError, match=rf"^{path}: " + message.replace("[", r"\[").replace("]", r"\]")):
        Preset.from_yaml(path)


def test_preset_needs_patches_or_contrastive(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: c\ncontrastive: {alpha: 2.0, null_audio: zeros}\n")
    preset = Preset.from_yaml(path)
    assert preset.patches == [] and preset.contrastive == Contrastive(alpha=2.0, null_audio="zeros")
    assert Preset.from_yaml_text(preset.to_yaml()) == preset
    path.write_text("name: c\n")
    with pytest.raises(PresetError, match="patches: required key is missing"):
        Preset.from_yaml(path)
    with pytest.raises(PresetError, match="at least one patch .* or a contrastive, attention or steering block"):
        Preset(patches=[])


def test_attention_block_composes_with_backpatching_and_contrastive(model, batch):
    """MATA + a patch + contrastive decoding (a combination calibration scores): the capture pass carries the main
    rows only while the attention mask was read from the doubled prefill; the first step must be
    (1 + alpha) (attention + patch on the audio) - alpha (attention alone on null audio; null rows are not patched)."""
    alpha = 1.0
    attention = backpatch.Attention(layers=[0, NUM_LAYERS - 1], alpha=1.0, form="add")
    patch = Patch(source=-1, target=0, scale=1.5, positions="audio+last")
    preset = Preset(patches=[patch], attention=attention, contrastive=Contrastive(alpha=alpha, null_audio="zeros"))
    with torch.no_grad():
        got = backpatch.wrap(model, preset).generate(**batch, max_new_tokens=1, **GEN).logits[0]
        main = backpatch.wrap(model, Preset(patches=[patch], attention=attention)).generate(
            **batch, max_new_tokens=1, **GEN).logits[0]
        null = backpatch.wrap(model, Preset(attention=attention)).generate(
            **null_batch(batch), max_new_tokens=1, **GEN).logits[0]
        unbiased = backpatch.wrap(model, Preset(patches=[patch])).generate(**batch, max_new_tokens=1, **GEN).logits[0]
    torch.testing.assert_close(got, (1 + alpha) * main - alpha * null, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(main, unbiased, atol=1e-4), "the attention block changed nothing: the test proves nothing"
    assert backpatch.backpatch_hook_count(model) == 0
