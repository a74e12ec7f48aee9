"""Checking a ``/v1/chat/completions`` request before transformers' handler sees it, and decoding its audio.

transformers' handler trusts its input: a string where it expects a number, a missing key, bad base64 or bytes
that are not audio end as a 500 deep inside it, and its audio loader fetches ``http`` URLs and reads local paths
named by the request. Every request is therefore checked here first, and each problem becomes a
:class:`RequestError`: a 4xx with one sentence that names the offending key (``param``) and the fix.

Audio is decoded here too, the way ``backpatch.audio_io.load_audio`` reads a file (libsndfile, mono mean,
polyphase resampling), so that a clip sent over HTTP becomes the same waveform, and the same answer, as the
same clip loaded in Python. Only inline audio is taken (``input_audio`` base64, or an ``audio_url`` that is a
``data:`` URL); the server never fetches a URL or opens a file a request names.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..audio_io import exceeds_window, fit_to_window, resample, too_long_message, unreadable_reason

#: content part types the server takes; transformers' handler silently drops the ones it does not know
TEXT_PARTS = ("text", "input_text", "output_text")
AUDIO_PARTS = ("input_audio", "audio_url")
ROLES = ("system", "user", "assistant")
#: keys of the ``backpatch`` object of a request (sent with the OpenAI client's ``extra_body``)
OPTION_KEYS = ("enabled", "preset", "truncate_audio")


class RequestError(ValueError):
    """A request the server refuses: ``message`` is one sentence, ``param`` the key it is about."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status


@dataclass
class Options:
    """What a request asks of backpatch (its ``backpatch`` object): on or off, and which preset."""

    enabled: bool = True
    #: ``None``: the server's preset; a bundled preset name; or a preset as a mapping (``Preset.from_dict``)
    preset: str | dict[str, Any] | None = None
    truncate_audio: bool = False


@dataclass
class Checked:
    """A checked request: its backpatch options and its audio clips (in message order) as waveforms."""

    options: Options
    waves: list[np.ndarray] = field(default_factory=list)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if _is_number(value) else type(value).__name__)


def check_options(raw: Any) -> Options:
    """The ``backpatch`` object of a request, checked: only known keys, each of the right type."""
    if raw is None:
        return Options()
    if not isinstance(raw, dict):
        raise RequestError(f"backpatch must be an object such as {{\"enabled\": false}}, got {_type_name(raw)}",
                           "backpatch")
    unknown = sorted(set(raw) - set(OPTION_KEYS))
    if unknown:
        raise RequestError(f"backpatch.{unknown[0]} is not a backpatch option; use one of: {', '.join(OPTION_KEYS)}",
                           f"backpatch.{unknown[0]}")
    options = Options()
    for key in ("enabled", "truncate_audio"):
        if key in raw:
            if not isinstance(raw[key], bool):
                raise RequestError(f"backpatch.{key} must be true or false, got {_type_name(raw[key])}",
                                   f"backpatch.{key}")
            setattr(options, key, raw[key])
    if raw.get("preset") is not None:
        if not isinstance(raw["preset"], (str, dict)) or raw["preset"] == "":
            raise RequestError("backpatch.preset must be a bundled preset name or a preset object, got "
                               f"{_type_name(raw['preset'])}", "backpatch.preset")
        options.preset = raw["preset"]
    return options


# Generation fields: (check, what the check wants); transformers' handler converts them with int()/float().
_FIELDS: dict[str, tuple[Any, str]] = {
    "model": (lambda v: isinstance(v, str), "a string"),
    "stream": (lambda v: isinstance(v, bool), "true or false"),
    "max_tokens": (lambda v: _is_int(v) and v >= 1, "a whole number of at least 1"),
    "max_completion_tokens": (lambda v: _is_int(v) and v >= 1, "a whole number of at least 1"),
    "temperature": (lambda v: _is_number(v) and v >= 0, "a number of at least 0"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "seed": (_is_int, "a whole number"),
    # transformers maps it to repetition_penalty = 1 + frequency_penalty, which must stay above 0
    "frequency_penalty": (lambda v: _is_number(v) and -1 < v <= 2, "a number above -1 and at most 2"),
    "stop": (lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
             "a string or a list of strings"),
    "logit_bias": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and k.lstrip("-").isdigit()
                                                         and _is_number(x) for k, x in v.items()),
                   "an object mapping token ids to numbers"),
    "chat_template_kwargs": (lambda v: isinstance(v, dict), "an object"),
    "generation_config": (lambda v: isinstance(v, str), "a JSON string"),
    "tools": (lambda v: isinstance(v, list), "a list"),
}


def _check_fields(body: dict[str, Any]) -> None:
    for key, (ok, wanted) in _FIELDS.items():
        if body.get(key) is not None and not ok(body[key]):
            raise RequestError(f"{key} must be {wanted}, got {body[key]!r:.60}", key)
    if body.get("generation_config") is not None:
        import json

        try:
            parsed = json.loads(body["generation_config"])
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise RequestError("generation_config must be a JSON object in a string, e.g. '{\"do_sample\": false}'",
                               "generation_config")


