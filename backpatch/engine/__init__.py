"""The engine: hook plumbing around one call of a Hugging Face model, and nothing about any method.

- :mod:`.hooks`: hooks owned by one call (they act for it only and are always removed), per-model locks;
- :mod:`.call`: the per-call context methods install into, and the install loop over the registry;
- :mod:`.architectures`: per-architecture facts as a table, resolved against a live model;
- :mod:`.positions`: which positions of each row a method acts on;
- :mod:`.tensors`: shapes and cache facts (hidden states in a layer's output, batch axes, cache length);
- :mod:`.readout`: the LM-head readout of a hidden state (final norm, head, soft-cap), written once.
"""

from .architectures import ARCHITECTURES, Architecture, Resolved, architecture_for, get_attr_path, resolve
from .call import Call, generation_session, running_methods
from .hooks import BackpatchRuntimeError, CallHooks, current_call, model_lock, plain_call
from .positions import audio_mask, last_prompt_mask, position_masks
from .readout import FINAL_COMBINES, final_norm, final_states, readout, soft_cap
from .tensors import (
    CACHE_KWARGS,
    LAYER_CACHE_KWARGS,
    at,
    batch_dim,
    cache_is_static,
    cache_length,
    first_rows,
    hidden_of,
    outputs_not_recorded,
    select,
    with_hidden,
)

__all__ = [
    "ARCHITECTURES",
    "FINAL_COMBINES",
    "CACHE_KWARGS",
    "LAYER_CACHE_KWARGS",
    "Architecture",
    "BackpatchRuntimeError",
    "Call",
    "CallHooks",
    "Resolved",
    "architecture_for",
    "at",
    "audio_mask",
    "batch_dim",
    "cache_is_static",
    "cache_length",
    "current_call",
    "final_norm",
    "final_states",
    "first_rows",
    "generation_session",
    "get_attr_path",
    "hidden_of",
    "last_prompt_mask",
    "model_lock",
    "outputs_not_recorded",
    "plain_call",
    "position_masks",
    "readout",
    "resolve",
    "running_methods",
    "select",
    "soft_cap",
    "with_hidden",
]
