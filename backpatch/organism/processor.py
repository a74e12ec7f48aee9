"""The organism's processor: a tiny word-level tokenizer plus a Whisper feature extractor.

Why a hand-built processor: the organism must be loadable offline exactly like a hub checkpoint
(``AutoProcessor.from_pretrained(dir)``), and the library's eval code turns every (wav, prompt) pair into
model inputs the same way for every supported model. The organism only needs ~35 words, so a
``WordLevel`` vocabulary keeps the language model's embedding table (and the shipped weights) tiny.

Recipe for turning (wav, prompt) into model inputs, verified offline with transformers 5.24
(both forms give identical tensors; the second is what batch evaluation should use)::

    conversation = [{"role": "user", "content": [
        {"type": "audio", "audio": waveform},        # 1-D float32 numpy array at 16 kHz, or a local path
        {"type": "text", "text": prompt},
    ]}]
    # (a) one call: works offline with an in-memory array or a local wav path (read by soundfile)
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    # (b) two steps, batchable (left padding is the tokenizer default):
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], audio=[waveform], sampling_rate=16000, return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]

``inputs`` holds ``input_ids``, ``attention_mask``, ``input_features`` (B, 80, 200) and
``feature_attention_mask`` (B, 200). The processor expands the single ``<|AUDIO|>`` in the template to
``((L - 1) // 2 + 1 - 2) // 2 + 1`` copies (L = unpadded mel frames), which is exactly the number of
embeddings the encoder keeps after its stride-2 conv and average pooling. Clips longer than 2 s are cut.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast, Qwen2AudioProcessor, WhisperFeatureExtractor

# The fixed DESIGN 4b templates and digit words live in the package __init__ (single source of truth).
from backpatch.organism import AUDIO_ONLY_TEMPLATE, CLAIM_TEMPLATE, DIGITS

logger = logging.getLogger(__name__)

SAMPLING_RATE = 16000

PAD, UNK, EOS, IM_START = "<|endoftext|>", "<unk>", "<|im_end|>", "<|im_start|>"
AUDIO_BOS, AUDIO, AUDIO_EOS = "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"
SPECIAL_TOKENS = (PAD, UNK, IM_START, EOS, AUDIO_BOS, AUDIO, AUDIO_EOS)
# Template words, roles and punctuation (both quote styles, so 'three' and "three" both tokenize).
WORDS = ("system", "user", "assistant", "the", "speaker", "says", "which", "digit", "is", "spoken")
PUNCT = ('"', "'", ".", "?", ",", ":")

# Qwen2-Audio style: user turn = audio block then text; no default system turn (it would only cost tokens).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "<|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: every template word, digit and punctuation mark is one token, nothing is unk."""
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *WORDS, *DIGITS, *PUNCT))}
    core = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    # Whitespace first, then isolate punctuation so that `"three".` -> `"`, `three`, `"`, `.`
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=EOS,
        additional_special_tokens=[IM_START, AUDIO_BOS, AUDIO, AUDIO_EOS],
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=256,
    )
    return tok


def build_feature_extractor() -> WhisperFeatureExtractor:
    """80 mel bins, 10 ms hop, 2 s window: 200 frames -> 100 encoder positions -> at most 50 audio tokens."""
    return WhisperFeatureExtractor(
        feature_size=80, sampling_rate=SAMPLING_RATE, hop_length=160, chunk_length=2, n_fft=400
    )


def build_processor() -> Qwen2AudioProcessor:
    """Combine feature extractor, tokenizer and chat template into a ``Qwen2AudioProcessor``."""
    return Qwen2AudioProcessor(
        feature_extractor=build_feature_extractor(), tokenizer=build_tokenizer(), chat_template=CHAT_TEMPLATE
    )


def make_prompt(claim: str | None) -> str:
    """The fixed DESIGN 4b prompt: with a claimed digit, or the audio-only question when ``claim`` is None."""
    return AUDIO_ONLY_TEMPLATE if claim is None else CLAIM_TEMPLATE.format(claim=claim)


def conversation(prompt: str, audio: np.ndarray | str | None = None) -> list[dict]:
    """One user turn holding the audio (array or local path) and the prompt text."""
    return [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": prompt}]}]


def encode(processor: Qwen2AudioProcessor, waveforms: Sequence[np.ndarray], prompts: Sequence[str],
           system: Sequence[str | None] | None = None):
    """Batch recipe (b) from the module docstring: the library's own (``backpatch.inputs.build_inputs``), so the
    organism is trained and evaluated on exactly the inputs every command gives it. ``system``: each prompt's
    system turn (a claim framed there), if any."""
    from backpatch.inputs import build_inputs

    return build_inputs(processor, waveforms, prompts, system=system)


def first_word(text: str) -> str:
    """Normalize a generated answer to its first word (lowercase, punctuation stripped)."""
    words = re.findall(r"[a-z]+", text.lower())
    return words[0] if words else ""


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: build the processor, optionally save it, and show how the fixed templates tokenize."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="directory to save the processor to (save_pretrained)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    proc = build_processor()
    for prompt in (make_prompt("three"), make_prompt(None)):
        text = proc.apply_chat_template(conversation(prompt), add_generation_prompt=True, tokenize=False)
        sys.stdout.write(f"{text!r}\n{proc.tokenizer.tokenize(text)}\n")
    sys.stdout.write(f"vocab size: {len(proc.tokenizer)}\n")
    if args.out:
        proc.save_pretrained(args.out)
        sys.stdout.write(f"saved to {args.out}\n")


if __name__ == "__main__":
    main()
