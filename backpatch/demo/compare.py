"""The compare action behind ``/compare``: plain and preset answers for one clip and prompt from the same processor
inputs, under one lock, with their top-k first-token probabilities and the verdict shown above them.

:class:`Demo` holds the one model and its state and joins the rooms: :class:`.clips.ClipsMixin` (audio),
:class:`.presets.PresetsMixin` (preset choice and files), :class:`.controls.ControlsMixin` (controls -> preset)."""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch

from ..evaluate import judge, normalize
from ..inputs import audio_window_seconds, build_inputs, decode_new_tokens, sampling_rate_of
from ..preset import Preset, methods_details, methods_label
from ..wrapper import BackpatchedModel, wrap
from .clips import Clip, ClipsMixin, _is_organism, _item_for
from .controls import ControlsMixin
from .errors import _fail
from .presets import PresetsMixin
from .text import _escape, calibration_note, gate_note

logger = logging.getLogger(__name__)

MAX_NEW_TOKENS = 32
TOP_K = 5


@dataclass
class CompareResult:
    plain: str
    patched: str
    plain_top: dict[str, float]
    patched_top: dict[str, float]
    verdict_html: str
    preset: Preset
    #: for organism clips: "audio", "text" or "other" per side; None otherwise
    plain_follows: str | None = None
    patched_follows: str | None = None
    clip: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Demo(ClipsMixin, PresetsMixin, ControlsMixin):
    """The demo's state and actions, without any UI: one model, its processor, the starting preset."""

    def __init__(self, model: Any, processor: Any, preset: Preset | str | Path | None = None,
                 model_name: str | None = None, max_new_tokens: int = MAX_NEW_TOKENS) -> None:
        if isinstance(model, BackpatchedModel):
            model = model.base_model
        self.model = model
        self.processor = processor
        # Raises PresetError when it does not fit: launch() turns that into one sentence.
        checked = wrap(model, preset, processor=processor)
        self.preset = checked.preset
        self.num_layers = checked.resolved.num_layers
        self.model_name = model_name or getattr(model.config, "_name_or_path", None) or type(model).__name__
        self.max_new_tokens = max_new_tokens
        self.sampling_rate = sampling_rate_of(processor)
        self.max_seconds = self._max_seconds(processor)
        self.is_organism = _is_organism(model)
        self.presets: dict[str, Preset] = self._matching_presets()
        self.clips: list[Clip] = self._load_clips() if self.is_organism else []
        self._lock = threading.Lock()
        self._save_dir = Path(tempfile.mkdtemp(prefix="backpatch-demo-"))

    # ------------------------------------------------------------------------------------------- setup
    @staticmethod
    def _max_seconds(processor: Any) -> float | None:
        """How long a clip the model accepts: the one rule of :func:`backpatch.inputs.audio_window_seconds`."""
        return audio_window_seconds(processor)

    # ------------------------------------------------------------------------------------------ running
    def _inputs(self, waves: Sequence[np.ndarray], prompts: Sequence[str]) -> Any:
        inputs = build_inputs(self.processor, waves, prompts).to(self.model.device)
        dtype = getattr(self.model, "dtype", None)
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and dtype is not None:
                inputs[key] = value.to(dtype)
        return inputs

    def _generate(self, wrapped: BackpatchedModel, inputs: Any) -> tuple[list[str], torch.Tensor]:
        out = wrapped.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                               return_dict_in_generate=True, output_logits=True)
        texts = decode_new_tokens(self.processor, out.sequences, inputs["input_ids"].shape[1])
        return texts, out.logits[0].float()

    def _answers(self, preset: Preset, waves: Sequence[np.ndarray], prompts: Sequence[str]):
        wrapped = self.fit(preset)
        inputs = self._inputs(waves, prompts)
        with self._lock, torch.no_grad():
            with wrapped.disabled():
                plain, _ = self._generate(wrapped, inputs)
            patched, _ = self._generate(wrapped, inputs)
        return plain, patched

    def top_tokens(self, logits: torch.Tensor, k: int = TOP_K) -> dict[str, float]:
        """Top-k next-token probabilities as ``{token text: probability}`` (labels made unique and visible)."""
        probs = torch.softmax(logits.float(), dim=-1)
        values, ids = probs.topk(min(k, probs.shape[-1]))
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        out: dict[str, float] = {}
        for p, i in zip(values.tolist(), ids.tolist(), strict=True):
            text = tokenizer.decode([i])
            label = text.strip() or repr(text)
            if label in out:
                label = f"{label} (#{i})"
            out[label] = round(float(p), 4)
        return out

    def compare(self, audio: Any, prompt: Any, preset_name: str | None = None, uploaded: dict | None = None,
                **controls: Any) -> CompareResult:
        """Plain and preset answers for one clip and prompt, from the same inputs. ``controls`` are the registered
        methods' control values by name (``source=20, alpha=1.0, gate_on=False``; :meth:`controls` lists them); those
        left out keep the preset's values."""
        base = self.base_preset(preset_name, uploaded)
        prompt = "" if prompt is None else str(prompt)
        if not prompt.strip():
            raise _fail("The prompt is empty: type a question about the audio.")
        wave = self.load_clip(audio)
        preset = self.preset_from_controls(base.name, uploaded=uploaded, **controls)
        wrapped = self.fit(preset)
        try:
            inputs = self._inputs([wave], [prompt])
            with self._lock, torch.no_grad():
                with wrapped.disabled():
                    (plain,), plain_logits = self._generate(wrapped, inputs)
                (patched,), patched_logits = self._generate(wrapped, inputs)
                gate = gate_note(wrapped.last_gate())
        except gr.Error:
            raise
        except Exception as exc:  # keep serving: show what went wrong instead of a bare "Error"
            logger.exception("compare failed")
            raise _fail(f"The model could not answer this input ({type(exc).__name__}: {exc}).") from None
        result = CompareResult(plain, patched, self.top_tokens(plain_logits[0]), self.top_tokens(patched_logits[0]),
                               "", preset)
        if gate is not None:
            result.extra["gate"] = gate
        clip = self.match_clip(wave) if self.clips else None
        if clip is not None:
            item = _item_for(clip, prompt)
            result.clip = clip.key
            result.plain_follows = judge(plain, item)
            result.patched_follows = judge(patched, item)
            result.extra["claim"] = item.text_answer
        result.verdict_html = self._verdict(result, clip)
        return result

    def _verdict(self, r: CompareResult, clip: Clip | None) -> str:
        differ = normalize(r.plain) != normalize(r.patched)
        if differ:
            banner = ('<div style="padding:.6em 1em;border-radius:8px;background:#fff3cd;border:2px solid #e0a800;'
                      'font-size:1.15em"><b>≠ The answers differ</b></div>')
        else:
            banner = ('<div style="padding:.6em 1em;border-radius:8px;background:#eef1f4;border:2px solid #c5ccd3;'
                      'font-size:1.15em"><b>= Same answer</b></div>')
        lines = [banner, f"<p>With preset: <code>{_escape(r.preset.name)}</code> ({_escape(methods_label(r.preset))})"
                         f": {_escape(methods_details(r.preset))}</p>"]
        harm = calibration_note(r.preset)
        if harm is not None:
            lines.append(f'<p id="bp-harm">{_escape(harm)}</p>')
        if "gate" in r.extra:
            lines.append(f'<p id="bp-gate"><b>Audio-confidence gate:</b> {_escape(r.extra["gate"])}</p>')
        if clip is not None:
            claim = r.extra.get("claim")
            said = f"The clip says <b>{clip.audio_answer}</b> (example {clip.key})"
            said += f"; the prompt claims <b>{claim}</b>." if claim and claim != clip.audio_answer else "."
            lines.append(f"<p>{said}</p>")
            marks = {"audio": "✓ matches the audio", "text": "✗ follows the text", "other": "✗ matches neither"}
            lines.append("<ul>"
                         f"<li>Plain: {marks[r.plain_follows or 'other']}</li>"
                         f"<li>With preset: {marks[r.patched_follows or 'other']}</li></ul>")
        return "\n".join(lines)
