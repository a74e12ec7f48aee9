"""``backpatch eval --engine vllm`` and ``backpatch run --engine vllm``: the same items, prompts and greedy decoding
as the transformers engine, answered by vLLM with the plugin, so a user checks a preset on the engine they deploy.

:class:`VllmEngine` stands where :class:`backpatch.BackpatchedModel` stands in :func:`backpatch.evaluate.evaluate`
and :func:`backpatch.side_by_side.side_by_side`: it takes waveforms (``takes_waveforms``) and answers a batch plain
and with its preset in one engine, each request carrying its own setting.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..bundled import find_matching_preset, load_preset
from ..inputs import chat_texts, sampling_rate_of
from ..preset import Preset
from .settings import DEFAULT_ENV, KEY, EngineSettings

__all__ = ["VllmEngine"]


class VllmEngine:
    """A vLLM engine over one checkpoint of a family the plugin patches (``plugin.MODEL_CLASSES``) and one preset
    (refused at once if vLLM cannot run it)."""

    takes_waveforms = True

    def __init__(self, model: str | Path, preset: Preset | str | Path | None = None, dtype: str = "auto",
                 **llm_kwargs: Any) -> None:
        from transformers import AutoConfig, AutoProcessor

        self.path = str(model)
        self.config = AutoConfig.from_pretrained(self.path)
        self.processor = AutoProcessor.from_pretrained(self.path)
        if isinstance(preset, Preset):
            self.preset = preset
        elif preset is not None:
            self.preset = load_preset(preset)
        else:
            self.preset = find_matching_preset(self.config.model_type, self.path, self.config)
        settings = EngineSettings(self.config.model_type, self.path, self.config,
                                  self.config.text_config.num_hidden_layers, default="none")
        settings.setting_of(self.preset, f"preset {self.preset.name!r}")  # a SettingError before the engine starts
        import torch
        from vllm import LLM

        options = {"dtype": dtype, "limit_mm_per_prompt": {"audio": 1}, "max_model_len": 1024, **llm_kwargs}
        if not torch.cuda.is_available():
            # on CPU vLLM's default reserves 92% of the machine's RAM for itself; these short audio prompts need little
            options.setdefault("gpu_memory_utilization", 0.3)
        # every request here names its setting, so the engine's default is never used: do not announce one
        os.environ.setdefault(DEFAULT_ENV, "none")
        self.llm = LLM(self.path, **options)

    def answer(self, processor: Any, waves: Sequence[np.ndarray], prompts: Sequence[str],
               system: str | Sequence[str | None] | None,
               max_new_tokens: int, mitigate: bool = True) -> list[str]:
        """Greedy answers, plain or with the preset (``mitigate``), for waveforms at the processor's rate."""
        from vllm import SamplingParams

        rate = sampling_rate_of(processor)
        setting = self.preset.to_dict() if mitigate else {"enabled": False}
        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, extra_args={KEY: setting})
        requests = [{"prompt": text, "multi_modal_data": {"audio": (np.asarray(w, dtype=np.float32), rate)}}
                    for w, text in zip(waves, chat_texts(processor, prompts, system), strict=True)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outputs]

    @property
    def base_model(self) -> Any:
        return self.llm

    @contextlib.contextmanager
    def disabled(self) -> Iterator[VllmEngine]:
        """For callers written for the wrapper: plain answers are asked for with ``mitigate=False`` instead."""
        yield self

    def last_gate(self) -> None:
        return None  # the gate does not run inside vLLM (refused with the preset)
