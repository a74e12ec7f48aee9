"""Issue 28: continue calibration's generate() verification down its ranked list under the per-family rule.

The calibration of ``calibrate_families.sh`` verified two finalists (contrastive alpha 2 with an audio_gap gate);
both lose more than 2 points on some perturbation families of the validation data (``verified_no_harm`` refuses
them). This script takes the next no-harm settings of that run's refine stage, in the same rank order
(``rank_key``), writes each as a preset with calibration's own writer (``candidate_of_row``, ``candidate_preset``),
verifies it exactly as calibration does (greedy generate on every validation item, clean and perturbed, paired with
the plain answers: ``backpatch eval``), and stops at the first that holds the rule on both splits. Validation
only; the test splits are not read.

    cd /work/data/smol && python /work/main/docs/stress/verify_next.py cal3/smol-whisper.sweep.json cal5 4
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from backpatch import Preset
from backpatch.calibrate.resume import candidate_of_row
from backpatch.calibrate.search import family_losses, rank_key, verified_no_harm
from backpatch.calibrate.writing import candidate_preset

SPLITS = {"clean": "conflicts/validation/conflicts.jsonl", "perturbed": "perturbed/validation/conflicts.jsonl"}


def ranked_rows(sweep: dict, verified: set[str]) -> list[dict]:
    """The refine stage's no-harm rows in calibration's rank order, one per distinct proxy result (a gate that never
    acts gives the ungated setting's answers), without the ones already verified."""
    rows = [r for r in sweep["sweep"] if r["stage"] == "refine" and r["no_harm"] and r["setting"] not in verified]
    rows.sort(key=lambda r: rank_key({"tdr": r["tdr"], "paired": {"tdr_reduction_lower": r["tdr_reduction_lower"]}}))
    seen, out = set(), []
    for r in rows:
        proxy = (r["tdr"], r["afr"], r["audio_only_acc"], r["consistent_acc"], r["harm_upper"])
        if proxy not in seen:
            seen.add(proxy)
            out.append(r)
    return out


def evaluate(preset: Path, split: str, out: Path, plain_from: Path | None) -> dict:
    cmd = ["backpatch", "eval", "--model", "organism:smol-whisper", "--preset", str(preset), "--data", SPLITS[split],
           "--out", str(out), "--max-new-tokens", "4", "--batch-size", "48"]
    if plain_from is not None:
        cmd += ["--plain-from", str(plain_from)]
    if not out.exists():
        subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def main(sweep_path: str, out_dir: str, how_many: str) -> None:
    sweep = json.loads(Path(sweep_path).read_text())
    base = Preset.from_yaml(sweep["preset"])
    out = Path(out_dir)
    plain = {split: out / f"plain-{split}.json" for split in SPLITS}
    results = []
    for index, row in enumerate(ranked_rows(sweep, {v["setting"] for v in sweep["verified"]})[:int(how_many)]):
        preset_path = out / f"finalist{index + 3}.yaml"
        candidate_preset(base, candidate_of_row(row), sweep["grid"]["null_audio"]).to_yaml(preset_path)
        reports = {}
        for split in SPLITS:
            path = out / f"finalist{index + 3}-{split}.json"
            reports[split] = evaluate(preset_path, split, path, plain[split] if plain[split].exists() else None)
            if not plain[split].exists():
                plain[split].symlink_to(path.name)
        losses = family_losses(reports["perturbed"]["paired"])
        passes = all(verified_no_harm(r["paired"]) for r in reports.values())
        results.append({"setting": row["setting"], "preset": str(preset_path), "passes": passes,
                        "family_losses": losses,
                        **{split: {"tdr": [r["plain"]["tdr"], r["backpatched"]["tdr"]],
                                   "audio_only_acc": [r["plain"]["audio_only_acc"], r["backpatched"]["audio_only_acc"]],
                                   "consistent_acc": [r["plain"]["consistent_acc"], r["backpatched"]["consistent_acc"]],
                                   "harm_upper": r["paired"]["harm_upper"]} for split, r in reports.items()}})
        sys.stdout.write(json.dumps(results[-1]) + "\n")
        (out / "verify_next.json").write_text(json.dumps(results, indent=1) + "\n")
        if passes:
            break


if __name__ == "__main__":
    main(*sys.argv[1:])
