"""Read a CTranslate2 ``model.bin`` into numpy arrays, and map its Whisper encoder onto Hugging Face names.

Why hand-written: no maintained library reads CTranslate2 weights back into numpy (``ctranslate2`` itself only
runs them), and the format is small. Layout (binary version 6, little-endian; written by
``ctranslate2/specs/model_spec.py``)::

    u32 binary_version
    str spec_name                      # str = u16 byte length (including a trailing NUL) + bytes
    u32 spec_revision
    u32 n_variables
    n_variables x { str name; u8 rank; rank x u32 dim; u8 dtype; u32 n_bytes; n_bytes of data }
    u32 n_aliases
    n_aliases x { str alias; str target }

``dtype``: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16 (bfloat16 is returned as float32,
since numpy has no bfloat16). The conversion is proven against ``ctranslate2.models.Whisper.encode`` in the
tests, not assumed.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

import numpy as np

SUPPORTED_BINARY_VERSIONS = (5, 6)
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}


class CTranslate2FormatError(ValueError):
    """The bytes are not a CTranslate2 model this reader understands."""


def _read(stream: BinaryIO, fmt: str) -> tuple:
    size = struct.calcsize(fmt)
    data = stream.read(size)
    if len(data) != size:
        raise CTranslate2FormatError("unexpected end of file (truncated model.bin?)")
    return struct.unpack(fmt, data)


def _read_str(stream: BinaryIO) -> str:
    (length,) = _read(stream, "<H")
    raw = stream.read(length)
    if len(raw) != length:
        raise CTranslate2FormatError("unexpected end of file in a string (truncated model.bin?)")
    return raw.rstrip(b"\0").decode("utf-8")


def read_model_bin(stream: BinaryIO) -> tuple[str, int, dict[str, np.ndarray]]:
    """``(spec_name, spec_revision, variables)`` of a CTranslate2 ``model.bin``; aliases resolve to copies."""
    (version,) = _read(stream, "<I")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise CTranslate2FormatError(f"CTranslate2 binary version {version} is not supported "
                                     f"(this reader knows {SUPPORTED_BINARY_VERSIONS})")
    spec = _read_str(stream)
    (revision,) = _read(stream, "<I")
    (count,) = _read(stream, "<I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = _read_str(stream)
        (rank,) = _read(stream, "<B")
        dims = _read(stream, f"<{rank}I") if rank else ()
        (code,) = _read(stream, "<B")
        (n_bytes,) = _read(stream, "<I")
        if code not in _DTYPES:
            raise CTranslate2FormatError(f"variable {name}: unknown dtype code {code}")
        raw = stream.read(n_bytes)
        if len(raw) != n_bytes:
            raise CTranslate2FormatError(f"variable {name}: truncated data")
        if _DTYPES[code] == "bfloat16":
            array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(raw, dtype=np.dtype(_DTYPES[code]).newbyteorder("<"))
        variables[name] = array.reshape(dims)
    (n_aliases,) = _read(stream, "<I")
    for _ in range(n_aliases):
        alias, target = _read_str(stream), _read_str(stream)
        variables[alias] = variables[target]
    return spec, revision, variables


def whisper_encoder_state_dict(variables: dict[str, np.ndarray], max_positions: int | None = None) -> dict:
    """Hugging Face Whisper-encoder parameter names -> float32 torch tensors, from CTranslate2 ``WhisperSpec``.

    The names are those of ``WhisperEncoder`` and ``Qwen2AudioEncoder`` (the latter adds only a parameter-free
    average pool). ``max_positions`` keeps the first rows of the sinusoidal position table (a 2-s window
    needs 100 of Whisper's 1500). CTranslate2 fuses q, k, v into one linear (``linear_0``); Whisper's k
    projection has no bias, so the fused bias is split and its k part dropped.
    """
    import torch

    def tensor(name: str) -> torch.Tensor:
        if name not in variables:
            raise CTranslate2FormatError(f"model.bin has no variable {name!r}: not a Whisper encoder spec")
        return torch.from_numpy(np.array(variables[name], dtype=np.float32))

    positions = tensor("encoder/position_encodings/encodings")
    if max_positions is not None:
        positions = positions[:max_positions]
    out = {
        "conv1.weight": tensor("encoder/conv1/weight"),
        "conv1.bias": tensor("encoder/conv1/bias"),
        "conv2.weight": tensor("encoder/conv2/weight"),
        "conv2.bias": tensor("encoder/conv2/bias"),
        "embed_positions.weight": positions,
        "layer_norm.weight": tensor("encoder/layer_norm/gamma"),
        "layer_norm.bias": tensor("encoder/layer_norm/beta"),
    }
    n_layers = sum(1 for k in variables if k.startswith("encoder/layer_") and k.endswith("ffn/linear_0/weight"))
    for i in range(n_layers):
        src, dst = f"encoder/layer_{i}", f"layers.{i}"
        q, k, v = tensor(f"{src}/self_attention/linear_0/weight").chunk(3, dim=0)
        qb, _kb, vb = tensor(f"{src}/self_attention/linear_0/bias").chunk(3, dim=0)
        out.update({
            f"{dst}.self_attn.q_proj.weight": q, f"{dst}.self_attn.q_proj.bias": qb,
            f"{dst}.self_attn.k_proj.weight": k,
            f"{dst}.self_attn.v_proj.weight": v, f"{dst}.self_attn.v_proj.bias": vb,
            f"{dst}.self_attn.out_proj.weight": tensor(f"{src}/self_attention/linear_1/weight"),
            f"{dst}.self_attn.out_proj.bias": tensor(f"{src}/self_attention/linear_1/bias"),
            f"{dst}.self_attn_layer_norm.weight": tensor(f"{src}/self_attention/layer_norm/gamma"),
            f"{dst}.self_attn_layer_norm.bias": tensor(f"{src}/self_attention/layer_norm/beta"),
            f"{dst}.fc1.weight": tensor(f"{src}/ffn/linear_0/weight"),
            f"{dst}.fc1.bias": tensor(f"{src}/ffn/linear_0/bias"),
            f"{dst}.fc2.weight": tensor(f"{src}/ffn/linear_1/weight"),
            f"{dst}.fc2.bias": tensor(f"{src}/ffn/linear_1/bias"),
            f"{dst}.final_layer_norm.weight": tensor(f"{src}/ffn/layer_norm/gamma"),
            f"{dst}.final_layer_norm.bias": tensor(f"{src}/ffn/layer_norm/beta"),
        })
    return out
