"""Semantics of back-patched generate() on a tiny random Qwen2-Audio (DESIGN section 1, issue: core engine)."""

from __future__ import annotations

import threading

import pytest
import torch
from reference import reference_logits
from tiny import AUDIO_TOKEN, NUM_LAYERS, collate, make_row
from transformers import LogitsProcessor, LogitsProcessorList

import backpatch
from backpatch import Patch, Preset


def first_logits(model_like, batch, **kwargs):
    out = model_like.generate(
        **batch, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True, **kwargs
    )
    return out.logits[0]


def layers_of(model):
    return model.model.language_model.layers


@pytest.mark.parametrize("mode", ["add", "replace", "interpolate"])
@pytest.mark.parametrize("positions", ["audio", "last", "audio+last"])
def test_first_token_logits_equal_reference(model, batch, mode, positions):
    preset = Preset(patches=[Patch(source=-2, target=1, scale=0.7, mode=mode, positions=positions)])
    got = first_logits(backpatch.wrap(model, preset), batch)
    want = reference_logits(
        model, layers_of(model), batch,
        [{"source": NUM_LAYERS - 2, "target": 1, "scale": 0.7, "mode": mode, "positions": positions}], AUDIO_TOKEN,
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = first_logits(model, batch)
    # the patch must really change the audio rows (otherwise the comparison above proves nothing)
    assert not torch.allclose(got[:2], plain[:2], atol=1e-4)


@pytest.mark.parametrize("mode", ["add", "replace", "interpolate"])
def test_norm_matched_patch_equals_reference_and_differs_from_the_plain_combine(model, batch, mode):
    """match_norm: the captured states are rescaled, per position, to the norm of the target layer's states."""
    patch = dict(source=NUM_LAYERS - 1, target=1, scale=0.7, mode=mode, positions="audio")
    got = first_logits(backpatch.wrap(model, Preset(patches=[Patch(**patch, match_norm=True)])), batch)
    want = reference_logits(model, layers_of(model), batch, [{**patch, "match_norm": True}], AUDIO_TOKEN)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    unmatched = first_logits(backpatch.wrap(model, Preset(patches=[Patch(**patch)])), batch)
    assert not torch.allclose(got[:2], unmatched[:2], atol=1e-4)


def test_match_norm_false_is_bit_identical_to_no_key_over_several_tokens(model, batch):
    kwargs = dict(max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        off = backpatch.wrap(model, Preset(patches=[Patch(source=4, target=1, match_norm=False)])).generate(
            **batch, **kwargs)
        absent = backpatch.wrap(model, Preset(patches=[Patch(source=4, target=1)])).generate(**batch, **kwargs)
    assert torch.equal(off, absent)


def test_several_patches_and_negative_indices_equal_reference(model, batch):
    patches = [
        Patch(source=-1, target=0, scale=0.5, mode="add"),
        Patch(source=4, target=2, scale=0.3, mode="interpolate", positions="last"),
        Patch(source=-3, target=0, scale=1.0, mode="replace", positions="last"),
    ]
    got = first_logits(backpatch.wrap(model, Preset(patches=patches)), batch)
    want = reference_logits(
        model, layers_of(model), batch,
        [
            {"source": 5, "target": 0, "scale": 0.5, "mode": "add", "positions": "audio"},
            {"source": 4, "target": 2, "scale": 0.3, "mode": "interpolate", "positions": "last"},
            {"source": 3, "target": 0, "scale": 1.0, "mode": "replace", "positions": "last"},
        ],
        AUDIO_TOKEN,
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_patched_forward_equals_reference(model, batch):
    preset = Preset(patches=[Patch(source=4, target=1, scale=2.0)])
    wrapped = backpatch.wrap(model, preset)
    with torch.no_grad():
        got = wrapped(**batch).logits[:, -1]
    want = reference_logits(
        model, layers_of(model), batch,
        [{"source": 4, "target": 1, "scale": 2.0, "mode": "add", "positions": "audio"}], AUDIO_TOKEN,
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_scale_zero_is_bit_identical_over_several_tokens(model, batch):
    wrapped = backpatch.wrap(model, Preset(patches=[Patch(source=5, target=0, scale=0.0)]))
    kwargs = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    out = wrapped.generate(**batch, **kwargs)
    ref = model.generate(**batch, **kwargs)
    assert wrapped.last_session.patched_prefills == 1
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        assert torch.equal(a, b)


def test_left_padded_rows_equal_rows_run_alone(model):
    rows = [make_row(10, 40), make_row(11, 24), make_row(12, None), make_row(13, 34, text_len=9)]
    wrapped = backpatch.wrap(model, Preset(patches=[Patch(source=-1, target=1, scale=1.5, positions="audio+last")]))
    kwargs = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    together = wrapped.generate(**collate(rows), **kwargs)
    for i, row in enumerate(rows):
        alone = wrapped.generate(**collate([row]), **kwargs)
        for step_together, step_alone in zip(together.logits, alone.logits, strict=True):
            torch.testing.assert_close(step_together[i], step_alone[0], rtol=1e-4, atol=1e-4)


def test_text_only_rows_are_identical_to_plain(model, batch):
    wrapped = backpatch.wrap(model, Preset(patches=[Patch(source=-1, target=0, scale=3.0, positions="audio+last")]))
    kwargs = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    out, ref = wrapped.generate(**batch, **kwargs), model.generate(**batch, **kwargs)
    assert torch.equal(out.sequences[2], ref.sequences[2])
    for a, b in zip(out.logits, ref.logits, strict=True):
        assert torch.equal(a[2], b[2])
    # a batch with no audio at all is left completely alone
    text_only = collate([make_row(3, None), make_row(4, None)])
    out, ref = wrapped.generate(**text_only, **kwargs), model.generate(**text_only, **kwargs)
    assert wrapped.last_session.patched_prefills == 0
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits, strict=True))


def test_disabled_is_plain_and_enabled_again_after(model, batch):
    wrapped = backpatch.wrap(model, Preset(patches=[Patch(source=-1, target=0, scale=2.0)]))
    plain = first_logits(model, batch)
    with wrapped.disabled():
        assert torch.equal(first_logits(wrapped, batch), plain)
    assert not torch.allclose(first_logits(wrapped, batch)[:2], plain[:2], atol=1e-4)


def test_attribute_access_falls_through_and_unwrap_returns_model(model):
    wrapped = backpatch.wrap(model, Preset(patches=[Patch(source=-1, target=0)]))
    assert wrapped.config is model.config
    assert wrapped.device == model.device
    assert wrapped.base_model is model
    assert wrapped.unwrap() is model
    assert backpatch.backpatch_hook_count(model) == 0
    with pytest.raises(TypeError, match="already wrapped"):
        backpatch.wrap(wrapped, Preset(patches=[Patch(source=-1, target=0)]))


def test_return_types_match_hf_generate(model, batch):
    wrapped = backpatch.wrap(model, Preset(patches=[Patch(source=-1, target=0)]))
    assert isinstance(wrapped.generate(**batch, max_new_tokens=2), torch.Tensor)
    out = wrapped.generate(**batch, max_new_tokens=3, return_dict_in_generate=True, output_scores=True)
    ref = model.generate(**batch, max_new_tokens=3, return_dict_in_generate=True, output_scores=True)
    assert type(out) is type(ref)
    assert type(out).__name__ == "GenerateDecoderOnlyOutput"
    assert len(out.scores) == 3 and out.scores[0].shape == ref.scores[0].shape


def test_sampling_with_seed_is_reproducible_and_scale_zero_matches_plain(model, batch):
    wrapped = backpatch.wrap(model, Preset(patches=[Patch(source=-1, target=0, scale=1.0)]))

    def sample(m):
        torch.manual_seed(123)
        return m.generate(**batch, max_new_tokens=5, do_sample=True, top_k=0, temperature=1.0)

    assert torch.equal(sample(wrapped), sample(wrapped))
    zero = backpatch.wrap(model, Preset(patches=[Patch(source=-1, target=0, scale=0.0)]))
    assert torch.equal(sample(zero), sample(model))


def test_beam_search_runs_patched_and_scale_zero_matches_plain(model, batch):
    wrapped = backpatch.wrap(model, Preset(patches=[Patch(source=-1, target=0, scale=1.0)]))
    out = wrapped.generate(**batch, max_new_tokens=3, num_beams=3, do_sample=False, num_return_sequences=2)
    assert out.shape[0] == 2 * batch["input_ids"].shape[0]
    assert wrapped.last_session.patched_prefills == 1
    zero = backpatch.wrap(model, Preset(patches=[Patch(source=-1, target=0, scale=0.0)]))
    plain = model.generate(**batch, max_new_tokens=3, num_beams=3, do_sample=False, num_return_sequences=2)
    assert torch.equal(zero.generate(**batch, max_new_tokens=3, num_beams=3, do_sample=False,
                                     num_return_sequences=2), plain)


def test_beam_search_first_scores_equal_reference(model, batch):
    """Beams are expanded before the prefill; the patch must follow the expanded rows."""
    wrapped = backpatch.wrap(model, Preset(patches=[Patch(source=-2, target=1, scale=1.0)]))
    out = wrapped.generate(**batch, max_new_tokens=1, num_beams=2, do_sample=False,
                           output_logits=True, return_dict_in_generate=True)
    want = reference_logits(
        model, layers_of(model), batch,
        [{"source": 4, "target": 1, "scale": 1.0, "mode": "add", "positions": "audio"}], AUDIO_TOKEN,
    )
    torch.testing.assert_close(out.logits[0][::2], want, rtol=1e-5, atol=1e-5)


class _CountingLayers:
    """Counts decoder-layer and audio-encoder forward calls with hooks of the test's own."""

    def __init__(self, model):
        self.layer_calls = 0
        self.encoder_calls = 0
        self.prefill_layer_calls = 0
        self.handles = [layer.register_forward_pre_hook(self._layer) for layer in layers_of(model)]
        self.handles.append(model.model.audio_tower.register_forward_pre_hook(self._encoder))

    def _layer(self, module, args):
        self.layer_calls += 1
        if args[0].shape[1] > 1:
            self.prefill_layer_calls += 1

    def _encoder(self, module, args):
        self.encoder_calls += 1

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("source", [2, 4, 5])
def test_no_waste_counts(model, batch, source):
    """Layers 0..t_min run once and the capture stops after the deepest source layer (the short path: plain +
    s_max - t_min layer calls); the audio encoder runs once per generate()."""
    new_tokens = 4
    counter = _CountingLayers(model)
    try:
        model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
        plain_layers, plain_encoder = counter.layer_calls, counter.encoder_calls
        counter.layer_calls = counter.encoder_calls = 0
        wrapped = backpatch.wrap(model, Preset(patches=[Patch(source=source, target=0), Patch(source=1, target=0)]))
        wrapped.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
    finally:
        counter.close()
    assert plain_encoder == 1
    assert counter.encoder_calls == 1
    assert counter.layer_calls == plain_layers + (source - 0)  # s_max - t_min, t_min = 0


def test_no_hook_runs_during_decode_and_capture_holds_only_patched_positions(model, batch):
    wrapped = backpatch.wrap(model, Preset(patches=[Patch(source=-1, target=1), Patch(source=3, target=0,
                                                                                     positions="last")]))
    seen_shapes = []

    def inspect(module, args, output):
        session = wrapped.last_session
        seen_shapes.extend(tuple(t.shape) for t in session._captured.values())

    # layer 1 runs after the capture on both paths (the short path captures in layer 0's hook, t_min = 0), and
    # this probe runs before the session's hooks
    probe = layers_of(model)[1].register_forward_hook(inspect)

    class HookCounter(LogitsProcessor):
        counts = []

        def __call__(self, input_ids, scores):
            self.counts.append(backpatch.backpatch_hook_count(model))
            return scores

    try:
        wrapped.generate(
            **batch, max_new_tokens=4, do_sample=False, logits_processor=LogitsProcessorList([HookCounter()])
        )
    finally:
        probe.remove()
    assert HookCounter.counts == [0, 0, 0, 0]
    n_audio = int((batch["input_ids"] == AUDIO_TOKEN).sum())
    hidden = model.config.text_config.hidden_size
    # at the patched prefill: exactly the audio positions, and one last position per audio row
    assert sorted(seen_shapes[:2]) == sorted([(n_audio, hidden), (2, hidden)])


class _Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [_Boom, KeyboardInterrupt])
@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_hooks_removed_after_exceptions(model, batch, exc, when):
    wrapped = backpatch.wrap(model, Preset(patches=[Patch(source=-1, target=0)]))
    calls = {"n": 0}

    def raiser(module, args):
        calls["n"] += 1
        if when == "prefill" or args[0].shape[1] == 1:
            raise exc("stop")

    handle = layers_of(model)[2].register_forward_pre_hook(raiser)
    try:
        with pytest.raises(exc):
            wrapped.generate(**batch, max_new_tokens=3)
    finally:
        handle.remove()
    assert backpatch.backpatch_hook_count(model) == 0
    # and the model still works, patched, afterwards
    assert wrapped.generate(**batch, max_new_tokens=1).shape[1] == batch["input_ids"].shape[1] + 1


def test_apply_patches_in_place_and_cleans_up(model, batch):
    preset = Preset(patches=[Patch(source=-1, target=0, scale=2.0)])
    plain = first_logits(model, batch)
    patched = first_logits(backpatch.wrap(model, preset), batch)
    with backpatch.apply(model, preset):
        assert torch.equal(first_logits(model, batch), patched)
    assert "generate" not in model.__dict__
    assert torch.equal(first_logits(model, batch), plain)
    with pytest.raises(_Boom):
        with backpatch.apply(model, preset):
            raise _Boom
    assert "generate" not in model.__dict__
    assert backpatch.backpatch_hook_count(model) == 0


def test_weights_are_never_modified(model, batch):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = backpatch.wrap(model, Preset(patches=[Patch(source=-1, target=0, scale=4.0, mode="replace")]))
    wrapped.generate(**batch, max_new_tokens=3)
    with backpatch.apply(model, wrapped.preset):
        model.generate(**batch, max_new_tokens=3)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_threads_do_not_mix_hooks(model):
    presets = [Preset(patches=[Patch(source=-1, target=0, scale=s)]) for s in (0.5, 3.0)]
    wrappers = [backpatch.wrap(model, p) for p in presets]
    batches = [collate([make_row(20 + i, 40)]) for i in range(2)]
    kwargs = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    expected = [wrappers[i].generate(**batches[i], **kwargs).logits[0] for i in range(2)]
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors = []

    def worker(i):
        try:
            for rep in range(4):
                results[(i, rep)] = wrappers[i].generate(**batches[i], **kwargs).logits[0]
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (i, _), logits in results.items():
        torch.testing.assert_close(logits, expected[i], rtol=1e-5, atol=1e-5)
    assert backpatch.backpatch_hook_count(model) == 0


def test_nested_patched_call_in_one_thread_is_refused(model, batch):
    wrapped = backpatch.wrap(model, Preset(patches=[Patch(source=-1, target=0)]))

    class Nested(LogitsProcessor):
        def __call__(self, input_ids, scores):
            wrapped.generate(**batch, max_new_tokens=1)
            return scores

    with pytest.raises(backpatch.BackpatchRuntimeError, match="already running"):
        wrapped.generate(**batch, max_new_tokens=1, logits_processor=LogitsProcessorList([Nested()]))
    assert backpatch.backpatch_hook_count(model) == 0


def test_inputs_embeds_only_gives_clear_error(model, batch):
    wrapped = backpatch.wrap(model, Preset(patches=[Patch(source=-1, target=0)]))
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with pytest.raises(backpatch.BackpatchRuntimeError, match="input_ids"):
        wrapped.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], max_new_tokens=1)
    assert backpatch.backpatch_hook_count(model) == 0


