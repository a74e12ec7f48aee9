"""The README's clean vs perturbed test table for smol-whisper: plain, the old preset, the new preset (issue 18).

README "Stress data and the audio-confidence gate (`smol-whisper`)", the held-out test table.

Reads `backpatch eval --out` reports (each has the plain and the preset columns of one preset on one split) and
writes one summary JSON with every metric, its 95% Wilson interval, the paired harm bounds and the TDR reduction
bound, and prints the markdown table. Reproduce (about 10 minutes per report on 2 cores):

    python -m backpatch.organism.perturb build --corpus /work/data/smol/corpus --out /work/data/smol/perturbed
    backpatch eval --model organism:smol-whisper --preset PRESET.yaml --max-new-tokens 4 --batch-size 48 \\
        --data /work/data/smol/{conflicts,perturbed}/test/conflicts.jsonl \\
        --out test-{clean,perturbed}-{old,new,resumed}.json
    python scripts/stress_report.py --reports DIR --out docs/stress/smol-whisper-test.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SPLITS = ("clean", "perturbed")
PRESETS = ("old", "new", "resumed")  # the old shipped preset, the first and the second (resumed) recalibration
METRICS = ("tdr", "afr", "other_rate", "audio_only_acc", "consistent_acc")


def summarize(folder: Path) -> dict:
    out: dict = {}
    for split in SPLITS:
        out[split] = {}
        for preset in PRESETS:
            path = folder / f"test-{split}-{preset}.json"
            if not path.exists():
                continue
            report = json.loads(path.read_text())
            if "plain" not in out[split]:
                out[split]["plain"] = {k: report["plain"][k] for k in (*METRICS, "ci95", "n_conflict")}
            out[split][preset] = {**{k: report["backpatched"][k] for k in (*METRICS, "ci95")},
                                  "paired": report["paired"], "gate": report.get("gate"),
                                  "preset": report["preset"]}
    return out


def _cell(m: dict, key: str) -> str:
    ci = m["ci95"][key]
    return f"{m[key]:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def table(summary: dict) -> str:
    lines = ["| split | configuration | TDR [95% CI] | AFR | audio-only | consistent | harm bound | TDR cut (lower "
             "bound) |", "|---|---|---|---|---|---|---|---|"]
    for split in SPLITS:
        for name in ("plain", *PRESETS):
            m = summary[split].get(name)
            if m is None:
                continue
            paired = m.get("paired")
            harm = f"{paired['harm_upper']:.3f}" if paired else ""
            cut = (f"{100 * paired['tdr_reduction']:.1f} pts ({100 * paired['tdr_reduction_lower']:.1f})"
                   if paired else "")
            lines.append(f"| {split} | {name} | {_cell(m, 'tdr')} | {m['afr']:.3f} | {_cell(m, 'audio_only_acc')} | "
                         f"{_cell(m, 'consistent_acc')} | {harm} | {cut} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=Path, required=True,
                        help="folder with test-{clean,perturbed}-{old,new,resumed}.json")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    summary = summarize(args.reports)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(table(summary))


if __name__ == "__main__":
    main()
