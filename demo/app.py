"""Run the backpatch Gradio demo: ``python demo/app.py [--model ID_OR_PATH] [--preset P] [--host H] [--port N]``.

A thin front end over :func:`backpatch.demo.launch` (the same as ``backpatch demo``). Without ``--model`` it
serves the default model organism (``organism:smol-whisper``) with its preset.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from backpatch.cli import port_number

    parser = argparse.ArgumentParser(description="Gradio side-by-side demo: plain vs back-patched answers.")
    parser.add_argument("--model", help="hub id, local path, or organism:NAME (default: organism:smol-whisper)")
    parser.add_argument("--preset", help="bundled preset name or path to a YAML file (default: matching preset)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    parser.add_argument("--port", type=port_number, default=7860, help="port to serve on (default: 7860)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto)")
    parser.add_argument("--device-map", help="e.g. 'auto' to spread a large model over GPUs/CPU with accelerate")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the checkpoint's own Python code (off by default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    from backpatch.demo import launch
    from backpatch.organism._wheels import OrganismBuildError
    from backpatch.preset import PresetError

    try:
        launch(args.model, args.preset, host=args.host, port=args.port, dtype=args.dtype, device_map=args.device_map,
               trust_remote_code=args.trust_remote_code)
    except (PresetError, OrganismBuildError, FileNotFoundError, OSError, ValueError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        sys.stderr.write(f"backpatch demo: error: {message}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
