"""``backpatch demo`` (the Gradio side-by-side page) and ``backpatch serve`` (the OpenAI-compatible server): the
two long-running apps, each behind an optional extra."""

from __future__ import annotations

import argparse

from ..loading import display_name


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from ..demo import launch
    except ModuleNotFoundError as exc:
        missing = exc.name
        raise ValueError(f"the demo needs gradio ({missing} is not installed): pip install 'backpatch[demo]'") from None
    launch(args.model, args.preset, host=args.host, port=args.port, dtype=args.dtype,
           device_map=args.device_map, trust_remote_code=args.trust_remote_code)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from ..serve import serve
    except ImportError as exc:  # backpatch.serve's own sentence: what is missing or which release is installed
        raise ValueError(str(exc)) from None
    serve(args.model, args.preset, host=args.host, port=args.port, dtype=args.dtype, device_map=args.device_map,
          trust_remote_code=args.trust_remote_code, continuous_batching=args.continuous_batching,
          log_level="info" if args.verbose else "warning",
          ready=lambda url: print(f"serving {display_name(args.model)} at {url}/v1 (POST /v1/chat/completions, "
                                  "GET /v1/models, GET /health); Ctrl-C stops", flush=True))
    return 0
