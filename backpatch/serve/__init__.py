"""``backpatch serve``: an OpenAI-compatible ``/v1/chat/completions`` endpoint whose model is back-patched.

For apps that talk to an audio LLM over HTTP (``input_audio`` content parts) instead of calling ``generate()``.
It is transformers' own server (``transformers serve``) with the pieces that cannot carry back-patching replaced
(:mod:`backpatch.serve.app` says which and why); requests are checked and their audio decoded first
(:mod:`backpatch.serve.requests`); :mod:`backpatch.serve.run` binds the port, loads the model and runs uvicorn.

Per request, the JSON body may hold a ``backpatch`` object (the OpenAI client's ``extra_body``):
``{"enabled": false}`` for the plain model, ``{"preset": "NAME"}`` for another bundled preset (or a preset
object, as in YAML), ``{"truncate_audio": true}`` to cut clips longer than the model's audio window.
"""

from __future__ import annotations

from transformers.utils.import_utils import is_serve_available

if not is_serve_available():  # pragma: no cover - depends on the installed extras
    raise ImportError("backpatch serve needs transformers' serving packages (fastapi, uvicorn, openai, pydantic): "
                      "pip install 'backpatch[serve]'")

from .app import CONTINUOUS_BATCHING_REFUSAL, build_app  # noqa: E402
from .requests import RequestError  # noqa: E402
from .run import bind, serve  # noqa: E402

__all__ = ["CONTINUOUS_BATCHING_REFUSAL", "RequestError", "bind", "build_app", "serve"]
