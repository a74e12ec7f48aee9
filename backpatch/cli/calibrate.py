"""``backpatch calibrate``: search the preset's settings on a validation conflict set, write the best preset, its
heatmap and the sweep."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .arguments import float_list, int_list, str_list
from .run_eval import check_data


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..calibrate import calibrate
    from ..calibrate.provenance import portable_command
    from ..evaluate import truncation_line
    from ..loading import load_model_and_processor

    if not args.data:
        raise ValueError(
            "calibrate needs --data VALIDATION.jsonl, a conflict set of voices you will not test on (for example "
            "`backpatch conflicts --from YOUR_AUDIO --out data/c.jsonl --question '...' --split "
            "validation=0.5,test=0.5 --group-by speaker` writes one); the organism's shipped examples are its test "
            "voices, so they are no default")
    data = args.data
    check_data(args, data)
    if args.stress_data:
        check_data(args, args.stress_data)
    model, processor = load_model_and_processor(args.model, args.dtype, args.device_map, args.trust_remote_code)
    grid = {key: value for key, value in {
        "sources": int_list(args.sources), "targets": int_list(args.targets), "scales": float_list(args.scales),
        "modes": str_list(args.modes), "positions": str_list(args.positions), "alphas": float_list(args.alphas),
        "null_audio": args.null_audio}.items() if value is not None}
    summary = calibrate(model, processor, data, args.out, base_preset=args.preset, grid=grid,
                        batch_size=args.batch_size,
                        verify_top=args.verify_top, max_new_tokens=args.max_new_tokens, name=args.name,
                        limit=args.limit, budget_minutes=args.budget_minutes, seed=args.seed,
                        truncate=args.truncate_audio, stress_data=args.stress_data, max_harm=args.max_harm,
                        gates=not args.no_gates, full_stage=not args.skip_full_stage, resume=args.resume,
                        blocks=not args.no_blocks, command=portable_command(["backpatch", *args.argv]))
    if summary["data_warning"]:
        print(f"warning: {summary['data_warning']}")
    for warning in summary["warnings"]:
        print(f"WARNING: {warning}; the preset is written with status: uncalibrated", file=sys.stderr)
    if truncation_line(summary.get("truncated_audio")):
        print(truncation_line(summary["truncated_audio"]))
    print(f"swept {summary['n_settings']} settings on {summary['n_items']} items in {summary['sweep_seconds']} s "
          f"(total with verification {summary['total_seconds']} s)")
    for row in summary["verified"]:
        p, b = row["plain"], row["backpatched"]
        print(f"  verified {row['setting']:<32} TDR {p['tdr']} -> {b['tdr']}   audio-only {p['audio_only_acc']} -> "
              f"{b['audio_only_acc']}   consistent {p['consistent_acc']} -> {b['consistent_acc']}   harm bound "
              f"{row['paired']['harm_upper']}")
        if "perturbed" in row:
            p, b = row["perturbed"]["plain"], row["perturbed"]["backpatched"]
            print(f"  {'(perturbed)':>41} TDR {p['tdr']} -> {b['tdr']}   audio-only {p['audio_only_acc']} -> "
                  f"{b['audio_only_acc']}   consistent {p['consistent_acc']} -> {b['consistent_acc']}")
    holdout = summary.get("leave_one_family_out")
    if holdout:
        print(f"leave one perturbation family out: the setting chosen without a family harmed it in "
              f"{holdout['chosen_harmed_held_out']} of {holdout['n_families']} families; of the settings that passed "
              f"without it, {holdout['passing_harmful_rate']} harmed it "
              f"({'bound' if holdout.get('harm_statistic', 'upper') == 'upper' else 'point loss'} > "
              f"{holdout['max_harm']:g})")
    print(f"searched: {summary['searched']} (budget {args.budget_minutes:g} min)")
    for what in summary["skipped"]:
        print(f"  skipped for the budget: {what}")
    print(f"chosen: {summary['chosen']}{'' if summary['no_harm'] else '  (fails the no-harm rule!)'}")
    print(f"wrote {summary['preset']}, {summary['heatmap']} and {Path(args.out).with_suffix('.sweep.json')}")
    return 0
