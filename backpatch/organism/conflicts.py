"""Conflict sets (DESIGN section 4) for the organism, and a plain-model evaluation of them.

Why here: the organism is only useful if it is measurably text-dominant on voices it never heard, so
this module turns the held-out validation and test splits of the corpus into conflict sets (each clip: a
few wrong claims, one right claim, one claim-free prompt) and scores a model on them with greedy
decoding through the same processor recipe the library uses (see ``backpatch.organism.processor``).

Subcommands::

    build     write {validation,test}/conflicts.jsonl (+ wav/) under --out, and the small shipped
              subset backpatch/organism/examples/ (test voices only)
    eval      plain greedy answers for a conflict set -> TDR, AFR, consistent / audio-only accuracy
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from backpatch.conflict_sets import Framing, PromptTemplates, make_conflict_items
from backpatch.evaluate import ConflictItem, judge, metrics
from backpatch.labelled_audio import Clip
from backpatch.organism import AUDIO_ONLY_TEMPLATE, CLAIM_TEMPLATE
from backpatch.organism.corpus import DEFAULT_OUT as DEFAULT_CORPUS
from backpatch.organism.corpus import load_manifest
from backpatch.organism.processor import DIGITS, encode, first_word

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("/work/data/organism/conflicts")
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
SPLITS = ("validation", "test")


#: the fixed DESIGN 4b prompts as conflict-set templates: ``'The speaker says "{claim}". Which digit is spoken?'``
TEMPLATES = PromptTemplates(AUDIO_ONLY_TEMPLATE,
                            (Framing(None, CLAIM_TEMPLATE.removesuffix(" " + AUDIO_ONLY_TEMPLATE)),))


def make_items(rows: Sequence[dict], seed: int, n_conflict: int = 3) -> list[dict]:
    """Conflict-set items for manifest rows: ``n_conflict`` distinct wrong claims, 1 consistent, 1 audio-only.

    The library's generator (``backpatch.conflict_sets.make_conflict_items``, what ``backpatch conflicts``
    runs) with the DESIGN 4b templates and the digits as claim pool, without the annotation keys. Deterministic
    in (seed, clip id). ``audio`` is ``wav/<clip id>.wav``, relative to the JSONL file.
    """
    clips = [Clip(row["id"], Path("wav") / f"{row['id']}.wav", row["word"]) for row in rows]
    return make_conflict_items(clips, TEMPLATES, labels=DIGITS, conflicts_per_clip=n_conflict, seed=seed,
                               annotate=False)


def write_set(items: Sequence[dict], src_wav_dir: Path, out_dir: Path, name: str) -> Path:
    """Write ``out_dir/name`` (JSONL) and copy the referenced wavs into ``out_dir/wav``."""
    (out_dir / "wav").mkdir(parents=True, exist_ok=True)
    for audio in sorted({it["audio"] for it in items}):
        shutil.copyfile(src_wav_dir / Path(audio).name, out_dir / audio)
    path = out_dir / name
    with open(path, "w") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")
    return path


def pick_examples(rows: Sequence[dict], seed: int, per_word: int = 3) -> list[dict]:
    """A few test clips per digit, from different voices, for the shipped demo/test subset."""
    rng = np.random.default_rng(seed)
    chosen = []
    for word in DIGITS:
        cands = [r for r in rows if r["word"] == word]
        rng.shuffle(cands)
        seen: set[str] = set()
        for r in cands:
            if r["variant"] not in seen and len(seen) < per_word:
                seen.add(r["variant"])
                chosen.append(r)
    return chosen


#: what an examples folder holds; build() replaces a folder only if it holds nothing else
_EXAMPLES_CONTENT = frozenset({"examples.jsonl", "wav"})


def _check_replaceable(folder: Path) -> None:
    """Refuse to delete a folder that is not an examples folder (a mistyped --examples, the working directory)."""
    other = sorted(p.name for p in folder.iterdir() if p.name not in _EXAMPLES_CONTENT)
    if other:
        raise ValueError(f"--examples {folder} holds other files ({', '.join(other[:5])}); it would be replaced, so "
                         "pass an examples folder (examples.jsonl + wav/) or '' to skip the examples")


def build(corpus: Path, out: Path, seed: int, n_conflict: int, examples: Path | None) -> dict[str, Path]:
    """Write the validation and test conflict sets (and optionally the shipped examples subset)."""
    paths = {}
    for split in SPLITS:
        rows = load_manifest(corpus, split)
        items = make_items(rows, seed, n_conflict)
        paths[split] = write_set(items, corpus / split / "wav", out / split, "conflicts.jsonl")
        logger.info("%s: %d items from %d clips -> %s", split, len(items), len(rows), paths[split])
    if examples is not None:
        rows = pick_examples(load_manifest(corpus, "test"), seed)
        items = make_items(rows, seed, n_conflict)
        if examples.exists():
            _check_replaceable(examples)
            shutil.rmtree(examples)
        paths["examples"] = write_set(items, corpus / "test" / "wav", examples, "examples.jsonl")
        logger.info("examples: %d items from %d clips -> %s", len(items), len(rows), paths["examples"])
    return paths


def load_items(path: Path) -> list[dict]:
    """Read a conflict-set JSONL file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def score(items: Sequence[dict], answers: Sequence[str]) -> dict:
    """DESIGN section 4 metrics (the library's :func:`backpatch.evaluate.metrics`) for JSONL rows and answers."""
    judged = [ConflictItem(it["id"], None, it["prompt"], it["audio_answer"], it.get("text_answer"), it["kind"])
              for it in items]
    return metrics(judged, [judge(answer, item) for answer, item in zip(answers, judged, strict=True)])


