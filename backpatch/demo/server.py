"""Serving the demo: :func:`launch` loads the model and starts the Gradio server, after the cheap checks (the preset
file, a free port) so a mistake is named before the model loads; a busy port is reworded to name ``--port``."""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path
from typing import Any

import gradio as gr

from ..bundled import load_preset
from ..loading import display_name
from ..preset import Preset
from .page import build_app


def launch(model: str | None = None, preset: str | Path | Preset | None = None, host: str = "127.0.0.1",
           port: int = 7860, *, dtype: str = "auto", device_map: str | None = None, trust_remote_code: bool = False,
           **launch_kwargs: Any) -> gr.Blocks:
    """Load ``model`` (default: the default model organism) and serve the demo; with no ``preset``, the bundled
    preset matching the model.

    Blocks until the server stops, unless ``prevent_thread_lock=True`` is passed (then returns the running app;
    call ``app.close()``). Extra keyword arguments go to ``gr.Blocks.launch``.
    """
    from ..loading import load_model_and_processor

    # Cheap checks first: a bad preset file or a busy port fails before the model loads.
    if isinstance(preset, (str, Path)):
        preset = load_preset(preset)
    check_port(host, port)
    hf_model, processor = load_model_and_processor(model, dtype, device_map, trust_remote_code)
    # preset None: wrap() picks the bundled preset matching the model (an organism's matches its config)
    app = build_app(hf_model, processor, preset, model_name=display_name(model))
    options: dict[str, Any] = {"server_name": host, "server_port": port, "ssr_mode": False, "mcp_server": False,
                               "share": False, "footer_links": ["api"]}
    options.update(launch_kwargs)
    try:
        app.launch(**options)
    except OSError as exc:
        if "Cannot find empty port" not in str(exc):
            raise
        with contextlib.suppress(Exception):  # free what the failed launch started
            app.close()
        raise OSError(_busy_port_message(host, options["server_port"])) from None
    return app


def _busy_port_message(host: str, port: int) -> str:
    return f"port {port} on {host} is already in use; pass a free one with --port (port= in Python), e.g. --port " \
           f"{port + 1 if port < 65535 else 7860}"


def check_port(host: str, port: int) -> None:
    """Raise ``OSError`` naming ``--port`` when nothing can listen on ``host:port`` (another server holds it)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OSError(f"cannot serve on host {host!r} ({exc.strerror}); pass an address such as --host 127.0.0.1"
                      ) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is not busy
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(_busy_port_message(host, port)) from None
            raise OSError(f"cannot serve on {host}:{port} ({exc.strerror or exc}); pass another --port (or --host)"
                          ) from None
