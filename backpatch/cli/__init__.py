"""``backpatch`` command line: thin argparse subcommands over library functions (README: "Command line").

User mistakes (missing file, bad preset, unknown model) end in one clear sentence on stderr and exit code 2,
never a traceback. Cheap checks run first: numbers are range-checked by argparse, ``--preset`` is read and
validated right after parsing, and audio clips are measured against the model's audio window from its
processor files (:mod:`backpatch.preflight`), all before a model that may take minutes is loaded.

The parser and its argument types are in :mod:`.parser`; each group of commands has its module: :mod:`.run_eval`
(``run``, ``eval``), :mod:`.calibrate` (``calibrate``), :mod:`.diagnose` (``diagnose``), :mod:`.apps` (``demo``,
``serve``), :mod:`.files` (``presets``, ``conflicts``, ``organism build``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from ..audio_io import AudioFileError
from ..bundled import load_preset
from ..evaluate import ConflictSetError
from ..organism._wheels import OrganismBuildError
from ..preset import PresetError
from .arguments import fraction, port_number, positive_float, positive_int
from .parser import build_parser
from .run_eval import eval_without_preset, relaunch_with_accelerate

__all__ = ["EXIT_USAGE", "build_parser", "fraction", "main", "port_number", "positive_float", "positive_int"]

EXIT_USAGE = 2

# Errors that mean "the user asked for something we cannot do", shown as one sentence.
_USER_ERRORS: tuple[type[BaseException], ...] = (
    PresetError, AudioFileError, ConflictSetError, OrganismBuildError, FileNotFoundError, ValueError, OSError,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command as given (calibrate records it in the preset's provenance)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if getattr(args, "preset", None) is not None and not eval_without_preset(args):
            load_preset(args.preset)  # a bad preset file fails now; its fit to the model is checked at wrap time
        if getattr(args, "launcher", None) == "accelerate":
            return relaunch_with_accelerate(args, argv)
        return args.func(args)
    except _USER_ERRORS as exc:
        if args.verbose:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"backpatch: error: {message}", file=sys.stderr)
        return EXIT_USAGE
