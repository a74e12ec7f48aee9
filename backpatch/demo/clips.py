"""The audio side of the demo: the organism's example clips and their prompts, reading a user's clip (friendly
errors for empty, unreadable, too long or silent audio), recognising an example by its content, judging an answer
against the clip, and picking the showcase example the page opens on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import organism
from ..audio_io import AudioFileError, exceeds_window, read_audio, resample, too_long_message
from ..evaluate import ConflictItem, judge, load_conflict_set, normalize
from .errors import _fail

#: peak amplitude (full scale = 1.0) below which a clip counts as silent: about -80 dBFS
SILENCE_PEAK = 1e-4


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


def _is_organism(model: torch.nn.Module) -> bool:
    """Organism checkpoints say so in their config (it survives copying the folder)."""
    return getattr(model.config, organism.CONFIG_KEY, None) in organism.NAMES


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


class ClipsMixin:
    """:class:`~backpatch.demo.Demo`'s clip actions (it holds ``sampling_rate``, ``max_seconds``, ``clips``,
    ``preset`` and ``_answers``)."""

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
