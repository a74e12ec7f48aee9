"""The one way the demo says no: a friendly error the browser shows and API clients receive, while the app keeps
serving (every room raises it through :func:`_fail`)."""

from __future__ import annotations

import gradio as gr


def _fail(message: str) -> gr.Error:
    """A friendly error shown in the browser (and returned to API clients); the app keeps serving."""
    return gr.Error(message, duration=None, title="Cannot compare", print_exception=False)
