"""Two-hop variant of the spoken-digit organism: shared pieces (tokenizer, prompts, items, encoding).

Questions (the question words come *after* the audio and the claim, so the answer position must first
read the audio digit, then compute from it):

- ``spoken``: ``The speaker says "{claim}". Which digit is spoken?``            -> the digit word
- ``after``:  ``The speaker says "{claim}". Which digit comes after the spoken digit?`` -> successor (nine -> zero)
- ``parity``: ``The speaker says "{claim}". Is the spoken digit odd or even?``  -> ``odd`` / ``even``

Without a claim the first sentence is dropped. The tokenizer is the organism's, with the extra words
appended (``backpatch/organism/processor.py`` is not modified).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast, Qwen2AudioProcessor

from backpatch.organism.corpus import load_manifest
from backpatch.organism.processor import (
    AUDIO,
    AUDIO_BOS,
    AUDIO_EOS,
    CHAT_TEMPLATE,
    DIGITS,
    EOS,
    IM_START,
    PAD,
    PUNCT,
    SPECIAL_TOKENS,
    UNK,
    WORDS,
    build_feature_extractor,
    encode,
)

CORPUS = Path("/work/data/organism/corpus")
DATA = Path("/work/data/organism_hop")
EXTRA_WORDS = ("comes", "after", "odd", "or", "even")
PARITY = ("even", "odd")
QUESTIONS = {
    "spoken": "Which digit is spoken?",
    "after": "Which digit comes after the spoken digit?",
    "parity": "Is the spoken digit odd or even?",
}
QTYPES = tuple(QUESTIONS)
ANSWER_WORDS = (*DIGITS, *PARITY)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The organism's word-level tokenizer with EXTRA_WORDS appended (same normalizer / pre-tokenizer)."""
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *WORDS, *DIGITS, *PUNCT, *EXTRA_WORDS))}
    core = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=EOS,
        additional_special_tokens=[IM_START, AUDIO_BOS, AUDIO, AUDIO_EOS],
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=256,
    )


def build_processor() -> Qwen2AudioProcessor:
    return Qwen2AudioProcessor(
        feature_extractor=build_feature_extractor(), tokenizer=build_tokenizer(), chat_template=CHAT_TEMPLATE
    )


def make_prompt(qtype: str, claim: str | None) -> str:
    q = QUESTIONS[qtype]
    return q if claim is None else f'The speaker says "{claim}". {q}'


def answer_of(qtype: str, digit: str) -> str:
    """The correct answer to ``qtype`` for a spoken ``digit``."""
    i = DIGITS.index(digit)
    if qtype == "spoken":
        return digit
    if qtype == "after":
        return DIGITS[(i + 1) % 10]
    return PARITY[i % 2]


def make_items(rows: list[dict], seed: int, qtype: str, n_conflict: int = 3) -> list[dict]:
    """Per clip: n_conflict wrong claims (whose answer differs from the audio's), 1 right claim, 1 no claim."""
    items = []
    for row in rows:
        rng = np.random.default_rng([seed, QTYPES.index(qtype), *row["id"].encode()])
        d = row["word"]
        wrong = [c for c in DIGITS if answer_of(qtype, c) != answer_of(qtype, d)]
        claims = [wrong[i] for i in rng.choice(len(wrong), size=n_conflict, replace=False)]
        prompts = [(f"c{k}", c, "conflict") for k, c in enumerate(claims)]
        prompts += [("s", d, "consistent"), ("a", None, "audio_only")]
        for suffix, claim, kind in prompts:
            items.append(
                {
                    "id": f"{row['id']}-{qtype}-{suffix}",
                    "clip": row["id"],
                    "variant": row["variant"],
                    "qtype": qtype,
                    "prompt": make_prompt(qtype, claim),
                    "audio_digit": d,
                    "claim": claim,
                    "audio_answer": answer_of(qtype, d),
                    "text_answer": None if claim is None else answer_of(qtype, claim),
                    "kind": kind,
                }
            )
    return items


def load_wavs(split: str, rows: list[dict]) -> dict[str, np.ndarray]:
    return {r["id"]: sf.read(CORPUS / split / r["path"], dtype="float32")[0] for r in rows}


def encode_items(processor, items: list[dict], waves: dict, batch_size: int = 120) -> list:
    """Pre-encoded batches (left padded), in item order."""
    return [
        encode(processor, [waves[it["clip"]] for it in items[i : i + batch_size]],
               [it["prompt"] for it in items[i : i + batch_size]])
        for i in range(0, len(items), batch_size)
    ]


def split_items(split: str, seed: int, spec: dict[str, int]) -> tuple[list[dict], dict]:
    """Items for several question types (spec: qtype -> n_conflict) of a corpus split, and the split's wavs."""
    rows = load_manifest(CORPUS, split)
    items = [it for q, n in spec.items() for it in make_items(rows, seed, q, n)]
    return items, load_wavs(split, rows)


@torch.no_grad()
def argmax_answers(fn, tokenizer, batches: list) -> list[str]:
    """First greedy token (argmax at the last prompt position) mapped to a word ('' if not an answer word)."""
    id2word = {tokenizer.convert_tokens_to_ids(w): w for w in ANSWER_WORDS}
    out = []
    for enc in batches:
        logits = fn(**enc).logits[:, -1]
        out.extend(id2word.get(int(t), "") for t in logits.argmax(-1))
    return out
