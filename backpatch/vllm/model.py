"""vLLM's Qwen2-Audio, made to serve any checkpoint of the class and carry backpatch's hooks.

vLLM's own class hard-codes a Qwen2 text model and Whisper's 30-s window (3000 mel frames). On a checkpoint whose
text model is another family (the ``smol-whisper`` organism's is Llama), the missing q/k/v biases load as
uninitialised memory with no error; a 2-s window fails the feature schema. This subclass builds the text model from
``text_config`` and checks the features' shape against the checkpoint's own window, then installs a
:class:`~backpatch.vllm.runtime.PatchRuntime` on the decoder layers. Imported only inside vLLM (the plugin registers
it by its dotted name).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
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


class BackpatchQwen2Audio(Qwen2AudioForConditionalGeneration):
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
        self.backpatch = PatchRuntime(self.language_model.model.layers)
        runtimes.append(self.backpatch)

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

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: Any = None, *,
                        is_multimodal: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """vLLM's, recording the step's audio positions for the patch plan (vLLM keeps the mask nowhere else)."""
        self.backpatch.audio_mask = None if is_multimodal is None else is_multimodal.detach()
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)