@torch.no_grad()
def answer(model, processor, items: Sequence[dict], root: Path, batch_size: int = 64) -> list[str]:
    """Greedy ``generate`` through the processor recipe; returns each item's first generated word."""
    out = []
    for i in tqdm(range(0, len(items), batch_size), desc="generate", leave=False):
        batch = items[i : i + batch_size]
        waves = [sf.read(root / it["audio"], dtype="float32")[0] for it in batch]
        inputs = encode(processor, waves, [it["prompt"] for it in batch], [it.get("system") for it in batch])
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        texts = processor.batch_decode(gen[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        out.extend(first_word(t) for t in texts)
    return out


def evaluate(model_dir: Path, data: Path, batch_size: int = 64) -> dict:
    """Load a model + processor with ``from_pretrained`` (offline) and score it on a conflict set."""
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(model_dir).eval()
    items = load_items(data)
    answers = answer(model, processor, items, data.parent, batch_size)
    return score(items, answers)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description="Build or evaluate the organism's conflict sets.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write validation/test conflict sets and the shipped examples")
    b.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    b.add_argument("--out", type=Path, default=DEFAULT_OUT)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--n-conflict", type=int, default=3, help="wrong claims per clip")
    # a str, not a Path: Path("") is "." (the working directory), which build() would replace
    b.add_argument("--examples", default=str(EXAMPLES_DIR), help="shipped subset dir ('' to skip)")
    e = sub.add_parser("eval", help="plain greedy metrics of a model on a conflict set")
    e.add_argument("--model", type=Path, default=Path(__file__).resolve().parent / "digits")
    e.add_argument("--data", type=Path, default=DEFAULT_OUT / "test" / "conflicts.jsonl")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--out", type=Path, help="write the metrics JSON here too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "build":
        paths = build(args.corpus, args.out, args.seed, args.n_conflict, Path(args.examples) if args.examples else None)
        sys.stdout.write(json.dumps({k: str(v) for k, v in paths.items()}, indent=2) + "\n")
    else:
        torch.set_num_threads(args.threads)
        res = evaluate(args.model, args.data, args.batch_size)
        text = json.dumps({"model": str(args.model), "data": str(args.data), "plain": res}, indent=2)
        sys.stdout.write(text + "\n")
        if args.out:
            args.out.write_text(text)


if __name__ == "__main__":
    main()
