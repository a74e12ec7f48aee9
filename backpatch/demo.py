"""The Gradio side-by-side demo: plain vs preset answers for one clip and prompt (``backpatch demo``).

One model instance serves every user. The compare action runs the plain and the patched ``generate()`` on the
same processor inputs, under one lock and in a queue with ``concurrency_limit=1``, so two requests never patch
the model at once. It is also the API endpoint ``/compare``: the first two inputs are the audio file and the
prompt, the first two outputs the plain and the patched answer texts (``gradio_client`` can call it).

Everything model-related lives in :class:`Demo`, which the tests drive without a browser; :func:`build_app` lays
the Gradio Blocks over it and :func:`launch` loads the model (default: smol-whisper with its preset).
Gradio is an optional dependency (the ``demo`` extra); it is imported only here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import re
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import organism
from .audio_io import AudioFileError, exceeds_window, read_audio, resample, too_long_message
from .bundled import list_presets, load_preset
from .evaluate import ConflictItem, judge, load_conflict_set, normalize
from .inputs import audio_window_seconds, build_inputs, decode_new_tokens, sampling_rate_of
from .loading import display_name
from .methods import Attention, Contrastive, Gate, Patch, Steering, gate_label
from .methods.backpatching import MODES, POSITIONS, uncalibrated_patch
from .methods.gate import GATE_SIGNALS
from .preset import Calibration, Preset, PresetError, methods_details, methods_label
from .wrapper import BackpatchedModel, wrap

# No telemetry and no version check from a demo that must run offline (read when gradio builds the Blocks).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402  (after the environment default above)

__all__ = ["CompareResult", "Demo", "build_app", "launch"]

logger = logging.getLogger(__name__)

MAX_NEW_TOKENS = 32
TOP_K = 5
#: peak amplitude (full scale = 1.0) below which a clip counts as silent: about -80 dBFS
SILENCE_PEAK = 1e-4
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _fail(message: str) -> gr.Error:
    """A friendly error shown in the browser (and returned to API clients); the app keeps serving."""
    return gr.Error(message, duration=None, title="Cannot compare", print_exception=False)


def methods_status(preset: Preset) -> str:
    """Which methods ``preset`` turns on and which it leaves off, gate included, as one Markdown line beside the
    controls: a user sees at a glance that, say, smol-whisper's preset decodes contrastively behind a gate and does
    no back-patching, whatever the patch controls hold."""
    on, off = [], []
    patches = f"back-patching ({len(preset.patches)} patch{'es' if len(preset.patches) > 1 else ''})"
    c = preset.contrastive
    for name, active, detail in (
        ("back-patching", bool(preset.patches), patches),
        ("contrastive decoding", c is not None and c.alpha > 0, f"contrastive decoding α {c.alpha:g}" if c else ""),
        ("attention to audio", preset.attention is not None,
         f"attention to audio α {preset.attention.alpha:g}" if preset.attention else ""),
        ("audio-silence steering", preset.steering is not None,
         f"audio-silence steering β {preset.steering.beta:g}" if preset.steering else ""),
        ("audio-confidence gate", preset.gate is not None,
         f"audio-confidence {gate_label(preset.gate)}" if preset.gate else ""),
    ):
        (on if active else off).append(detail if active else name)
    return f"**On:** {', '.join(on) or 'nothing'}. **Off:** {', '.join(off) or 'nothing'}."


#: control accuracies a calibrated preset records, as the demo names them
_CONTROLS = (("audio_only_acc", "audio-only"), ("consistent_acc", "consistent"))


def calibration_note(preset: Preset, max_harm: float = 0.02) -> str | None:
    """The preset's calibrated control accuracies, before -> after, with eval's ``!`` on each one whose paired 95%
    upper bound on the loss exceeds ``max_harm`` (or, for a preset that recorded no bound, whose loss does);
    None for a preset without calibration numbers."""
    metrics = preset.calibration.metrics if preset.calibration is not None else {}
    parts, marked = [], []
    for prefix, split in (("", "validation"), ("perturbed_", "perturbed validation")):
        cells = []
        for key, name in _CONTROLS:
            before, after = metrics.get(f"{prefix}{key}_before"), metrics.get(f"{prefix}{key}_after")
            if before is None or after is None:
                continue
            bound = metrics.get(f"{prefix}{key}_harm_upper")
            beyond = bound > max_harm + 1e-9 if bound is not None else before - after > max_harm + 1e-9
            cells.append(f"{name} {before:.3f} → {after:.3f}{' !' if beyond else ''}")
            if beyond:
                marked.append(f"{name} ({split})")
        if cells:
            parts.append(f"{split}: " + ", ".join(cells))
    if not parts:
        return None
    text = "Calibrated control accuracy, " + "; ".join(parts) + "."
    if marked:
        text += (f" ! beyond the no-harm bound ({max_harm:g}) for {', '.join(marked)}: this preset costs accuracy "
                 "there.")
    return text


def gate_note(report: dict | None) -> str | None:
    """One sentence on what the audio-confidence gate did to the mitigation for this answer (None: no gate)."""
    if report is None:
        return None
    patch, steps = report["patch"], report["contrastive"]
    parts = []
    if patch:
        parts.append(f"patches at {100 * patch[0]:.0f}% strength")
    if steps:
        parts.append(f"contrastive α at {100 * steps[0][0]:.0f}% on the first token")
    strengths = ([patch[0]] if patch else []) + ([steps[0][0]] if steps else [])
    if not strengths:
        return None
    if max(strengths) == 0.0:
        verdict = "gate closed: the audio did not clearly support an answer, so this is the plain model's answer"
    elif min(strengths) < 1.0:
        verdict = "gate weakened the mitigation: the audio support was partial"
    else:
        verdict = "gate open: full mitigation"
    return f"{verdict} ({', '.join(parts)})"


@dataclass
class Clip:
    """One organism example clip with its prompts (conflict first)."""

    key: str
    path: Path
    audio_answer: str
    items: list[ConflictItem]
    wave: np.ndarray

    @property
    def label(self) -> str:
        voice = self.key.split("-")[2] if self.key.count("-") >= 2 else ""
        return f"{self.audio_answer} · voice {voice} · {self.key}" if voice else f"{self.audio_answer} · {self.key}"

    @property
    def conflict_prompts(self) -> list[str]:
        return [i.prompt for i in self.items if i.kind == "conflict"]


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


def _is_organism(model: torch.nn.Module) -> bool:
    """Organism checkpoints say so in their config (it survives copying the folder)."""
    return getattr(model.config, organism.CONFIG_KEY, None) in organism.NAMES


class Demo:
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

    def _matching_presets(self) -> dict[str, Preset]:
        """The starting preset, then the bundled presets whose ``match`` fits this model."""
        found = {self.preset.name: self.preset}
        model_type = getattr(self.model.config, "model_type", "")
        name = getattr(self.model.config, "_name_or_path", None)
        for preset_name in list_presets():
            if preset_name in found:
                continue
            try:
                candidate = load_preset(preset_name)
            except PresetError:  # pragma: no cover - bundled presets are tested
                continue
            if candidate.match is not None and candidate.match.matches(model_type, name, self.model.config):
                found[preset_name] = candidate
        return found

    def _load_clips(self) -> list[Clip]:
        clips: dict[str, Clip] = {}
        for item in load_conflict_set(organism.examples_path()):
            key = item.audio.stem
            if key not in clips:
                wave = resample(*read_audio(item.audio), self.sampling_rate)
                clips[key] = Clip(key, item.audio, item.audio_answer, [], wave)
            clips[key].items.append(item)
        for clip in clips.values():
            clip.items.sort(key=lambda i: ("conflict", "consistent", "audio_only").index(i.kind))
        return list(clips.values())

    def clip(self, key: str) -> Clip:
        for clip in self.clips:
            if clip.key == key:
                return clip
        raise _fail(f"No example clip named {key!r}.")

    def showcase(self) -> tuple[Clip, str] | None:
        """An organism example where the plain answer follows the text and the preset's follows the audio.

        Scans the conflict items in one batch, then confirms candidates one at a time (as compare runs them).
        """
        items = [i for c in self.clips for i in c.items if i.kind == "conflict"]
        if not items:
            return None
        waves = {c.key: c.wave for c in self.clips}
        plain, patched = self._answers(self.preset, [waves[i.audio.stem] for i in items], [i.prompt for i in items])
        for item, a, b in zip(items, plain, patched, strict=True):
            if judge(a, item) == "text" and judge(b, item) == "audio":
                p1, b1 = self._answers(self.preset, [waves[item.audio.stem]], [item.prompt])
                if judge(p1[0], item) == "text" and judge(b1[0], item) == "audio":
                    return self.clip(item.audio.stem), item.prompt
        return None

    # ---------------------------------------------------------------------------------------- controls
    def controls(self, preset: Preset) -> dict[str, Any]:
        """UI control values for ``preset``: its first patch (or the one-rule default when it has none) and its
        gate (or the schema's default thresholds, switched off, when it has none)."""
        n = self.num_layers
        first = preset.patches[0] if preset.patches else uncalibrated_patch(n)
        alpha = preset.contrastive.alpha if preset.contrastive is not None else 0.0
        gate = preset.gate or Gate()
        return {"source": first.source, "target": first.target, "scale": first.scale, "mode": first.mode,
                "positions": first.positions, "alpha": alpha, "patch_on": bool(preset.patches),
                "attention_alpha": preset.attention.alpha if preset.attention is not None else 0.0,
                "steering_beta": preset.steering.beta if preset.steering is not None else 0.0,
                "gate_on": preset.gate is not None, "gate_signal": gate.signal, "gate_low": gate.low,
                "gate_high": gate.high}

    def block_layers(self, preset: Preset) -> dict[str, list[int]]:
        """The layers the attention and steering controls act on: the preset's blocks', else the middle third
        (MATA's intermediate layers; the steering layers of the audio-specialist-head paper)."""
        middle = [self.num_layers // 3, (2 * self.num_layers) // 3]
        return {"attention": list(preset.attention.layers) if preset.attention is not None else middle,
                "steering": list(preset.steering.layers) if preset.steering is not None else middle}

    def preset_from_controls(self, base_name: str | None, source: Any, target: Any, scale: Any, mode: Any,
                             positions: Any, alpha: Any, patch_on: Any = True, uploaded: dict | None = None,
                             name: str | None = None, attention_alpha: Any = None, steering_beta: Any = None,
                             gate_on: Any = None, gate_signal: Any = None, gate_low: Any = None,
                             gate_high: Any = None) -> Preset:
        """The preset the controls describe: the base preset with its first patch, alpha, blocks and gate replaced.

        Further patches of the base preset are kept; gate controls left at None keep the base preset's gate. Raises
        a friendly error for values no preset can hold.
        """
        base = self.base_preset(base_name, uploaded)

        def integer(value: Any, what: str) -> int:
            if value is None or isinstance(value, bool) or float(value) != int(float(value)):
                raise _fail(f"The {what} layer must be a whole number, got {value!r}.")
            return int(float(value))

        patches = list(base.patches)
        if patch_on in (None, True) or patch_on == "true":
            if mode not in MODES:
                raise _fail(f"Mode {mode!r} is not one of: {', '.join(MODES)}.")
            if positions not in POSITIONS:
                raise _fail(f"Positions {positions!r} is not one of: {', '.join(POSITIONS)}.")
            try:
                # the controls have no norm-matching switch: keep the base preset's choice for its first patch
                match_norm = bool(base.patches) and base.patches[0].match_norm
                first = Patch(source=integer(source, "source"), target=integer(target, "target"),
                              scale=_control_number(scale, "scale"), mode=mode, positions=positions,
                              match_norm=match_norm)
            except PresetError as exc:
                raise _fail(f"These controls do not make a valid patch: {exc}") from None
            patches = [first, *patches[1:]]
        else:
            patches = []
        alpha = _control_number(0.0 if alpha is None else alpha, "contrastive alpha")
        if alpha < 0:
            raise _fail(f"The contrastive alpha must be >= 0 (0 turns it off), got {alpha:g}.")
        gate = _gate_from_controls(base.gate, gate_on, gate_signal, gate_low, gate_high)
        # an audio_gap gate reads the null-audio rows, which stay at alpha 0
        gate_rows = gate is not None and gate.signal == "audio_gap"
        contrastive = None
        if alpha > 0 or gate_rows:
            template = base.contrastive or Contrastive()
            contrastive = Contrastive(alpha=alpha, null_audio=template.null_audio,
                                      plausibility=template.plausibility)
        attention, steering = self._blocks_from_controls(base, attention_alpha, steering_beta)
        if steering is not None and contrastive is None:  # the steering reads the null rows: alpha 0 rides them
            template = base.contrastive or Contrastive(alpha=0.0)
            contrastive = Contrastive(alpha=0.0, null_audio=template.null_audio, plausibility=template.plausibility)
        if not patches and alpha == 0 and attention is None and steering is None:
            raise _fail("Nothing to compare: turn back-patching on, or set a contrastive alpha, an attention alpha or "
                        "a steering beta above 0.")
        if gate is not None and (attention is not None or steering is not None):
            raise _fail("The audio-confidence gate does not act on attention or steering yet: turn the gate off, or "
                        "set those controls to 0.")
        base_rows = base.gate is not None and base.gate.signal == "audio_gap"
        unchanged = patches == base.patches and attention == base.attention and steering == base.steering and (
            gate == base.gate) and (contrastive == (base.contrastive if base.contrastive is not None and (
                base.contrastive.alpha > 0 or base_rows or base.steering is not None) else None))
        if unchanged and name in (None, base.name):
            return base
        description = base.description if unchanged else (
            f"Edited in the backpatch demo from preset {base.name!r} on {self.model_name}; not calibrated.")
        calibration = base.calibration if unchanged else Calibration(status="uncalibrated")
        try:
            return Preset(patches=patches, name=name or base.name, description=description, match=base.match,
                          model=base.model, audio_span=base.audio_span, contrastive=contrastive, gate=gate,
                          attention=attention, steering=steering, calibration=calibration)
        except PresetError as exc:
            raise _fail(f"These controls do not make a valid preset: {exc}") from None

    def _blocks_from_controls(self, base: Preset, attention_alpha: Any,
                              steering_beta: Any) -> tuple[Attention | None, Steering | None]:
        """The attention and steering blocks the two controls describe (0: none); the base preset's layers and form
        are kept, else :meth:`block_layers`."""
        defaults = self.controls(base)
        a = _control_number(defaults["attention_alpha"] if attention_alpha is None else attention_alpha,
                            "attention alpha")
        b = _control_number(defaults["steering_beta"] if steering_beta is None else steering_beta, "steering beta")
        if a < 0:
            raise _fail(f"The attention alpha must be >= 0 (0 turns it off), got {a:g}.")
        layers = self.block_layers(base)
        form = base.attention.form if base.attention is not None else "scale"
        attention = Attention(layers=layers["attention"], alpha=a, form=form) if a > 0 else None
        steering = Steering(layers=layers["steering"], beta=b) if b != 0 else None
        return attention, steering

    def base_preset(self, name: str | None, uploaded: dict | None = None) -> Preset:
        if name is None or name == "":
            return self.preset
        if uploaded and name in uploaded:
            return uploaded[name]
        if name in self.presets:
            return self.presets[name]
        try:
            return load_preset(name)
        except PresetError as exc:
            raise _fail(f"Unknown preset: {exc}") from None

    def fit(self, preset: Preset) -> BackpatchedModel:
        """Wrap the one model with ``preset``; a preset that does not fit the model is a friendly error."""
        try:
            return wrap(self.model, preset, processor=self.processor)
        except PresetError as exc:
            raise _fail(f"The preset does not fit this model ({self.num_layers} decoder layers): {exc}") from None

    def load_preset_file(self, path: str | Path) -> Preset:
        """A user's preset YAML, checked against the model."""
        try:
            preset = Preset.from_yaml(path)
        except PresetError as exc:
            raise _fail(f"That preset file is not valid: {_shorten(str(exc), path)}") from None
        self.fit(preset)
        return preset

    def save_preset(self, preset: Preset, name: str | None = None) -> Path:
        """Write ``preset`` (renamed to ``name``) as YAML into a fresh file for download."""
        name = (name or preset.name).strip()
        if not _NAME_RE.match(name):
            raise _fail("A preset name may hold only letters, digits, '.', '_' and '-' (it is also the file name).")
        if name != preset.name:
            preset = dataclasses.replace(preset, name=name)
        self.fit(preset)
        folder = Path(tempfile.mkdtemp(dir=self._save_dir))
        path = folder / f"{name}.yaml"
        preset.to_yaml(path)
        return path

    # ------------------------------------------------------------------------------------------- audio
    def load_clip(self, audio: Any) -> np.ndarray:
        """The waveform at the model's rate; friendly errors for what the model cannot take."""
        if audio is None or audio == "":
            raise _fail("Choose an audio clip first: upload one, record one, or pick an example.")
        if isinstance(audio, dict):  # a FileData payload from an API client that skipped preprocessing
            audio = audio.get("path")
        name = Path(str(audio)).name
        try:
            wave, rate = read_audio(audio)
        except AudioFileError as exc:
            if "no audio samples" in str(exc):
                raise _fail(f"The audio clip {name} is empty (it has no samples).") from None
            if "not found" in str(exc):
                raise _fail(f"The audio file {name} was not found.") from None
            raise _fail(f"{name} is not an audio file that can be read: use a wav, flac, ogg or mp3 file.") from None
        seconds = len(wave) / rate
        if exceeds_window(seconds, self.max_seconds):
            raise _fail(f"{too_long_message('The clip', seconds, self.max_seconds)}. Trim the clip and try again.")
        if not np.isfinite(wave).all() or float(np.max(np.abs(wave))) < SILENCE_PEAK:
            raise _fail(f"The audio clip {name} is silent: there is nothing for the model to listen to.")
        return resample(wave, rate, self.sampling_rate)

    def match_clip(self, wave: np.ndarray) -> Clip | None:
        """The organism example clip with this waveform (uploads and API calls are matched by content)."""
        for clip in self.clips:
            if len(clip.wave) == len(wave) and np.allclose(clip.wave, wave, atol=2e-3):
                return clip
        return None

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

    def compare(self, audio: Any, prompt: Any, source: Any = None, target: Any = None, scale: Any = None,
                mode: Any = None, positions: Any = None, alpha: Any = None, patch_on: Any = None,
                preset_name: str | None = None, uploaded: dict | None = None, attention_alpha: Any = None,
                steering_beta: Any = None, gate_on: Any = None, gate_signal: Any = None, gate_low: Any = None,
                gate_high: Any = None) -> CompareResult:
        """Plain and preset answers for one clip and prompt, from the same inputs; controls default to the
        preset's values."""
        base = self.base_preset(preset_name, uploaded)
        defaults = self.controls(base)
        given = {"source": source, "target": target, "scale": scale, "mode": mode, "positions": positions,
                 "alpha": alpha, "gate_signal": gate_signal, "gate_low": gate_low, "gate_high": gate_high}
        values = {k: defaults[k] if v is None else v for k, v in given.items()}
        if patch_on is None:  # a preset without patches (contrastive alone) stays without one, unless a patch
            patch_on = defaults["patch_on"] or any(  # control is set
                given[k] is not None for k in ("source", "target", "scale", "mode", "positions"))
        if gate_on is None:  # likewise: a preset without a gate gets one only when a gate control is set
            gate_on = defaults["gate_on"] or any(given[k] is not None for k in ("gate_signal", "gate_low", "gate_high"))
        prompt = "" if prompt is None else str(prompt)
        if not prompt.strip():
            raise _fail("The prompt is empty: type a question about the audio.")
        wave = self.load_clip(audio)
        preset = self.preset_from_controls(base.name, patch_on=patch_on, uploaded=uploaded, gate_on=gate_on,
                                           attention_alpha=attention_alpha, steering_beta=steering_beta, **values)
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


def _switch(value: Any) -> bool:
    """A checkbox's value as sent by the browser (a bool) or an API client (a bool or "true"/"false")."""
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def _gate_from_controls(base: Gate | None, gate_on: Any, signal: Any, low: Any, high: Any) -> Gate | None:
    """The gate the gate controls describe: None when switched off; values left at None come from ``base`` (else
    the schema's defaults), so an API call that names no gate control keeps the preset's gate."""
    if not (base is not None if gate_on is None else _switch(gate_on)):
        return None
    template = base or Gate()
    signal = template.signal if signal in (None, "") else signal
    if signal not in GATE_SIGNALS:
        raise _fail(f"Gate signal {signal!r} is not one of: {', '.join(GATE_SIGNALS)}.")
    low = template.low if low is None else _control_number(low, "gate low threshold")
    high = template.high if high is None else _control_number(high, "gate high threshold")
    try:
        return Gate(signal=signal, low=low, high=high)
    except PresetError as exc:
        raise _fail(f"These gate controls do not make a valid gate: {exc}") from None


def _control_number(value: Any, what: str) -> float:
    """A number control's value as a finite float, else a friendly error naming the control."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise _fail(f"The {what} must be a number, got {value!r}.") from None
    if not np.isfinite(out):
        raise _fail(f"The {what} must be a finite number, got {value!r}.")
    return out


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _shorten(message: str, path: str | Path) -> str:
    """Error messages name the uploaded temp file; show its base name instead."""
    return message.replace(str(path), Path(str(path)).name)


def _item_for(clip: Clip, prompt: str) -> ConflictItem:
    """Judge an answer to ``prompt`` over an organism clip: the prompt's claim is the first digit word in it."""
    words = normalize(prompt).split()
    claim = next((w for w in words if w in organism.DIGITS), None)
    if claim is None:
        kind, claim = "audio_only", None
    else:
        kind = "consistent" if claim == clip.audio_answer else "conflict"
    return ConflictItem(id=clip.key, audio=clip.path, prompt=prompt, audio_answer=clip.audio_answer,
                        text_answer=claim, kind=kind)


# ---------------------------------------------------------------------------------------------------- UI
_INTRO = """# backpatch: plain vs {methods}, side by side
**Model:** `{model}` · audio up to {limit} · **preset** `{preset}`: {details}.
Pick or upload a clip, write a prompt (a misleading one shows text dominance), press **Compare**.
The left answer is the plain model; the right one has the preset applied ({methods}). Bars: the top-5
probabilities of the first answer token."""


def _intro(demo: Demo, preset: Preset) -> str:
    """The page title and its lines, naming what ``preset`` does (a preset without patches is not "back-patched")."""
    limit = f"{demo.max_seconds:g} s" if demo.max_seconds else "the model's limit"
    return _INTRO.format(methods=methods_label(preset), model=demo.model_name, limit=limit, preset=preset.name,
                         details=methods_details(preset))


def _view(demo: Demo, preset: Preset) -> tuple[Any, ...]:
    """What names the preset on the page: the title, the methods line and the labels over the right answer."""
    label = f"With the preset: {methods_label(preset)}"
    return (_intro(demo, preset), methods_status(preset), gr.update(label=label),
            gr.update(label=f"{label}: top-5 first-token probabilities"))


def build_app(model: Any, processor: Any, preset: Preset | str | Path | None = None,
              model_name: str | None = None) -> gr.Blocks:
    """The Gradio Blocks app over one model instance (queued, one request at a time)."""
    demo = Demo(model, processor, preset, model_name)
    return _blocks(demo)


def _blocks(demo: Demo) -> gr.Blocks:
    start = demo.controls(demo.preset)
    n = demo.num_layers
    showcase = demo.showcase() if demo.clips else None
    first_clip, first_prompt = showcase if showcase else ((demo.clips[0], demo.clips[0].conflict_prompts[0])
                                                          if demo.clips else (None, ""))
    label = f"With the preset: {methods_label(demo.preset)}"

    with gr.Blocks(title="backpatch demo", analytics_enabled=False) as app:
        app.backpatch_demo = demo  # for tests and embedding apps
        uploaded = gr.State({})
        intro = gr.Markdown(_intro(demo, demo.preset), elem_id="bp-intro")
        with gr.Row():
            with gr.Column(scale=3):
                audio = gr.Audio(value=str(first_clip.path) if first_clip else None, sources=["upload", "microphone"],
                                 type="filepath", label="Audio clip", elem_id="bp-audio")
                if demo.clips:
                    with gr.Row():
                        example = gr.Dropdown(choices=[(c.label, c.key) for c in demo.clips],
                                              value=first_clip.key, label="Example clip (shipped with the organism)",
                                              elem_id="bp-example", scale=2)
                        example_prompt = gr.Dropdown(choices=[i.prompt for i in first_clip.items],
                                                     value=first_prompt, label="Example prompt",
                                                     elem_id="bp-example-prompt", scale=3)
                prompt = gr.Textbox(value=first_prompt, label="Prompt", lines=2, elem_id="bp-prompt",
                                    placeholder="Ask about the audio, e.g. a misleading 'The speaker says ...'")
                compare_btn = gr.Button("Compare", variant="primary", elem_id="bp-compare")
            with gr.Column(scale=2):
                preset_dd = gr.Dropdown(choices=list(demo.presets), value=demo.preset.name,
                                        label="Preset (bundled presets matching this model)", elem_id="bp-preset")
                status = gr.Markdown(methods_status(demo.preset), elem_id="bp-methods")
                patch_on = gr.Checkbox(value=start["patch_on"], label="Back-patching on (first patch below)",
                                       info="off: the patch controls below are greyed out and not applied",
                                       elem_id="bp-patch-on")
                live = start["patch_on"]  # patch controls look live only while back-patching is on
                with gr.Row():
                    source = gr.Slider(-n, n - 1, value=start["source"], step=1, label="Source layer",
                                       info=f"{n} layers; negative counts from the end", interactive=live,
                                       elem_id="bp-source")
                    target = gr.Slider(-n, n - 1, value=start["target"], step=1, label="Target layer",
                                       interactive=live, elem_id="bp-target")
                with gr.Row():
                    scale = gr.Number(value=start["scale"], label="Scale", interactive=live, elem_id="bp-scale")
                    mode = gr.Dropdown(choices=list(MODES), value=start["mode"], label="Mode", interactive=live,
                                       elem_id="bp-mode")
                    positions = gr.Dropdown(choices=list(POSITIONS), value=start["positions"], label="Positions",
                                            interactive=live, elem_id="bp-positions")
                alpha = gr.Number(value=start["alpha"], minimum=0, label="Contrastive alpha (0 = off)",
                                  elem_id="bp-alpha")
                spans = demo.block_layers(demo.preset)
                with gr.Row():
                    attention_alpha = gr.Number(
                        value=start["attention_alpha"], minimum=0, label="Attention to audio alpha (MATA; 0 = off)",
                        info="layers {}..{} (the preset's, else the middle third)".format(*spans["attention"]),
                        elem_id="bp-attention-alpha")
                    steering_beta = gr.Number(
                        value=start["steering_beta"], label="Audio-silence steering beta (0 = off)",
                        info="layers {}..{} (the preset's, else the middle third)".format(*spans["steering"]),
                        elem_id="bp-steering-beta")
                gate_on = gr.Checkbox(value=start["gate_on"], label="Audio-confidence gate on",
                                      info="scales the patches and contrastive alpha by how much the audio supports "
                                      "the answer: none below low, full from high on (a step when low = high)",
                                      elem_id="bp-gate-on")
                with gr.Row():
                    gate_signal = gr.Dropdown(choices=list(GATE_SIGNALS), value=start["gate_signal"],
                                              label="Gate signal", interactive=start["gate_on"],
                                              elem_id="bp-gate-signal")
                    gate_low = gr.Number(value=start["gate_low"], label="Gate low (0 to 1)",
                                         interactive=start["gate_on"], elem_id="bp-gate-low")
                    gate_high = gr.Number(value=start["gate_high"], label="Gate high (0 to 1)",
                                          interactive=start["gate_on"], elem_id="bp-gate-high")
                extra = gr.Markdown(_extra_patches_note(demo.preset))
                with gr.Accordion("Save or load a preset", open=False):
                    save_name = gr.Textbox(value=f"{demo.preset.name}-custom", label="Name of the saved preset",
                                           elem_id="bp-save-name")
                    save_btn = gr.Button("Save controls as preset YAML", elem_id="bp-save")
                    saved = gr.File(label="Preset YAML (download)", interactive=False, elem_id="bp-saved")
                    upload = gr.File(label="Load a preset YAML", file_types=[".yaml", ".yml"], type="filepath",
                                     elem_id="bp-upload")
        verdict = gr.HTML(label="Verdict", elem_id="bp-verdict")
        with gr.Row(equal_height=True):
            with gr.Column():
                plain_text = gr.Textbox(label="Plain model", interactive=False, elem_id="bp-plain-answer")
                plain_top = gr.Label(num_top_classes=TOP_K, label="Plain: top-5 first-token probabilities",
                                     show_heading=False, elem_id="bp-plain-top")
            with gr.Column():
                patched_text = gr.Textbox(label=label, interactive=False, elem_id="bp-patched-answer")
                patched_top = gr.Label(num_top_classes=TOP_K, label=f"{label}: top-5 first-token probabilities",
                                       show_heading=False, elem_id="bp-patched-top")

        controls = [source, target, scale, mode, positions, alpha, patch_on]
        blocks = [attention_alpha, steering_beta]
        gates = [gate_on, gate_signal, gate_low, gate_high]
        view = [intro, status, patched_text, patched_top]

        # Parameter names become the API's argument names (gradio_client's view_api shows them).
        # attention_alpha, steering_beta and then the gate controls come last, so API callers that pass the first
        # arguments by position keep working
        def on_compare(audio, prompt, source, target, scale, mode, positions, alpha, patch_on, preset, uploaded,
                       attention_alpha, steering_beta, gate_on, gate_signal, gate_low, gate_high):
            r = demo.compare(audio, prompt, source, target, scale, mode, positions, alpha, patch_on, preset, uploaded,
                             attention_alpha, steering_beta, gate_on, gate_signal, gate_low, gate_high)
            return r.plain, r.patched, r.plain_top, r.patched_top, r.verdict_html

        compare_btn.click(on_compare, inputs=[audio, prompt, *controls, preset_dd, uploaded, *blocks, *gates],
                          outputs=[plain_text, patched_text, plain_top, patched_top, verdict],
                          api_name="compare", concurrency_limit=1, concurrency_id="model")
        prompt.submit(on_compare, inputs=[audio, prompt, *controls, preset_dd, uploaded, *blocks, *gates],
                      outputs=[plain_text, patched_text, plain_top, patched_top, verdict],
                      api_visibility="private", concurrency_limit=1, concurrency_id="model")

        def on_preset(name, up):
            base = demo.base_preset(name, up)
            demo.fit(base)
            c = demo.controls(base)
            return (c["source"], c["target"], c["scale"], c["mode"], c["positions"], c["alpha"], c["patch_on"],
                    c["attention_alpha"], c["steering_beta"], c["gate_on"], c["gate_signal"], c["gate_low"],
                    c["gate_high"], _extra_patches_note(base), f"{base.name}-custom", *_view(demo, base))

        preset_outputs = [*controls, *blocks, *gates, extra, save_name, *view]
        preset_dd.input(on_preset, inputs=[preset_dd, uploaded], outputs=preset_outputs, api_visibility="private")

        def on_upload(path, up):
            if not path:
                return gr.skip()
            preset = demo.load_preset_file(path)
            up = {**(up or {}), preset.name: preset}
            choices = list(dict.fromkeys([*demo.presets, *up]))
            return (gr.update(choices=choices, value=preset.name), up, *on_preset(preset.name, up))

        upload.upload(on_upload, inputs=[upload, uploaded], outputs=[preset_dd, uploaded, *preset_outputs],
                      api_visibility="private")

        def from_controls(preset, up, source, target, scale, mode, positions, alpha, patch_on, attention_alpha,
                          steering_beta, gate_on, gate_signal, gate_low, gate_high):
            return demo.preset_from_controls(preset, source, target, scale, mode, positions, alpha, patch_on, up,
                                             attention_alpha=attention_alpha, steering_beta=steering_beta,
                                             gate_on=gate_on, gate_signal=gate_signal, gate_low=gate_low,
                                             gate_high=gate_high)

        def on_save(source, target, scale, mode, positions, alpha, patch_on, preset, uploaded, name, attention_alpha,
                    steering_beta, gate_on, gate_signal, gate_low, gate_high):
            made = from_controls(preset, uploaded, source, target, scale, mode, positions, alpha, patch_on,
                                 attention_alpha, steering_beta, gate_on, gate_signal, gate_low, gate_high)
            return str(demo.save_preset(made, name))

        save_btn.click(on_save, inputs=[*controls, preset_dd, uploaded, save_name, *blocks, *gates], outputs=saved,
                       api_name="save_preset")

        # switches grey out the controls they turn off, and the page names what the controls now run
        patch_on.change(lambda on: [gr.update(interactive=bool(on))] * 5, inputs=patch_on,
                        outputs=[source, target, scale, mode, positions], api_visibility="private", queue=False)
        gate_on.change(lambda on: [gr.update(interactive=bool(on))] * 3, inputs=gate_on,
                       outputs=[gate_signal, gate_low, gate_high], api_visibility="private", queue=False)

        def on_controls(preset, up, *values):  # values: the controls, blocks and gates, in that order
            try:
                made = from_controls(preset, up, *values)
            except gr.Error as exc:
                return gr.skip(), f"The controls do not make a preset that can run: {exc.message}", gr.skip(), gr.skip()
            return _view(demo, made)

        gr.on([c.change for c in [*controls, *blocks, *gates]], on_controls,
              inputs=[preset_dd, uploaded, *controls, *blocks, *gates], outputs=view, api_visibility="private",
              queue=False, show_progress="hidden")

        if demo.clips:
            def on_example(key):
                clip = demo.clip(key)
                first = clip.conflict_prompts[0] if clip.conflict_prompts else clip.items[0].prompt
                return str(clip.path), gr.update(choices=[i.prompt for i in clip.items], value=first), first

            example.input(on_example, inputs=example, outputs=[audio, example_prompt, prompt],
                          api_visibility="private")
            example_prompt.input(lambda p: p, inputs=example_prompt, outputs=prompt, api_visibility="private",
                                 queue=False)

            def on_prompt_typed(text, key):  # keep the example-prompt menu honest about what the prompt says
                choices = [i.prompt for i in demo.clip(key).items] if key else []
                return gr.update(value=text if text in choices else None)

            prompt.input(on_prompt_typed, inputs=[prompt, example], outputs=example_prompt, api_visibility="private",
                         show_progress="hidden", queue=False)
            gr.Examples(examples=[[str(c.path), c.conflict_prompts[0]] for c in demo.clips if c.conflict_prompts],
                        inputs=[audio, prompt], label="Example clips with misleading prompts (click one to load it)",
                        examples_per_page=10)
    app.queue(default_concurrency_limit=1)
    return app


def _extra_patches_note(preset: Preset) -> str:
    more = len(preset.patches) - 1
    if more <= 0:
        return ""
    rest = "; ".join(f"{p.source}→{p.target} {p.mode} ×{p.scale:g} @{p.positions}" for p in preset.patches[1:])
    return f"The preset has {more} more patch{'es' if more > 1 else ''}, applied unchanged: {rest}"


def launch(model: str | None = None, preset: str | Path | Preset | None = None, host: str = "127.0.0.1",
           port: int = 7860, *, dtype: str = "auto", device_map: str | None = None, trust_remote_code: bool = False,
           **launch_kwargs: Any) -> gr.Blocks:
    """Load ``model`` (default: the default model organism) and serve the demo; with no ``preset``, the bundled
    preset matching the model.

    Blocks until the server stops, unless ``prevent_thread_lock=True`` is passed (then returns the running app;
    call ``app.close()``). Extra keyword arguments go to ``gr.Blocks.launch``.
    """
    from .loading import load_model_and_processor

    # Cheap checks first: a bad preset file or a busy port fails before the model loads.
    if isinstance(preset, (str, Path)):
        preset = load_preset(preset)
    check_port(host, port)
    hf_model, processor = load_model_and_processor(model, dtype, device_map, trust_remote_code)
    # preset None: wrap() picks the bundled preset matching the model (an organism's matches its config)
    app = build_app(hf_model, processor, preset, model_name=display_name(model))
    options: dict[str, Any] = {"server_name": host, "server_port": port, "ssr_mode": False, "mcp_server": False,
                               "share": False, "footer_links": ["api"]}
    options.update(launch_kwargs)
    try:
        app.launch(**options)
    except OSError as exc:
        if "Cannot find empty port" not in str(exc):
            raise
        with contextlib.suppress(Exception):  # free what the failed launch started
            app.close()
        raise OSError(_busy_port_message(host, options["server_port"])) from None
    return app


def _busy_port_message(host: str, port: int) -> str:
    return f"port {port} on {host} is already in use; pass a free one with --port (port= in Python), e.g. --port " \
           f"{port + 1 if port < 65535 else 7860}"


def check_port(host: str, port: int) -> None:
    """Raise ``OSError`` naming ``--port`` when nothing can listen on ``host:port`` (another server holds it)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OSError(f"cannot serve on host {host!r} ({exc.strerror}); pass an address such as --host 127.0.0.1"
                      ) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is not busy
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(_busy_port_message(host, port)) from None
            raise OSError(f"cannot serve on {host}:{port} ({exc.strerror or exc}); pass another --port (or --host)"
                          ) from None
