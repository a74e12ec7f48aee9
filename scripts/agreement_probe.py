"""Issue 28: the plain first-token logits of smol-whisper with the audio and with null (silent) audio, on validation
items only: the clean validation set and the every-family perturbed validation set (every control item, and the
first conflict of each clip). scripts/agreement_frontier.py scores contrastive settings, gates and guards on them
under the per-family no-harm rule. About 19 min on 2 cores (5760 items); the file is about 1.1 GB.

    python scripts/agreement_probe.py --data /work/data/smol/perturbed-families/validation/conflicts.jsonl \
        --clean /work/data/smol/conflicts/validation/conflicts.jsonl --out /work/probe/logits.pt
"""

from __future__ import annotations

import argparse

import torch
from tqdm.auto import tqdm

from backpatch.calibrate.sweep import _first_token_logits, null_inputs
from backpatch.evaluate import encode_items
from backpatch.items import load_conflict_set
from backpatch.loading import load_model_and_processor
from backpatch.methods.contrastive import silence_frame
from backpatch.paired import perturbation_family
from backpatch.wrapper import BackpatchedModel


def family(item) -> str:
    return perturbation_family(item.perturbation) or "clean"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--clean", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--conflicts-per-clip", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=48)
    args = ap.parse_args()
    model, processor = load_model_and_processor("organism:smol-whisper")
    wrapped = BackpatchedModel(model, "smol-whisper", processor)
    items = []
    for path in (args.clean, args.data):
        for item in load_conflict_set(path):
            if item.kind != "conflict" or int(item.id.rsplit("-c", 1)[1]) < args.conflicts_per_clip:
                items.append(item)
    silence = silence_frame(processor)
    main_l, null_l = [], []
    keys = wrapped.resolved.audio_feature_keys
    gen = wrapped.resolved.generator
    for start in tqdm(range(0, len(items), args.batch_size), desc="forward", mininterval=30):
        chunk = items[start : start + args.batch_size]
        inputs = encode_items(processor, chunk)
        main_l.append(_first_token_logits(gen, inputs).half())
        null_l.append(_first_token_logits(gen, null_inputs(inputs, keys, "silence", silence)).half())
    torch.save({"main": torch.cat(main_l), "null": torch.cat(null_l),
                "items": [dict(id=i.id, kind=i.kind, audio_answer=i.audio_answer, text_answer=i.text_answer,
                               family=family(i)) for i in items]}, args.out)


if __name__ == "__main__":
    main()
