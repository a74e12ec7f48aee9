"""backpatch: make audio LLMs listen to the audio again.

Back-patching routes late-layer hidden states back into an earlier decoder layer during the prefill of
``generate()`` (training-free), to reduce *text dominance*: following a misleading prompt over the audio.
See docs/design.md for the semantics and the README for a quickstart.
"""

from . import organism
from .bundled import list_presets, load_preset
from .controls import Control, ControlError
from .engine import BackpatchRuntimeError
from .methods import Attention, Contrastive, Gate, Patch, Steering
from .preset import AudioSpan, Calibration, Match, ModelFacts, Preset, PresetError, methods_label
from .registry import LayerSpace, Method, get_method, register_method, registered_methods, unregister_method
from .wrapper import BackpatchedModel, apply, backpatch_hook_count, wrap

__version__ = "0.1.0"

__all__ = [
    "Attention",
    "AudioSpan",
    "BackpatchRuntimeError",
    "BackpatchedModel",
    "Calibration",
    "Contrastive",
    "Control",
    "ControlError",
    "Gate",
    "LayerSpace",
    "Match",
    "Method",
    "ModelFacts",
    "Patch",
    "Preset",
    "PresetError",
    "Steering",
    "apply",
    "backpatch_hook_count",
    "get_method",
    "list_presets",
    "load_preset",
    "methods_label",
    "organism",
    "register_method",
    "registered_methods",
    "unregister_method",
    "wrap",
    "__version__",
]
