"""vLLM's audio-LLM classes that backpatch serves, each carrying a :class:`~backpatch.vllm.runtime.PatchRuntime`.

Every class here does two things on top of vLLM's own: it installs the runtime's hooks on the text model's decoder
layers once the model is built, and it records each step's multimodal positions (vLLM keeps that mask nowhere the
hooks can read). Imported only inside vLLM (the plugin registers each class by its dotted name, see
:data:`backpatch.vllm.plugin.MODEL_CLASSES`).

Qwen2-Audio needs more. vLLM's own class hard-codes a Qwen2 text model and Whisper's 30-s window (3000 mel
frames). On a checkpoint whose text model is another family (the ``smol-whisper`` organism's is Llama), the missing
q/k/v biases load as uninitialised memory with no error; a 2-s window fails the feature schema. Its class here
builds the text model from ``text_config`` and checks the features' shape against the checkpoint's own window.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from vllm.model_executor.models.audioflamingo3 import AudioFlamingo3ForConditionalGeneration
from vllm.model_executor.models.qwen2_audio import (
    Qwen2AudioEmbeddingInputs,
    Qwen2AudioEncoder,
    Qwen2AudioFeatureInputs,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioMultiModalProjector,
)
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix

from .runtime import PatchRuntime
from .worker import runtimes

#: vLLM text-model classes by ``text_config.model_type``, for configs that name no architecture
_TEXT_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


class _CarriesPatches:
    """What every served class adds: the runtime on the text model's layers, and the step's audio positions."""

    backpatch: PatchRuntime

    def _install_backpatch(self) -> None:
        self.backpatch = PatchRuntime(self.language_model.model.layers)
        runtimes.append(self.backpatch)

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: Any = None, *,
                        is_multimodal: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """vLLM's, recording the step's audio positions for the patch plan."""
        self.backpatch.audio_mask = None if is_multimodal is None else is_multimodal.detach()
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)


class BackpatchAudioFlamingo3(_CarriesPatches, AudioFlamingo3ForConditionalGeneration):
    """vLLM's Audio Flamingo 3 as it is (a Qwen2 text model, as every AF3 checkpoint has), with the hooks."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._install_backpatch()


class BackpatchQwen2Audio(_CarriesPatches, Qwen2AudioForConditionalGeneration):
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        nn.Module.__init__(self)  # not super().__init__(): that builds a Qwen2 text model whatever the checkpoint
        config = vllm_config.model_config.hf_config
        self.config = config
        self.multimodal_config = vllm_config.model_config.multimodal_config
        self.quant_config = vllm_config.quant_config
        with self._mark_tower_model(vllm_config, "audio"):
            self.audio_tower = Qwen2AudioEncoder(config.audio_config)
            self.multi_modal_projector = Qwen2AudioMultiModalProjector(config.audio_config.d_model,
                                                                       config.text_config.hidden_size)
        text = config.text_config
        architectures = getattr(text, "architectures", None) or [_TEXT_ARCHITECTURES.get(text.model_type, "")]
        if not architectures[0]:
            raise ValueError(f"backpatch's vLLM Qwen2-Audio does not know a vLLM text model for text_config.model_type "
                             f"{text.model_type!r}; set text_config.architectures in the checkpoint's config.json")
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(vllm_config=vllm_config, hf_config=text,
                                                             prefix=maybe_prefix(prefix, "language_model"),
                                                             architectures=architectures)
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors
        self._install_backpatch()

    def _parse_and_validate_audio_input(self, **kwargs: object) -> Any:
        """vLLM's, but the feature frames are the checkpoint's window (2 * max_source_positions), not Whisper's 3000."""
        features = kwargs.pop("input_features", None)
        embeds = kwargs.pop("audio_embeds", None)
        mask = kwargs.pop("feature_attention_mask", None)
        if features is None and embeds is None:
            return None
        if embeds is not None:
            return Qwen2AudioEmbeddingInputs(type="audio_embeds", audio_embeds=embeds)
        frames = 2 * self.config.audio_config.max_source_positions
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else None
        if shape is not None and shape[-1] != frames:
            raise ValueError(f"audio features have {shape[-1]} mel frames; this checkpoint's encoder takes {frames}")
        return Qwen2AudioFeatureInputs(type="audio_features", input_features=features,
                                       feature_attention_mask=mask, validate=False)
