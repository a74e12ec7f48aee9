"""The built-in methods, one folder each (config, pure math, install, registry entry), registered on import; their
preset sections are written in this order: back-patching, contrastive decoding, attention to audio, audio-silence
steering, and the gate that scales the first two. A method from outside the package registers the same way
(:func:`backpatch.register_method`; docs/design.md, "Adding a method")."""

from . import attention, backpatching, contrastive, gate, steering
from .attention import Attention
from .backpatching import Patch, patch_label
from .contrastive import Contrastive
from .gate import Gate, gate_label
from .steering import Steering

__all__ = ["Attention", "Contrastive", "Gate", "Patch", "Steering", "attention", "backpatching", "contrastive",
           "gate", "gate_label", "patch_label", "steering"]
