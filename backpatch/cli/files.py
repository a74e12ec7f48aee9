"""The commands about files: ``backpatch presets`` lists the bundled presets, ``backpatch conflicts`` builds a
conflict set from labelled audio, ``backpatch organism build`` builds a model organism's checkpoint."""

from __future__ import annotations

import argparse

from ..bundled import list_presets, load_preset
from ..preset import methods_details
from .arguments import str_list


def cmd_presets(args: argparse.Namespace) -> int:
    rows = [("name", "model_type", "layers", "methods", "calibration")]
    for name in list_presets():
        preset = load_preset(name)
        rows.append((
            name,
            preset.match.model_type if preset.match else "-",
            str(preset.model.num_layers) if preset.model and preset.model.num_layers else "-",
            methods_details(preset),
            preset.calibration.status if preset.calibration else "uncalibrated",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_conflicts(args: argparse.Namespace) -> int:
    from ..conflict_sets import build_conflict_set

    summary = build_conflict_set(
        args.source, args.out, args.question, args.claim, system_claims=args.system_claim,
        labels=str_list(args.labels),
        conflicts_per_clip=args.conflicts_per_clip, consistent_share=args.consistent_share,
        audio_only_share=args.audio_only_share, choices=args.choices, choices_template=args.choices_template,
        split=args.split, group_by=args.group_by, filename_pattern=args.filename_pattern,
        audio_column=args.audio_column, label_column=args.label_column, id_column=args.id_column,
        audio_root=args.audio_root, seed=args.seed, annotate=not args.no_annotations, force=args.force)
    framings = ", ".join(name or "(unnamed)" for name in summary["framings"])
    print(f"{summary['n_clips']} clips, {len(summary['labels'])} labels, framings: {framings}")
    for name, row in summary["outputs"].items():
        print(f"wrote {row['path']}: {row['items']} items ({row['conflict']} conflict, {row['consistent']} "
              f"consistent, {row['audio_only']} audio-only) from {row['clips']} clips, "
              + ("" if row["groups"] is None else f"{row['groups']} groups, ")
              + f"{row['labels']} labels" + ("" if name == "all" else f"  [{name}]"))
    return 0


def cmd_organism(args: argparse.Namespace) -> int:
    from .. import organism

    if args.name == "smol-whisper":
        from ..organism import smol_whisper

        path = smol_whisper.build(wheels_dir=args.wheels, force=args.force)
    else:
        path = organism.path(args.name)
    print(path)
    return 0
