"""``backpatch diagnose``: layer-wise probes, logit lens, convergence and attention on a conflict set, and the
preset they suggest."""

from __future__ import annotations

import argparse
from pathlib import Path

from .run_eval import check_data, default_data


def cmd_diagnose(args: argparse.Namespace) -> int:
    from ..diagnose import diagnose
    from ..diagnose.report import ranges_text
    from ..evaluate import truncation_line
    from ..loading import load_model_and_processor

    data = args.data or default_data(args)
    check_data(args, data)
    model, processor = load_model_and_processor(args.model, args.dtype, args.device_map, args.trust_remote_code)
    report = diagnose(model, processor, data, args.out, preset=args.preset, limit=args.limit,
                      batch_size=args.batch_size, sweep=not args.no_sweep, truncate=args.truncate_audio)
    if truncation_line(report.get("truncated_audio")):
        print(truncation_line(report["truncated_audio"]))
    s = report["summary"]
    print(f"audio answer decodable at the last prompt position under conflict, last layer: "
          f"{s['probe_audio_conflict_last_layer']} (chance {s['chance_audio_conflict']}); text answer ahead in the "
          "logit lens " + (f"from layer {s['text_takeover_layer']} on" if s["text_takeover_layer"] is not None
                           else ranges_text(s.get("text_ahead_layers"))))
    print(f"suggested preset: {Path(args.out) / 'suggested_preset.yaml'}")
    print(f"wrote {Path(args.out) / 'report.md'}, report.json and {len(report['figures'])} figures")
    return 0
