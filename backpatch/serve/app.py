"""The FastAPI app of ``backpatch serve``: transformers' OpenAI-compatible server with the model back-patched.

Built from the pieces of ``transformers serve`` (``transformers.cli.serving``): its ``build_server`` (middleware,
routes, lifespan), ``ModelManager``, ``ChatCompletionHandler`` (OpenAI schema, chat template, streaming and
non-streaming responses) and ``GenerationState`` (one inference thread per model). Four things in them cannot
carry back-patching as they are, so they are subclassed or composed here, each for the reason given where it
happens:

1. the model manager loads models by hub id on demand; here it is pinned to the one model backpatch loaded;
2. the handler calls ``model.generate`` on what the manager returns; here that is a per-request view of the
   model whose ``generate`` is the back-patched one (or plain, or another preset, as the request asks);
3. the handler's audio loader fetches URLs and reads paths and turns bad input into 500s; here audio is checked
   and decoded first (:mod:`backpatch.serve.requests`) and handed to the processor as waveforms;
4. routes that would run the model unpatched (``/v1/responses``, ``/v1/completions``, ...) or unload it
   (``/reset``) are removed, and ``/health`` reports backpatch's hook count.

Continuous batching is not offered: transformers runs it through its own paged-attention batch processor
(``generation/continuous_batching``: ``model(**batch_data)`` on the packed tokens of many requests, which it takes
as ``input_ids`` only), never through ``generate()``, so the prefill hooks would not run; and its handler uses it for
text-only models alone (see :data:`CONTINUOUS_BATCHING_REFUSAL`).
"""

from __future__ import annotations

import contextvars
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from transformers.cli.serving.chat_completion import ChatCompletionHandler
from transformers.cli.serving.model_manager import ModelManager, TimedModel
from transformers.cli.serving.server import build_server
from transformers.cli.serving.utils import GenerationState, Modality

from ..bundled import list_presets, load_preset
from ..inputs import audio_window_seconds, sampling_rate_of
from ..preset import Preset, PresetError
from ..wrapper import BackpatchedModel, backpatch_hook_count, wrap
from .requests import RequestError, check_request

__all__ = ["CONTINUOUS_BATCHING_REFUSAL", "build_app"]

logger = logging.getLogger(__name__)

CONTINUOUS_BATCHING_REFUSAL = (
    "continuous batching cannot be back-patched: transformers runs it through its paged-attention batch processor, "
    "not generate(), so backpatch's prefill hooks would never run; serve without it (requests then run one at a "
    "time per model; run one server process per GPU to scale)")

#: routes of transformers' server that stay; the others would answer unpatched or unload the model
_KEPT_ROUTES = ("/v1/chat/completions", "/v1/models")
#: presets given inline in requests whose wrappers are kept (resolving one is cheap, but not free)
_INLINE_CACHE = 32