def _base64_audio(text: str, where: str) -> bytes:
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise RequestError(f"{where} is a data URL without base64 data; send 'data:audio/wav;base64,...'", where)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where} is not valid base64; send the audio file's bytes base64-encoded", where) from None
    if not data:
        raise RequestError(f"{where} is empty; send a wav, flac, ogg or mp3 file base64-encoded", where)
    return data


def _audio_bytes(part: dict[str, Any], where: str) -> tuple[bytes, str]:
    """The encoded audio file of an ``input_audio`` or ``audio_url`` part, and the key it came from."""
    if part["type"] == "input_audio":
        payload, where = part.get("input_audio"), f"{where}.input_audio"
        if isinstance(payload, str):  # transformers accepts the bare base64 string too
            return _base64_audio(payload, where), where
        if not isinstance(payload, dict) or not isinstance(payload.get("data"), str):
            raise RequestError(f"{where} must be an object {{\"data\": BASE64, \"format\": \"wav\"}}", where)
        if payload.get("format") is not None and not isinstance(payload["format"], str):
            raise RequestError(f"{where}.format must be a string such as \"wav\" or \"mp3\"", f"{where}.format")
        return _base64_audio(payload["data"], f"{where}.data"), f"{where}.data"
    payload, where = part.get("audio_url"), f"{where}.audio_url"
    if not isinstance(payload, dict) or not isinstance(payload.get("url"), str):
        raise RequestError(f"{where} must be an object {{\"url\": \"data:audio/wav;base64,...\"}}", where)
    if not payload["url"].startswith("data:"):
        raise RequestError(f"{where}.url must be a data: URL holding the audio (this server does not fetch URLs or "
                           "read files); send input_audio with the base64 bytes instead", f"{where}.url")
    return _base64_audio(payload["url"], f"{where}.url"), f"{where}.url"


def decode_audio(data: bytes, where: str, sampling_rate: int, window_s: float | None,
                 truncate: bool = False) -> np.ndarray:
    """The mono float32 waveform of an encoded audio file at ``sampling_rate``, as ``load_audio`` reads a file.

    A clip longer than the model's audio window (``window_s``) is refused unless ``truncate``.
    """
    import soundfile as sf

    try:
        wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:  # noqa: BLE001 - libsndfile raises several types; the sentence names the fix
        raise RequestError(f"{where} is not audio that can be read ({unreadable_reason(exc)}); send a wav, flac, "
                           "ogg or mp3 file", where) from None
    if wave.size == 0:
        raise RequestError(f"{where} holds no audio samples; send a non-empty clip", where)
    wave = wave.mean(axis=1)
    seconds = len(wave) / rate
    if exceeds_window(seconds, window_s) and not truncate:
        raise RequestError(f"{too_long_message(where, seconds, window_s)}; trim the clip, or send "
                           f"\"backpatch\": {{\"truncate_audio\": true}} to use only its first {window_s:g} s", where)
    wave, _ = fit_to_window(wave, rate, window_s, truncate, where)
    return resample(wave, int(rate), sampling_rate)


def check_request(body: Any, sampling_rate: int, window_s: float | None) -> Checked:
    """Check a chat completion request's shape and types, read its ``backpatch`` options and decode its audio.

    Raises :class:`RequestError` for anything transformers' handler would fail on or silently drop; keys it does not
    know are left to the handler's own check (a 422 naming them).
    """
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {_type_name(body)}")
    options = check_options(body.get("backpatch"))
    _check_fields(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of chat messages", "messages")
    encoded: list[tuple[bytes, str]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with role and content, got {_type_name(message)}", where)
        if message.get("role") not in ROLES:
            raise RequestError(f"{where}.role must be one of: {', '.join(ROLES)}; got {message.get('role')!r:.40}",
                               f"{where}.role")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise RequestError(f"{where}.content must be a string or a list of content parts, got "
                               f"{_type_name(content)}", f"{where}.content")
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise RequestError(f"{at} must be an object with a type (text, input_audio or audio_url)", at)
            if part["type"] in TEXT_PARTS:
                if not isinstance(part.get("text"), str):
                    raise RequestError(f"{at}.text must be a string", f"{at}.text")
            elif part["type"] in AUDIO_PARTS:
                encoded.append(_audio_bytes(part, at))
            else:
                raise RequestError(f"{at}.type {part['type']!r:.40} is not taken by this audio server; use text, "
                                   "input_audio or audio_url parts", f"{at}.type")
    if not encoded:
        raise RequestError("the request holds no audio: add a content part {\"type\": \"input_audio\", "
                           "\"input_audio\": {\"data\": BASE64, \"format\": \"wav\"}} to a user message", "messages")
    waves = [decode_audio(data, where, sampling_rate, window_s, options.truncate_audio) for data, where in encoded]
    return Checked(options, waves)
