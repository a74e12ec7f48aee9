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

from ._compat import check_serving_installed, describe_import_failure

check_serving_installed()  # a transformers release outside the tested range, or a missing package, named first
try:
    from .app import CONTINUOUS_BATCHING_REFUSAL, build_app
    from .requests import RequestError
    from .run import bind, serve
except ImportError as exc:  # installed, in range, and still failing (a patch release moved a name): say which
    raise ImportError(describe_import_failure(exc)) from exc

__all__ = ["CONTINUOUS_BATCHING_REFUSAL", "RequestError", "bind", "build_app", "serve"]
