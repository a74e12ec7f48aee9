"""The ``vllm.general_plugins`` entry point: vLLM calls :func:`register` in every process it starts (front end,
engine core, workers).

It registers backpatch's classes of the families it serves (:data:`MODEL_CLASSES`), makes engines run patched
prefills exactly (eager layers, whole prefills), checks each request's ``backpatch`` value in the front end (a bad
one is a ``VLLMValidationError``: an exception offline, a 400 over HTTP, naming the key; on a model of another
family, any ``backpatch`` value is refused, never ignored), salts patched requests' prefix cache, and lets the
worker's hooks see each step's requests. ``BACKPATCH_VLLM=0`` turns all of it off.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

from .settings import KEY, EngineSettings, SettingError, UnservedModel

logger = logging.getLogger(__name__)

__all__ = ["MODEL_CLASSES", "register"]

#: model_type -> (the architecture name vLLM serves it under, backpatch's class for it, loaded lazily by vLLM's
#: registry). Each is tested equal to the Hugging Face engine in tests_vllm/; vLLM's other audio classes (Qwen2.5-Omni,
#: Voxtral, ...) are served by vLLM as they are, and a request that asks them for backpatch is refused.
MODEL_CLASSES = {
    "qwen2_audio": ("Qwen2AudioForConditionalGeneration", "backpatch.vllm.model:BackpatchQwen2Audio"),
    "audioflamingo3": ("AudioFlamingo3ForConditionalGeneration", "backpatch.vllm.model:BackpatchAudioFlamingo3"),
}
_DONE: list[bool] = []


def register() -> None:
    """Idempotent: vLLM may call it more than once per process."""
    if _DONE or os.environ.get("BACKPATCH_VLLM", "1") == "0":
        return
    _DONE.append(True)
    from vllm import ModelRegistry
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from .worker import wrap_execute_model

    for architecture, dotted in MODEL_CLASSES.values():
        ModelRegistry.register_model(architecture, dotted)
    EngineArgs.create_engine_config = _exact_engine(EngineArgs.create_engine_config)
    GPUModelRunner.execute_model = wrap_execute_model(GPUModelRunner.execute_model)
    InputProcessor.__init__ = _front_end(InputProcessor.__init__)
    InputProcessor.process_inputs = _checked_requests(InputProcessor.process_inputs)
    _check_http_requests()
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # the hooks read V1's per-request state


#: the request rules of this process's front end (set when vLLM builds its InputProcessor)
_FRONT_END: list[EngineSettings | UnservedModel] = []


def _front_end(original: Any) -> Any:
    """The front end's ``__init__``, building the request rules at start (so the default is logged before the first
    request) and keeping them for the HTTP layer's check."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _FRONT_END.append(_settings_of(self))

    return __init__


def _refusal(settings: EngineSettings | UnservedModel, extra_args: dict[str, Any] | None) -> Any:
    """The request's setting, or vLLM's validation error (a 400 over HTTP) naming the key."""
    from vllm.exceptions import VLLMValidationError

    try:
        return settings.for_request(extra_args)
    except SettingError as exc:
        raise VLLMValidationError(str(exc), parameter=exc.parameter, value=(extra_args or {}).get(KEY)) from None


def _check_http_requests() -> None:
    """Check ``vllm_xargs.backpatch`` when the OpenAI layer builds a request's sampling parameters, before its
    generator exists: a bad value is a 400 for streaming requests too (checked later, it would arrive as an error
    event after a 200)."""
    try:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    except ImportError:  # a vLLM without the OpenAI server's modules: offline checks only
        return
    for cls in (ChatCompletionRequest, CompletionRequest):
        cls.to_sampling_params = _checked_sampling_params(cls.to_sampling_params)


def _checked_sampling_params(original: Any) -> Any:
    def to_sampling_params(self: Any, *args: Any, **kwargs: Any) -> Any:
        params = original(self, *args, **kwargs)
        if _FRONT_END:
            _refusal(_FRONT_END[-1], getattr(params, "extra_args", None))
        return params

    return to_sampling_params


def _exact_engine(original: Any) -> Any:
    """Engine arguments under which a patched prefill is exact: layers run eagerly (hooks do not run inside CUDA
    graphs or torch.compile) and a prompt is never split across steps (the capture needs all of it)."""

    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.enforce_eager:
            logger.info("backpatch: enforce_eager=True (patched prefills run eagerly; set BACKPATCH_VLLM=0 to serve "
                        "without backpatch)")
            self.enforce_eager = True
        if self.enable_chunked_prefill is not False:
            self.enable_chunked_prefill = False
            logger.info("backpatch: chunked prefill off (a patched prompt is prefilled whole in one step)")
        if self.max_num_batched_tokens is None and self.max_model_len is not None:
            self.max_num_batched_tokens = max(int(self.max_model_len), 2048)
        return original(self, *args, **kwargs)

    return create_engine_config


def _settings_of(processor: Any) -> EngineSettings | UnservedModel:
    """The engine's request rules, built once per front end."""
    cached = getattr(processor, "_backpatch_settings", None)
    if cached is not None:
        return cached
    model_config = processor.vllm_config.model_config
    config = model_config.hf_config
    model_type = getattr(config, "model_type", None)
    settings: EngineSettings | UnservedModel = UnservedModel(model_type, sorted(MODEL_CLASSES))
    if model_type in MODEL_CLASSES:
        settings = EngineSettings(config.model_type, model_config.model, config,
                                  config.text_config.num_hidden_layers)
        if settings.default_note:
            logger.warning("backpatch: %s", settings.default_note)
        else:
            logger.info("backpatch: requests without a %r key run preset %r", KEY, settings.default.name)
    processor._backpatch_settings = settings
    return settings


def _checked_requests(original: Any) -> Any:
    """``process_inputs`` with each request's setting checked and written in canonical form for the workers; a
    patched request gets a prefix-cache salt of its own, so its KV is never read by another request."""
    from vllm.sampling_params import SamplingParams

    from .runtime import CANONICAL_KEY

    def process_inputs(self: Any, request_id: str, prompt: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
        settings = _settings_of(self)
        if not isinstance(params, SamplingParams):
            return original(self, request_id, prompt, params, *args, **kwargs)
        setting = _refusal(settings, params.extra_args)
        if isinstance(settings, UnservedModel):
            return original(self, request_id, prompt, params, *args, **kwargs)
        params = params.clone()
        params.extra_args = {**(params.extra_args or {}), CANONICAL_KEY: setting.canonical()}
        request = original(self, request_id, prompt, params, *args, **kwargs)
        if setting.patched:
            request.cache_salt = f"{request.cache_salt or ''}|backpatch:{uuid.uuid4().hex}"
        return request

    return process_inputs
