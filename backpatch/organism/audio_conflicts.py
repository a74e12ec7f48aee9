"""Conflict sets of ``smol-audio``, one per held-out split, every task in one file (each item names its ``task``).

Why one file: a preset for ``smol-audio`` must be calibrated and judged across all tasks at once (issue 29), and
``backpatch eval`` breaks a multi-task set down by task. Per-task files are written too, for work on one question.
Items come from the library's generator (``backpatch.conflict_sets.make_conflict_items``) with each task's framings
and vocabulary; held-out words carry ``held_out: true``. Validation and test voices are the corpus's held-out ones.

    python -m backpatch.organism.audio_conflicts --corpus /work/data/smol-audio/corpus \\
        --out /work/data/smol-audio/conflicts --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path

from backpatch.organism.conflicts import write_set
from backpatch.organism.corpus import load_manifest
from backpatch.organism.tasks import load_tasks
from backpatch.organism.train_smol_audio import task_items

logger = logging.getLogger(__name__)

SPLITS = ("validation", "test")
#: clips per task and split: enough for per-task bands (80 clips: a 95% interval of about +-7 points at 0.9), few
#: enough that a plain evaluation of a split takes minutes on 2 cores
CLIPS_PER_TASK = 80
#: wrong claims per clip and framing (binary tasks have one)
CONFLICTS_PER_CLIP = 2


def build(corpus: Path, out: Path, seed: int = 0, clips_per_task: int = CLIPS_PER_TASK) -> dict[str, dict]:
    """Write ``out/{split}/conflicts.jsonl`` (all tasks) and ``out/{split}/{task}.jsonl``; returns item counts.
    ``clips_per_task`` clips of each task (a seeded choice), plus every clip of a held-out word."""
    summary = {}
    for split in SPLITS:
        rows = load_manifest(corpus, split)
        by_task = {}
        for name, task in load_tasks().items():
            held = set(task.held_out_labels)
            trained = [r for r in rows if r["labels"].get(name) not in held]
            # every clip of a held-out word goes in: that group is reported apart and is small
            by_task[name] = (task_items(task, trained, seed, clips_per_task, CONFLICTS_PER_CLIP)
                             + task_items(task, [r for r in rows if r["labels"].get(name) in held], seed, None,
                                          CONFLICTS_PER_CLIP))
        everything = [item for items in by_task.values() for item in items]
        write_set(everything, corpus / split / "wav", out / split, "conflicts.jsonl")
        for name, items in by_task.items():
            write_set(items, corpus / split / "wav", out / split, f"{name}.jsonl")
        summary[split] = {name: dict(Counter(it["kind"] for it in items)) for name, items in by_task.items()}
        logger.info("%s: %d items -> %s", split, len(everything), out / split / "conflicts.jsonl")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the smol-audio conflict sets (validation and test voices).")
    parser.add_argument("--corpus", type=Path, required=True, help="backpatch.organism.audio_corpus output")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clips-per-task", type=int, default=CLIPS_PER_TASK)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.stdout.write(json.dumps(build(args.corpus, args.out, args.seed, args.clips_per_task), indent=1) + "\n")


if __name__ == "__main__":
    main()
