"""The real processors' placeholder expansion gives exactly the span that backpatch patches.

backpatch patches the positions ``input_ids == audio_token_id`` (DESIGN section 1) and trusts the processor to have
expanded one placeholder per audio embedding. The other tests build that layout by hand; here each family's own
processor (built offline: a Whisper feature extractor from constructor arguments plus a tiny local WordLevel
tokenizer, as in arch-research.md section (g)) turns two clips of different lengths (0.7 s, 1.3 s) into a left-padded
batch the way ``backpatch.inputs.build_inputs`` does (the chat template, then the processor: what ``run``, ``eval``
and ``calibrate`` do), and a tiny random model of the same family, whose config matches the processor (audio token
id, vocabulary, mel bins, encoder length), checks that:

* the model accepts the inputs (it raises when the placeholder count differs from the number of audio embeddings),
  and the positions where it scattered audio embeddings into ``inputs_embeds`` are exactly
  ``input_ids == audio_token_id``;
* ``wrap(...).generate`` patches exactly those positions (layer 0's output differs from the plain run there and
  nowhere else), changes the first-token logits of every row, and leaves no hook behind;
* ``backpatch run`` loads a saved non-Qwen2-Audio checkpoint + processor (Audio Flamingo 3; the processor's
  save_pretrained/AutoProcessor round trip works, chat template included) with the right Auto classes and answers.

``build_inputs`` pads only the text (``text_kwargs={"padding": True}``): a top-level ``padding=True`` would reach the
feature extractor too and pad the mel features to the longest clip instead of the whole window, which the Flamingo
and GLM-ASR encoders need (``test_build_inputs_keeps_the_feature_window`` guards this).

Families covered: Qwen2-Audio (the organism's processor), Audio Flamingo 3, Music Flamingo and GLM-ASR. The
Flamingo feature extractors use 1 s windows, so the 1.3 s clip spans two windows (the multi-window expansion);
GLM-ASR uses 2 s windows because its processor counts tokens from the summed valid frames of all windows, which
matches the encoder's per-window count only when a full window gives a multiple of 4 frames after the stride-2 conv
(3000 mel frames in the real checkpoints, 200 here). Left out because their processors cannot be built in this
environment: Gemma 3n (its processor needs pillow, not installed), Qwen2.5-Omni / Qwen3-Omni and Phi-4-multimodal
(image/video processors: pillow and torchvision), Granite Speech (torchaudio) and Voxtral (mistral-common).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import transformers as T
from families import TEXT, _sharpen
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast, WhisperFeatureExtractor

import backpatch
from backpatch.inputs import build_inputs

RATE = 16000
SECONDS = (0.7, 1.3)
PROMPTS = ("Transcribe this", "Describe the music in this clip")
WORDS = ("system", "user", "assistant", "transcribe", "describe", "the", "music", "in", "this", "clip", ".", ",")
PAD, UNK, IM_START, IM_END = "<pad>", "<unk>", "<|im_start|>", "<|im_end|>"
PATCH = backpatch.Preset(patches=[backpatch.Patch(source=-1, target=0)], name="p")


def _chat_template(audio_block: str) -> str:
    """ChatML with the family's audio block for each audio item of a user message (like the hub templates)."""
    return (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        f"{{% if c['type'] == 'audio' %}}{audio_block}"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def _tokenizer(audio_tokens: tuple[str, ...]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: the prompt words, ChatML markers and the family's audio tokens (as added tokens, so
    that a run of placeholders splits into one token each)."""
    specials = (PAD, UNK, IM_START, IM_END, *audio_tokens)
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate((*specials, *WORDS))}, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, unk_token=UNK, eos_token=IM_END,
        additional_special_tokens=[IM_START, *audio_tokens], padding_side="left",
    )


def _feature_extractor(mel_bins: int, window_s: int) -> WhisperFeatureExtractor:
    """Whisper features padded to ``100 * window_s`` frames per window (10 ms hop)."""
    return WhisperFeatureExtractor(feature_size=mel_bins, sampling_rate=RATE, hop_length=160, n_fft=400,
                                   chunk_length=window_s)


def _text(vocab: int, **extra) -> dict:
    assert vocab <= TEXT["vocab_size"]
    return dict(TEXT, **extra)


@dataclass
class Case:
    model: torch.nn.Module
    processor: object
    audio_token_id: int


def qwen2_audio() -> Case:
    from backpatch.organism.processor import build_processor

    processor = build_processor()  # 80 mel bins, one 2 s window (200 frames) per clip
    audio_id = processor.tokenizer.convert_tokens_to_ids(processor.audio_token)
    cfg = T.Qwen2AudioConfig(
        audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                          num_mel_bins=processor.feature_extractor.feature_size,
                          max_source_positions=processor.feature_extractor.nb_max_frames // 2),
        text_config=dict(model_type="qwen2", **_text(len(processor.tokenizer))), audio_token_index=audio_id)
    return Case(T.Qwen2AudioForConditionalGeneration(cfg), processor, audio_id)


def _flamingo(config_cls, model_cls, processor_cls, audio_tokens: tuple[str, ...], block: str, **ids) -> Case:
    tokenizer = _tokenizer(audio_tokens)
    fe = _feature_extractor(16, window_s=1)
    processor = processor_cls(feature_extractor=fe, tokenizer=tokenizer, chat_template=_chat_template(block))
    audio_id = tokenizer.convert_tokens_to_ids("<sound>")
    cfg = config_cls(
        audio_config=dict(model_type="audioflamingo3_encoder", hidden_size=32, intermediate_size=64,
                          num_hidden_layers=1, num_attention_heads=2, num_mel_bins=fe.feature_size,
                          max_source_positions=fe.nb_max_frames // 2),
        text_config=dict(model_type="qwen2", **_text(len(tokenizer))), audio_token_id=audio_id,
        **{k: tokenizer.convert_tokens_to_ids(v) for k, v in ids.items()})
    return Case(model_cls(cfg), processor, audio_id)


def audioflamingo3() -> Case:
    return _flamingo(T.AudioFlamingo3Config, T.AudioFlamingo3ForConditionalGeneration, T.AudioFlamingo3Processor,
                     ("<sound>",), "<sound>")


def musicflamingo() -> Case:
    # the processor wraps the expanded span in <|sound_bos|> ... <|sound_eos|> itself
    return _flamingo(T.MusicFlamingoConfig, T.MusicFlamingoForConditionalGeneration, T.MusicFlamingoProcessor,
                     ("<sound>", "<|sound_bos|>", "<|sound_eos|>"), "<sound>",
                     audio_bos_token_id="<|sound_bos|>", audio_eos_token_id="<|sound_eos|>")


def glmasr() -> Case:
    tokenizer = _tokenizer(("<|pad|>", "<|begin_of_audio|>", "<|end_of_audio|>"))
    fe = _feature_extractor(16, window_s=2)
    processor = T.GlmAsrProcessor(feature_extractor=fe, tokenizer=tokenizer,
                                  chat_template=_chat_template("<|begin_of_audio|><|pad|><|end_of_audio|>"))
    audio_id = tokenizer.convert_tokens_to_ids("<|pad|>")
    cfg = T.GlmAsrConfig(
        audio_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                          num_mel_bins=fe.feature_size),  # intermediate_size = 4 * hidden_size (4-frame merge)
        text_config={k: v for k, v in _text(len(tokenizer)).items() if k != "head_dim"}
        | dict(eos_token_id=[tokenizer.eos_token_id]),
        audio_token_id=audio_id)
    return Case(T.GlmAsrForConditionalGeneration(cfg), processor, audio_id)


CASES: dict[str, Callable[[], Case]] = {f.__name__: f for f in (qwen2_audio, audioflamingo3, musicflamingo, glmasr)}


def _clips(seconds=SECONDS) -> list[np.ndarray]:
    return [(0.3 * np.sin(2 * np.pi * (300 + 200 * i) * np.arange(int(s * RATE)) / RATE)).astype(np.float32)
            for i, s in enumerate(seconds)]


_encode = build_inputs  # the library's own recipe: chat template, then the processor, left-padded

@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    torch.manual_seed(0)
    built = CASES[request.param]()
    _sharpen(built.model)
    return built, _encode(built.processor, _clips(), list(PROMPTS))


# A top-level padding=True would be forwarded by ProcessorMixin to the feature extractor, which would then pad to the
# longest clip instead of the window ("max_length"); Qwen2AudioProcessor forces max_length for audio, the others do
# not, and their encoders need whole windows. build_inputs pads the text only; this guards it.


@pytest.mark.parametrize("family", [
    "qwen2_audio",
    "audioflamingo3",
    "musicflamingo",
    "glmasr",
])
def test_build_inputs_keeps_the_feature_window(family):
    """A clip shorter than one window, through the library's own input builder (what `run`/`eval` use)."""
    built = CASES[family]()
    inputs = build_inputs(built.processor, _clips((0.7,)), [PROMPTS[0]])
    assert inputs["input_features"].shape[-1] == built.processor.feature_extractor.nb_max_frames
    with torch.no_grad():
        built.model(**inputs)


def _text_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.model.language_model


def test_processor_batch_is_left_padded_with_one_span_per_clip(case):
    built, inputs = case
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    audio = ids == built.audio_token_id
    counts = audio.sum(1).tolist()
    assert counts[0] < counts[1], counts  # 0.7 s vs 1.3 s
    assert not mask[:, -1].eq(0).any() and mask[:, 0].eq(0).any()  # left padding
    for row in range(ids.shape[0]):
        where = audio[row].nonzero().flatten()
        assert torch.equal(where, torch.arange(int(where[0]), int(where[0]) + counts[row])), "span not contiguous"
    assert not (audio & (mask == 0)).any()


def test_model_scatters_audio_exactly_at_the_placeholders(case):
    built, inputs = case
    seen = {}

    def grab(_module, _args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = _text_model(built.model).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            built.model(**inputs)  # raises if placeholders != audio embeddings
    finally:
        handle.remove()
    ids = inputs["input_ids"]
    with torch.no_grad():
        text_only = built.model.get_input_embeddings()(ids)
    scattered = (seen["embeds"] != text_only).any(-1)
    assert torch.equal(scattered, ids == built.audio_token_id)


def test_backpatch_patches_the_processor_span(case):
    built, inputs = case
    model = built.model
    layer1_inputs: list[torch.Tensor] = []

    def grab(_module, args, kwargs):  # input of layer 1 = output of layer 0 (the target), after any patch
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == inputs["input_ids"].shape[1]:
            layer1_inputs.append(hidden.detach().clone())

    kwargs = dict(max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True)
    handle = model.model.language_model.layers[1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            plain = model.generate(**inputs, **kwargs)
            plain_h = layer1_inputs[-1]
            wrapped = backpatch.wrap(model, PATCH, processor=built.processor)
            patched = wrapped.generate(**inputs, **kwargs)
            patched_h = layer1_inputs[-1]
    finally:
        handle.remove()
    assert backpatch.backpatch_hook_count(model) == 0
    audio = inputs["input_ids"] == built.audio_token_id
    changed = (patched_h - plain_h).abs().amax(-1) > 1e-6
    assert torch.equal(changed, audio)
    first_plain, first_patched = plain.logits[0], patched.logits[0]
    for row in range(first_plain.shape[0]):
        assert not torch.allclose(first_plain[row], first_patched[row], atol=1e-4), f"row {row} unchanged"


def test_audio_span_token_resolves_through_the_processor(case):
    """A preset naming the placeholder by its string resolves to the same id the processor expands."""
    built, inputs = case
    token = built.processor.tokenizer.convert_ids_to_tokens(built.audio_token_id)
    by_token = backpatch.Preset(patches=PATCH.patches, audio_span=backpatch.AudioSpan(token=token), name="t")
    kwargs = dict(max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        a = backpatch.wrap(built.model, PATCH).generate(**inputs, **kwargs).logits[0]
        b = backpatch.wrap(built.model, by_token, processor=built.processor).generate(**inputs, **kwargs).logits[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("seconds", [1.3, 0.7])
def test_cli_runs_a_saved_audioflamingo3_checkpoint(tmp_path, capsys, seconds):
    """1.3 s = one full 1 s window + a partial one, so the features happen to be padded to a whole window."""
    import soundfile as sf

    from backpatch.cli import main
    from backpatch.loading import load_model_and_processor

    torch.manual_seed(0)
    built = audioflamingo3()
    _sharpen(built.model)
    built.model.save_pretrained(tmp_path)
    built.processor.save_pretrained(tmp_path)
    wav = tmp_path / "clip.wav"
    sf.write(str(wav), _clips((seconds,))[0], RATE)
    preset = tmp_path / "p.yaml"
    PATCH.to_yaml(preset)

    loaded, processor = load_model_and_processor(str(tmp_path))
    assert type(loaded) is T.AudioFlamingo3ForConditionalGeneration
    assert type(processor) is T.AudioFlamingo3Processor

    code = main(["run", "--model", str(tmp_path), "--preset", str(preset), "--audio", str(wav),
                 "--prompt", "Transcribe this", "--max-new-tokens", "2"])
    assert code == 0
    out = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines() if ":" in line)
    assert "plain" in out and "back-patched -1->0" in out  # the second answer's label: what the preset does
    assert out["preset"].strip() == "p [-1->0 add x1 @audio]"
