"""Running ``backpatch serve``: bind the port, load the model, serve the app with uvicorn until stopped."""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..bundled import load_preset
from ..loading import display_name, load_model_and_processor
from ..preset import Preset

__all__ = ["bind", "serve"]

logger = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port``, bound before the model loads: a busy port fails in a second, not after a
    minute of loading, and nothing can take the port in between. ``OSError`` names ``--port``/``--host``."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise OSError(f"cannot serve on host {host!r} ({exc.strerror}); pass an address such as --host 127.0.0.1"
                      ) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT from a previous run is not busy
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise OSError(f"port {port} on {host} is already in use; pass a free one with --port (port= in Python)"
                          ) from None
        raise OSError(f"cannot serve on {host}:{port} ({exc.strerror or exc}); pass another --port (or --host)"
                      ) from None
    sock.set_inheritable(True)
    return sock


def serve(model: str | None = None, preset: str | Path | Preset | None = None, host: str = "127.0.0.1",
          port: int = 8000, *, dtype: str = "auto", device_map: str | None = None, trust_remote_code: bool = False,
          continuous_batching: bool = False, log_level: str = "warning",
          ready: Callable[[str], Any] | None = None) -> None:
    """Serve ``model`` (default: the default organism) back-patched with ``preset`` over the OpenAI chat API.

    Blocks until the server is stopped (Ctrl-C / SIGTERM). One process serves one model instance, one request at a
    time (transformers' inference thread); scale with one process per GPU, or ``device_map`` for a model larger
    than one. ``ready`` is called with the base URL once the app is built and the port is bound.
    ``continuous_batching=True`` is refused (:data:`backpatch.serve.app.CONTINUOUS_BATCHING_REFUSAL`).
    """
    from .app import CONTINUOUS_BATCHING_REFUSAL, build_app

    if continuous_batching:
        raise ValueError(CONTINUOUS_BATCHING_REFUSAL)
    import uvicorn

    if isinstance(preset, (str, Path)):
        preset = load_preset(preset)  # a bad preset file fails before the port is taken and the model loads
    sock = bind(host, port)
    try:
        hf_model, processor = load_model_and_processor(model, dtype, device_map, trust_remote_code)
        app = build_app(hf_model, processor, preset, model_name=display_name(model))
        if log_level.lower() != "info":
            # transformers' handler logs every request at WARNING level
            logging.getLogger("transformers.cli.serving").setLevel(logging.ERROR)
        server = uvicorn.Server(uvicorn.Config(app, log_level=log_level.lower()))
        shown = f"[{host}]" if ":" in host else host
        if ready is not None:
            ready(f"http://{shown}:{port}")
        server.run(sockets=[sock])
    finally:
        sock.close()
