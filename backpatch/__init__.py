"""backpatch: make audio LLMs listen to the audio again.

Back-patching routes late-layer hidden states back into an earlier decoder layer during the prefill of
``generate()`` (training-free), to reduce *text dominance*: following a misleading prompt over the audio.
See docs/design.md for the semantics and the README for a quickstart.
"""

from . import organism
from ._engine import BackpatchRuntimeError
from .bundled import list_presets, load_preset
from .preset import (
    Attention,
    AudioSpan,
    Calibration,
    Contrastive,
    Gate,
    Match,
    ModelFacts,
    Patch,
    Preset,
    PresetError,
    Steering,
    methods_label,
)
from .wrapper import BackpatchedModel, apply, backpatch_hook_count, wrap

__version__ = "0.1.0"

__all__ = [
    "Attention",
    "AudioSpan",
    "BackpatchRuntimeError",
    "BackpatchedModel",
    "Calibration",
    "Contrastive",
    "Gate",
    "Match",
    "ModelFacts",
    "Patch",
    "Preset",
    "PresetError",
    "Steering",
    "apply",
    "backpatch_hook_count",
    "list_presets",
    "load_preset",
    "methods_label",
    "organism",
    "wrap",
    "__version__",
]