def test_streamers_yield_the_generated_text():
    from tiny import tiny_with_processor
    from transformers import TextIteratorStreamer, TextStreamer

    from backpatch.inputs import build_inputs, decode_new_tokens

    model, processor = tiny_with_processor()
    model.generation_config.eos_token_id = None
    wrapped = backpatch.wrap(model, Preset(patches=[Patch(source=-1, target=0, scale=2.0)]))
    wave = torch.randn(12000).numpy() * 0.1
    inputs = build_inputs(processor, [wave], ['The speaker says "three". Which digit is spoken?'])
    n = inputs["input_ids"].shape[1]

    class Collect(TextStreamer):
        chunks: list[str] = []

        def on_finalized_text(self, text, stream_end=False):
            self.chunks.append(text)

    streamer = Collect(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = wrapped.generate(**inputs, max_new_tokens=5, do_sample=False, streamer=streamer)
    expected = decode_new_tokens(processor, out, n)[0]
    assert expected and "".join(Collect.chunks).strip() == expected

    iterator = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(target=wrapped.generate,
                              kwargs=dict(**inputs, max_new_tokens=5, do_sample=False, streamer=iterator))
    thread.start()
    streamed = "".join(iterator)
    thread.join()
    assert streamed.strip() == expected
    assert backpatch.backpatch_hook_count(model) == 0


def test_unexpanded_audio_placeholder_gives_clear_error(model):
    """Qwen2-Audio expands a single audio token inside the model (legacy path): positions would not line up."""
    row = make_row(0, 40)
    n = sum(1 for t in row["ids"] if t == AUDIO_TOKEN)
    row["ids"] = [t for t in row["ids"] if t != AUDIO_TOKEN]
    row["ids"].insert(1, AUDIO_TOKEN)
    assert n > 1
    wrapped = backpatch.wrap(model, Preset(patches=[Patch(source=-1, target=0)]))
    with pytest.raises(backpatch.BackpatchRuntimeError, match="expand the audio placeholder"):
        wrapped(**collate([row]))
    assert backpatch.backpatch_hook_count(model) == 0