class RequestModel:
    """The model as one request sees it: ``generate`` back-patched with the request's preset, or plain.

    transformers' handler calls ``model.generate(**inputs, generation_config=..., streamer=...)`` on its inference
    thread; this object is what it gets as ``model``. Every other attribute is the base model's, so the handler's
    response parsing and device placement see the real model.
    """

    def __init__(self, wrapped: BackpatchedModel, enabled: bool) -> None:
        self._wrapped = wrapped
        self.backpatch_enabled = enabled

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped.base_model, name)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped ``generate()``; ``disabled()`` is per thread, so it is entered here, on the inference thread."""
        dtype = getattr(self._wrapped.base_model, "dtype", None)
        for key, value in kwargs.items():
            # The handler moves inputs to the model's device but keeps float32 features; cast them to the model's
            # dtype as backpatch.demo does (Qwen2-Audio casts them itself, not every family's encoder does).
            if isinstance(value, torch.Tensor) and value.is_floating_point() and dtype is not None:
                kwargs[key] = value.to(dtype)
        with torch.no_grad():
            if self.backpatch_enabled:
                return self._wrapped.generate(*args, **kwargs)
            with self._wrapped.disabled():
                return self._wrapped.generate(*args, **kwargs)


class Presets:
    """The wrappers a request can pick: the server's preset, a bundled preset by name, or one sent inline."""

    def __init__(self, model: Any, processor: Any, default: BackpatchedModel) -> None:
        self.model, self.processor, self.default = model, processor, default
        self._bundled: dict[str, BackpatchedModel] = {default.preset.name: default}
        self._inline: OrderedDict[str, BackpatchedModel] = OrderedDict()
        #: bundled presets made for this model and fitting it (checked once, at start), as the demo offers them
        self.fitting = [default.preset.name]
        config = model.config
        for name in list_presets():
            candidate = load_preset(name)
            if name in self._bundled or candidate.match is None or not candidate.match.matches(
                    getattr(config, "model_type", ""), getattr(config, "_name_or_path", None), config):
                continue
            try:
                self._bundled[name] = wrap(model, candidate, processor=processor)
                self.fitting.append(name)
            except PresetError:
                pass

    def get(self, spec: str | dict[str, Any] | None) -> BackpatchedModel:
        """The wrapper for a request's ``backpatch.preset``; :class:`RequestError` if it is unknown or does not fit."""
        if spec is None:
            return self.default
        if isinstance(spec, str):
            if spec in self._bundled:
                return self._bundled[spec]
            known = "is not a bundled preset" if spec not in list_presets() else "is not made for this model"
            raise RequestError(f"backpatch.preset {spec!r:.60} {known}; presets for this model: "
                               f"{', '.join(self.fitting)} (or send a preset object)", "backpatch.preset")
        key = json.dumps(spec, sort_keys=True, default=str)
        if key in self._inline:
            self._inline.move_to_end(key)
            return self._inline[key]
        try:
            wrapped = wrap(self.model, Preset.from_dict(spec, origin="backpatch.preset"), processor=self.processor)
        except PresetError as exc:
            raise RequestError(str(exc).strip().splitlines()[0], "backpatch.preset") from None
        self._inline[key] = wrapped
        if len(self._inline) > _INLINE_CACHE:
            self._inline.popitem(last=False)
        return wrapped


@dataclass
class _Current:
    model: RequestModel
    waves: list[np.ndarray]


#: the request being handled; set by handle_request for the hooks transformers' handler calls within it
_CURRENT: contextvars.ContextVar[_Current] = contextvars.ContextVar("backpatch_serve_request")


