"""``wrap()`` and ``apply()``: back-patched ``generate()`` with the Hugging Face interface unchanged.

Like PEFT's ``PeftModel``, :class:`BackpatchedModel` holds the base model, forwards every attribute it does
not override, and gives the model back clean with :meth:`BackpatchedModel.unwrap`. It never touches weights:
all it adds are hooks that live for one call (see :mod:`backpatch.engine`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from .bundled import find_matching_preset, load_preset
from .engine import Resolved, generation_session, model_lock, plain_call, resolve, running_methods
from .preset import Preset, PresetError, methods_details

__all__ = ["BackpatchedModel", "apply", "backpatch_hook_count", "wrap"]

logger = logging.getLogger(__name__)


def preset_for(model: nn.Module, preset: Preset | str | Path | None, fallback: Preset | None = None) -> Preset | None:
    """The preset to use for ``model``: as given, loaded by name/path, or the matching bundled one.

    With no match, ``fallback`` is returned when one is given (calibration, diagnostics); otherwise the
    :class:`PresetError` that lists the bundled presets propagates, as ``wrap()`` wants.
    """
    if preset is not None or fallback is None:
        return _as_preset(model, preset)
    try:
        return _as_preset(model, None)
    except PresetError:
        return fallback


def _as_preset(model: nn.Module, preset: Preset | str | Path | None) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if preset is not None:
        return load_preset(preset)
    config = model.config
    found = find_matching_preset(getattr(config, "model_type", ""), getattr(config, "_name_or_path", None), config)
    logger.info("backpatch: using bundled preset %r for %s", found.name, type(model).__name__)
    if (found.calibration is None or found.calibration.status != "calibrated") and found.name not in _WARNED:
        _WARNED.add(found.name)
        logger.warning("backpatch: picked the bundled preset %r, which is NOT calibrated for this checkpoint (its "
                       "layers come from a rule, not a measurement); run `backpatch calibrate` on a validation "
                       "conflict set of yours and pass the preset it writes", found.name)
    return found


#: uncalibrated bundled presets already warned about (once per process each)
_WARNED: set[str] = set()


def prepare_resources(preset: Preset, processor: Any) -> dict[str, Any]:
    """What each method of ``preset`` computes once per wrapped model (``Method.prepare``: e.g. the silent features
    of contrastive decoding), for the methods that run: a block whose rows nobody needs prepares nothing."""
    running, _ = running_methods({method.key: config for method, config in preset.methods()})
    resources = {}
    for method, config in running:
        resource = method.prepare(config, processor, preset.origin)
        if resource is not None:
            resources[method.key] = resource
    return resources


class BackpatchedModel:
    """A Hugging Face audio LLM whose ``generate()`` (and forward) are back-patched.

    ``generate`` takes the same arguments and returns the same types as the base model's. Everything else
    (``config``, ``device``, ``save_pretrained``, ...) falls through to :attr:`base_model`.
    """

    def __init__(self, model: nn.Module, preset: Preset | str | Path | None = None, processor: Any = None) -> None:
        if isinstance(model, BackpatchedModel):
            raise TypeError("this model is already wrapped by backpatch; call .unwrap() first or pass the base model")
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"wrap() expects a Hugging Face model (nn.Module with .config), got {type(model).__name__}")
        self._model = model
        self.preset = _as_preset(model, preset)
        self._resolved = resolve(model, self.preset, processor)
        self._resources = prepare_resources(self.preset, processor)
        self._local = threading.local()
        #: the sessions of the most recent call, by preset key (for deterministic counts in tests and benchmarks)
        self.last_sessions: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------- access
    @property
    def base_model(self) -> nn.Module:
        """The wrapped Hugging Face model."""
        return self._model

    @property
    def resolved(self) -> Resolved:
        """The preset resolved against this model: absolute layer indices, audio token id, hooked modules."""
        return self._resolved

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: everything we do not override belongs to the base model.
        return getattr(object.__getattribute__(self, "_model"), name)

    def __repr__(self) -> str:
        return (f"BackpatchedModel({type(self._model).__name__}, preset={self.preset.name!r}, "
                f"methods=[{methods_details(self.preset)}])")

    # the most recent call's session of each built-in method (None when it did not run)
    @property
    def last_session(self) -> Any:
        return self.last_sessions.get("patches")

    @property
    def last_contrastive(self) -> Any:
        return self.last_sessions.get("contrastive")

    @property
    def last_attention(self) -> Any:
        return self.last_sessions.get("attention")

    @property
    def last_steering(self) -> Any:
        return self.last_sessions.get("steering")

    # ------------------------------------------------------------------------------------------ calling
    @property
    def is_disabled(self) -> bool:
        return getattr(self._local, "disabled", 0) > 0

    @contextmanager
    def disabled(self) -> Iterator[BackpatchedModel]:
        """Plain (unpatched) calls inside this block, in this thread: for A/B comparisons."""
        self._local.disabled = getattr(self._local, "disabled", 0) + 1
        try:
            yield self
        finally:
            self._local.disabled -= 1

    def _session(self) -> Any:
        """The hooks of one back-patched call: every method of this preset, installed by the engine."""
        return generation_session(self._resolved, resources=self._resources)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Hugging Face ``generate()``, with the preset's patches applied to the prefill.

        Decode steps run unpatched from the patched KV cache. One back-patched call per model at a time
        (a per-model lock serializes threads); plain calls run alongside, untouched by its hooks.
        """
        generator = self._resolved.generator
        plain_generate = type(generator).generate  # the class method: skips an instance override by apply()
        if self.is_disabled:
            with plain_call():
                return plain_generate(generator, *args, **kwargs)
        with self._session() as call:
            self.last_sessions = call.sessions
            return plain_generate(generator, *args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """One forward pass of the text-generating model with the patches applied (unpatched when disabled)."""
        generator = self._resolved.generator
        if self.is_disabled:
            with plain_call():
                return generator(*args, **kwargs)
        with self._session() as call:
            self.last_sessions = call.sessions
            return generator(*args, **kwargs)

    __call__ = forward

    def last_gate(self) -> dict[str, list] | None:
        """What the audio-confidence gate did in this wrapper's most recent call, per row: ``patch`` (the strength
        the patches got, measured before the patched prefill) and ``contrastive`` (alpha's strength at each step).
        ``None`` without a gate. 1.0 is full strength, 0.0 fully plain."""
        if self.preset.gate is None:
            return None
        session, contrastive = self.last_session, self.last_contrastive
        patch = session.gate_values if session is not None else None
        steps = contrastive.gate_steps if contrastive is not None and self.preset.contrastive.alpha > 0 else []
        return {"patch": None if patch is None else [round(float(v), 4) for v in patch],
                "contrastive": ([[round(float(v), 4) for v in column] for column in zip(*steps, strict=True)]
                                if steps else None)}

    def unwrap(self) -> nn.Module:
        """Return the base model. Hooks only live inside a call, so it is hook-free; this is checked.

        A back-patched call in flight on this model in another thread is waited for.
        """
        nested = "unwrap() was called inside a back-patched call on this model (same thread)"
        with model_lock(self._resolved.generator).hold(nested):
            leftover = backpatch_hook_count(self._model)
        if leftover:  # pragma: no cover - would be a bug in the engine
            raise RuntimeError(f"backpatch left {leftover} hooks on the model; please report this")
        return self._model


def wrap(model: nn.Module, preset: Preset | str | Path | None = None, processor: Any = None) -> BackpatchedModel:
    """Wrap a Hugging Face audio LLM so that its ``generate()`` is back-patched.

    ``preset`` is a :class:`Preset`, a bundled preset name, a path to a YAML file, or ``None`` to pick the
    bundled preset matching ``model.config``. ``processor`` (or a tokenizer) is needed only when the preset
    names its audio token as a string (``audio_span.token``). Raises :class:`PresetError` when the preset
    does not fit the model (layer range, ``num_layers``, audio token).
    """
    return BackpatchedModel(model, preset, processor)


@contextmanager
def apply(
    model: nn.Module, preset: Preset | str | Path | None = None, processor: Any = None
) -> Iterator[BackpatchedModel]:
    """Back-patch ``model.generate`` in place for the duration of the block.

    For apps and pipelines that hold the model object: inside, every ``generate()`` on the text-generating
    module is back-patched, from any thread; on exit (also on exceptions) the original method is back and no
    hook is left. The method is replaced on the module itself, so ``apply()`` blocks on one model in different
    threads run one after the other (a second block waits for the first to close); nested blocks in one thread
    stack as before.
    """
    wrapped = wrap(model, preset, processor)
    generator = wrapped.resolved.generator
    with model_lock(generator).blocks:
        had_own = "generate" in generator.__dict__
        previous = generator.__dict__.get("generate")
        generator.generate = wrapped.generate
        try:
            yield wrapped
        finally:
            if had_own:
                generator.generate = previous
            else:
                del generator.generate


def backpatch_hook_count(model: nn.Module) -> int:
    """Number of forward hooks and pre-hooks on ``model``'s modules that backpatch installed (should be 0
    outside a call)."""
    count = 0
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for hook in hooks.values():
                fn = getattr(hook, "__func__", hook)
                if getattr(fn, "__module__", "").startswith("backpatch"):
                    count += 1
    return count

