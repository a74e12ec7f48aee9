"""What the layer-block methods (attention to audio, audio-silence steering) share: the layers a block acts on when
the preset names none."""

from __future__ import annotations

from typing import Any


def middle_third(num_layers: int) -> list[int]:
    """MATA's intermediate layers; the steering layers of the audio-specialist-head paper."""
    return [num_layers // 3, (2 * num_layers) // 3]


def block_layers(config: Any, num_layers: int) -> list[int]:
    """The layers a block's controls act on: the preset's block's, else :func:`middle_third`."""
    return list(config.layers) if config is not None else middle_third(num_layers)
