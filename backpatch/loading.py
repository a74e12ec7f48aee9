"""Loading real checkpoints (a hub id or a local directory) with the right Auto classes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

# Tried in order; the first whose mapping knows the checkpoint's config class loads it. Audio LLMs sit in the
# multimodal-LM mapping in transformers 5.x; the others catch families registered elsewhere.
_AUTO_CLASSES = ("AutoModelForMultimodalLM", "AutoModelForSeq2SeqLM", "AutoModelForImageTextToText",
                 "AutoModelForCausalLM")


ORGANISM_PREFIX = "organism:"


def default_model() -> str:
    """The default model organism (DESIGN section 4b): the model every command uses without --model."""
    from . import organism

    return str(organism.path(organism.DEFAULT))


def resolve_model_id(model_id: str | None) -> str:
    """A loadable id: ``None`` is the default organism, ``organism:NAME`` that organism's checkpoint folder."""
    if model_id is None:
        return default_model()
    if model_id.startswith(ORGANISM_PREFIX):
        from . import organism

        name = model_id[len(ORGANISM_PREFIX):]
        if name not in organism.NAMES:
            raise ValueError(f"unknown organism {name!r} in --model {model_id}; organisms: "
                             f"{', '.join(ORGANISM_PREFIX + n for n in organism.NAMES)}")
        return str(organism.path(name))
    return model_id


def display_name(model_id: str | None) -> str:
    """How reports name the model: ``organism:NAME`` for organisms (also the default), else the id as given."""
    from . import organism

    return f"{ORGANISM_PREFIX}{organism.DEFAULT}" if model_id is None else model_id


def load_model_and_processor(
    model_id: str | None = None,
    dtype: str = "auto",
    device_map: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[torch.nn.Module, Any]:
    """``(model, processor)`` for ``model_id`` (default: the default organism; ``organism:NAME`` works), in eval mode.

    ``trust_remote_code`` stays off unless asked for: a checkpoint's own Python code is not run by default.
    """
    import transformers
    from transformers import AutoConfig, AutoProcessor

    model_id = resolve_model_id(model_id)
    looks_local = model_id.startswith((".", "/", "~")) or Path(model_id).exists()
    if looks_local and not (Path(model_id).expanduser() / "config.json").is_file():
        raise FileNotFoundError(
            f"no model checkpoint at {model_id} (expected a directory with config.json, as save_pretrained writes); "
            "pass a local checkpoint directory or a hub id"
        )
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    config = AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    for name in _AUTO_CLASSES:
        auto = getattr(transformers, name)
        if type(config) in auto._model_mapping:
            break
    else:
        raise ValueError(
            f"{model_id}: no generative Auto class knows model_type {config.model_type!r}; "
            "is this an audio LLM supported by the installed transformers?"
        )
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if device_map:
        kwargs["device_map"] = device_map
    logger.info("loading %s with %s", model_id, name)
    model = auto.from_pretrained(model_id, **kwargs).eval()
    processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    return model, processor
