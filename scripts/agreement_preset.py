"""Issue 28: write the smol-whisper preset that scripts/agreement_frontier.py chose (the passing setting with the
largest clean TDR cut), with its validation metrics and the commands that made it. The model facts (match, layers,
audio span) come from the bundled preset it replaces.

    python scripts/agreement_preset.py docs/stress/agreement-frontier.json presets/smol-whisper.yaml
"""

from __future__ import annotations

import argparse
import json

import backpatch
from backpatch import Contrastive, Gate, Patch
from backpatch.preset import Calibration

#: the contrastive-only frontier (scripts/agreement_probe.py, agreement_frontier.py)
CONTRASTIVE_STEPS = ("python scripts/agreement_probe.py --data perturbed-families/validation/conflicts.jsonl --clean "
                     "conflicts/validation/conflicts.jsonl --out logits.pt && python scripts/agreement_frontier.py "
                     "logits.pt --out docs/stress/agreement-frontier.json")
#: back-patching scored on top of it (scripts/patch_probe.py, agreement_frontier.py --patched)
PATCHED_STEPS = ("python scripts/patch_probe.py logits.pt --data perturbed-families/validation/conflicts.jsonl "
                 "--clean conflicts/validation/conflicts.jsonl --out patched.pt --scales 1.0 0.5 && python "
                 "scripts/agreement_frontier.py logits.pt --patched patched.pt --with-rows "
                 "docs/stress/agreement-frontier.json --out docs/stress/patch-frontier.json")
#: the patch at scale 0.75, pooled with the above
SCALE_075_STEPS = ("python scripts/patch_probe.py logits.pt --data perturbed-families/validation/conflicts.jsonl "
                   "--clean conflicts/validation/conflicts.jsonl --out patched-075.pt --scales 0.75 && python "
                   "scripts/agreement_frontier.py logits.pt --patched patched-075.pt --with-rows "
                   "docs/stress/patch-frontier.json --out docs/stress/patch-frontier-075.json")
#: the patch's agreement guard on every scale (1.5 measured for it), pooled with all the above
GUARDED_STEPS = ("python scripts/patch_probe.py logits.pt --data perturbed-families/validation/conflicts.jsonl "
                 "--clean conflicts/validation/conflicts.jsonl --out patched-15.pt --scales 1.5 && python "
                 "scripts/agreement_frontier.py logits.pt --patched patched.pt patched-075.pt patched-15.pt "
                 "--patch-agreement none 0.5 1 --with-rows docs/stress/patch-frontier-075.json "
                 "--out docs/stress/guarded-patch-frontier.json")


def command(frontier: str, settings: list[dict]) -> str:
    """The commands that made the preset, ending with this script on ``frontier``: the steps whose settings
    ``frontier`` holds."""
    patches = [s["patch"] for s in settings if s.get("patch")]
    steps = [CONTRASTIVE_STEPS, *([PATCHED_STEPS] if patches else []),
             *([SCALE_075_STEPS] if any(p["scale"] == 0.75 for p in patches) else []),
             *([GUARDED_STEPS] if any(p.get("agreement") is not None for p in patches) else [])]
    return " && ".join([*steps, f"python scripts/agreement_preset.py {frontier} presets/smol-whisper.yaml"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("frontier")
    ap.add_argument("out")
    args = ap.parse_args()
    report = json.load(open(args.frontier))
    if not report["best_passing"]:
        raise SystemExit(f"{args.frontier}: no setting passes the per-family rule; nothing to write")
    best, plain = report["best_passing"][0], report["plain"]
    metrics: dict[str, float | int] = {}
    for split, prefix in (("clean", ""), ("perturbed", "perturbed_")):
        for key in ("tdr", "audio_only_acc", "consistent_acc"):
            metrics[f"{prefix}{key}_before"] = round(plain[split][key], 4)
            metrics[f"{prefix}{key}_after"] = round(best["metrics"][split][key], 4)
        for key in ("n_conflict", "n_consistent", "n_audio_only"):
            metrics[f"{prefix}{key}"] = int(best["metrics"][split][key])
    metrics["harm_upper_bound"] = best["worst_bound"]
    settings = report["settings"]
    passing = sum(s["passes"] for s in settings)
    patched = [s for s in settings if s.get("patch")]
    patch_guarded = sum(s["patch"].get("agreement") is not None for s in patched)
    with_guard = f", {patch_guarded} of them under the patch's agreement guard" if patch_guarded else ""
    searched = ("contrastive settings (alpha, audio_gap ramp, plausibility and agreement guards)" if not patched else
                f"settings ({len(settings) - len(patched)} contrastive: alpha, audio_gap ramp, plausibility and "
                f"agreement guards; {len(patched)} with the back-patch {patched[0]['patch']['source']} -> "
                f"{patched[0]['patch']['target']} add @{patched[0]['patch']['positions']} at several scales, alone "
                f"or with those guards{with_guard})")
    all_guarded = all(s["agreement"] is not None or (s.get("patch") or {}).get("agreement") is not None
                      for s in settings if s["passes"])
    guarded = ", all with an agreement guard" if all_guarded else ""
    description = (
        "Chosen on validation only (first answer token, clean validation + every-family perturbed validation: every "
        "clip under each of 7 perturbation families, 240 consistent + 240 audio-only items per family) by the "
        "per-family no-harm rule: the paired 95% upper bound on control accuracy loss <= 0.02 on clean data and on "
        f"each family. {passing} of {len(settings)} {searched} pass{guarded}; this one cuts TDR most: clean "
        f"{metrics['tdr_before']} -> {metrics['tdr_after']}, perturbed {metrics['perturbed_tdr_before']} -> "
        f"{metrics['perturbed_tdr_after']}, worst family bound {best['worst_bound']} ({best['worst']}). The first "
        "calibrated preset (alpha 2, audio_gap 0.1..0.3, no guard) cut more but exceeded the bound on 4 of 7 "
        "families.")
    facts = backpatch.load_preset(args.out)
    gate = Gate("audio_gap", *best["gate"]) if best["gate"] else None
    preset = backpatch.Preset(
        name="smol-whisper", description=description, match=facts.match, model=facts.model,
        audio_span=facts.audio_span, gate=gate,
        patches=[Patch(**best["patch"])] if best.get("patch") else [],
        contrastive=Contrastive(alpha=best["alpha"], null_audio="silence", plausibility=best["plausibility"],
                                agreement=best["agreement"])
        if best["alpha"] or gate or (best.get("patch") or {}).get("agreement") is not None else None,
        calibration=Calibration(
            status="calibrated", metrics=metrics, command=command(args.frontier, settings),
            data="conflicts/validation/conflicts.jsonl + perturbed-families/validation/conflicts.jsonl"))
    preset.to_yaml(args.out)


if __name__ == "__main__":
    main()