class PinnedModelManager(ModelManager):
    """transformers' model manager holding one model that backpatch loaded (never unloaded, never another).

    ``ModelManager`` loads checkpoints by hub id itself; backpatch loads its model with its own loader (organisms,
    ``--dtype``, ``--device-map``) and must wrap that very object, so the loaded pair is put in its cache.
    """

    def __init__(self, model: Any, processor: Any, name: str) -> None:
        super().__init__(model_timeout=-1)
        self.force_model = name
        self._pair = (model, processor)
        self.loaded_models[name] = TimedModel(model, timeout_seconds=-1, processor=processor)
        self.backpatch_info: dict[str, Any] = {}

    def process_model_name(self, model_id: str) -> str:  # type: ignore[override]
        return model_id  # backpatch's names (organism:NAME, paths, hub ids) carry no '@revision' to add

    def load_model_and_processor(self, model_id_and_revision: str, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if model_id_and_revision != self.force_model:
            raise RequestError(f"this server serves only {self.force_model}; send model={self.force_model!r}", "model")
        return self._pair

    def get_model_modality(self, model: Any, processor: Any = None) -> Modality:  # type: ignore[override]
        # backpatch serves audio LLMs only; transformers decides by class name from one Auto mapping, which would
        # call some audio LLMs text-only and silently drop their audio parts.
        return Modality.MULTIMODAL

    def list_models(self, cache_dir: str | None = None) -> list[dict]:
        return [{**entry, "backpatch": self.backpatch_info} for entry in super().list_models(cache_dir)]


class BackpatchChatHandler(ChatCompletionHandler):
    """transformers' chat completion handler, with the request checked first and the model back-patched."""

    def __init__(self, model_manager: PinnedModelManager, generation_state: GenerationState, presets: Presets,
                 processor: Any) -> None:
        super().__init__(model_manager=model_manager, generation_state=generation_state)
        self.presets = presets
        self.sampling_rate = sampling_rate_of(processor)
        self.window_s = audio_window_seconds(processor)

    async def handle_request(self, body: dict, request_id: str) -> Any:
        checked = check_request(body, self.sampling_rate, self.window_s)
        served = self.model_manager.force_model
        if body.get("model") is not None and body["model"] != served:
            # transformers' own refusal is an HTTPException, which carries no OpenAI ``param``
            raise RequestError(f"this server is pinned to {served!r}, not {body['model']!r:.60}; send "
                               f"model={served!r}", "model")
        wrapped = self.presets.get(checked.options.preset)
        # "backpatch" is not an OpenAI field: the handler's schema check would refuse it.
        body = {key: value for key, value in body.items() if key != "backpatch"}
        token = _CURRENT.set(_Current(RequestModel(wrapped, checked.options.enabled), checked.waves))
        try:
            return await super().handle_request(body, request_id)
        finally:
            _CURRENT.reset(token)

    def _validate_request(self, body: dict) -> None:
        try:
            super()._validate_request(body)
        except HTTPException as exc:
            # transformers names the unexpected fields as a Python set and no ``param``; name the first one.
            known = getattr(self._valid_params_class, "__mutable_keys__", None)
            unexpected = sorted(set(body) - set(known)) if known else []
            if exc.status_code >= 500 or not unexpected:
                raise
            raise RequestError(f"{unexpected[0]} is not a chat completion field (unexpected: "
                               f"{', '.join(unexpected)}); remove it, or check its spelling", unexpected[0]) from None

    def _resolve_model(self, body: dict) -> tuple[str, Any, Any]:
        model_id, _, processor = super()._resolve_model(body)
        return model_id, _CURRENT.get().model, processor

    def get_processor_inputs_from_messages(self, messages: list[dict], modality: Modality) -> list[dict]:  # type: ignore[override]
        # The handler turns each audio part into {"type": "audio", "url": ...}, which the processor would load with
        # transformers' loader; hand it the waveforms decoded and checked by check_request instead (same order).
        converted = super().get_processor_inputs_from_messages(messages, modality)
        waves = iter(_CURRENT.get().waves)
        for message in converted:
            content = message["content"]
            for i, part in enumerate(content if isinstance(content, list) else []):
                if part.get("type") == "audio":
                    content[i] = {"type": "audio", "audio": next(waves)}
        return converted


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    """An error in the OpenAI shape, which its clients read into the exception they raise."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


def build_app(model: Any, processor: Any, preset: Preset | str | None = None, model_name: str | None = None) -> FastAPI:
    """The FastAPI app serving ``model`` back-patched with ``preset`` (default: the bundled preset matching it).

    ``model_name`` is the id clients send as ``model`` and ``/v1/models`` lists. Raises :class:`PresetError` when
    the preset does not fit the model, before anything is served.
    """
    if isinstance(model, BackpatchedModel):
        model = model.base_model
    default = wrap(model, preset, processor=processor)
    name = model_name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    manager = PinnedModelManager(model, processor, name)
    presets = Presets(model, processor, default)
    manager.backpatch_info = {"preset": default.preset.name, "presets": presets.fitting}
    # continuous_batching=False: see CONTINUOUS_BATCHING_REFUSAL.
    state = GenerationState(continuous_batching=False)
    handler = BackpatchChatHandler(manager, state, presets, processor)
    # Only the chat handler is given: the routes of the others are removed below.
    app = build_server(manager, handler, completion_handler=None, response_handler=None,  # type: ignore[arg-type]
                       transcription_handler=None, systemone_handler=None, generation_state=state)
    app.router.routes[:] = [r for r in app.router.routes if not isinstance(r, APIRoute) or r.path in _KEPT_ROUTES]

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness, and backpatch's hook count on the model (0 whenever no request is being generated)."""
        for _ in range(10):
            try:
                hooks = backpatch_hook_count(model)
                break
            except RuntimeError:  # the inference thread added or removed a hook while this one counted: count again
                continue
        else:  # pragma: no cover - ten collisions in a row
            hooks = None
        return {"status": "ok", "model": name, "preset": default.preset.name, "backpatch_hook_count": hooks}

    @app.exception_handler(RequestError)
    async def _request_error(_request: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        return _error(400, f"the request body is not a JSON object ({first.get('msg', 'invalid')}); send the chat "
                      "completion request as JSON")

    @app.exception_handler(Exception)
    async def _server_error(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("backpatch serve: request failed")
        return _error(500, f"the server failed on this request ({type(exc).__name__}: {exc})")

    app.state.backpatch = {"model": model, "processor": processor, "presets": presets, "manager": manager}
    return app
