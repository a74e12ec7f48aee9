"""Sanity checks of the shipped organism (offline load, audio-token expansion, batching, size, examples).

README "`digits`: trained from scratch": checks the organism that `scripts/organism/reproduce.sh` rebuilds
(`backpatch/organism/TRAINING.md` names it); it regenerates no number itself.

Run: PYTHONPATH=. HF_HUB_OFFLINE=1 python scripts/organism/check_organism.py [--model DIR] [--data JSONL]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import soundfile as sf
import torch
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

from backpatch.organism.conflicts import answer, load_items, score
from backpatch.organism.processor import conversation, encode

HERE = Path(__file__).resolve().parents[2] / "backpatch" / "organism"


def main() -> None:
    """Run every check; exit non-zero on the first failure."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=HERE / "digits")
    p.add_argument("--data", type=Path, default=HERE / "examples" / "examples.jsonl")
    args = p.parse_args()
    torch.set_num_threads(2)
    size = sum(f.stat().st_size for f in args.model.iterdir())
    assert size <= 10 * 2**20, f"organism is {size} bytes"
    processor = AutoProcessor.from_pretrained(args.model)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(args.model).eval()
    items = load_items(args.data)
    root = args.data.parent
    wav = sf.read(root / items[0]["audio"], dtype="float32")[0]

    # (a) one-call recipe == (b) two-step recipe
    conv = conversation(items[0]["prompt"], wav)
    a = processor.apply_chat_template(
        conv, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    b = encode(processor, [wav], [items[0]["prompt"]])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), "recipes differ"

    # <|AUDIO|> expansion == encoder output length
    n_tok = int((b["input_ids"] == model.config.audio_token_id).sum())
    _, out_len = model.model.audio_tower._get_feat_extract_output_lengths(b["feature_attention_mask"].sum(-1))
    with torch.no_grad():
        enc = model.model.audio_tower(b["input_features"]).last_hidden_state
    assert n_tok == int(out_len) <= enc.shape[1], (n_tok, out_len, enc.shape)

    # batched (left padding) == one by one
    batch = items[:8]
    together = answer(model, processor, batch, root, batch_size=8)
    alone = [answer(model, processor, [it], root, batch_size=1)[0] for it in batch]
    assert together == alone, (together, alone)

    # metrics on the given set, per kind and per voice
    answers = answer(model, processor, items, root)
    per_voice: Counter = Counter()
    for it, ans in zip(items, answers, strict=True):
        if it["kind"] == "audio_only":
            voice = Path(it["audio"]).stem.split("-")[2]
            per_voice[(voice, ans == it["audio_answer"])] += 1
    voices = sorted({v for v, _ in per_voice})
    res = {
        "bytes": size,
        "audio_tokens": n_tok,
        "metrics": score(items, answers),
        "audio_only_by_voice": {
            v: f"{per_voice[(v, True)]}/{per_voice[(v, True)] + per_voice[(v, False)]}" for v in voices
        },
    }
    sys.stdout.write(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
