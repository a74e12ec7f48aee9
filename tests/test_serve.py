"""``backpatch serve`` as its clients see it: a real server process on 127.0.0.1, the official ``openai`` client.

Answers are compared with the Python path (``wrap(...).generate`` on the inputs ``build_inputs`` makes): the
back-patched answer, the plain one (``enabled: false``), streamed text, other presets per request. The load test
and the bad-request test use ``organism:digits`` (instant); the Python-parity and README tests use smol-whisper.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
from openai import BadRequestError, OpenAI

import backpatch
from backpatch.audio_io import load_audio
from backpatch.cli import main
from backpatch.inputs import build_inputs, decode_new_tokens
from backpatch.loading import load_model_and_processor

WAV = backpatch.organism.examples_path().parent / "wav"
CLIP = WAV / "te-zero-f3-0018-0.wav"  # says "zero"; the digits organism follows the claim plainly, the audio patched
PROMPT = 'The speaker says "two". Which digit is spoken?'
SMOL_CLIP = WAV / "te-six-david-0161-0.wav"  # says "six"; smol-whisper follows PROMPT's claim plainly, the audio
                                             # with its preset (the README's serve snippet asks the same)
MAX_TOKENS = 8
README = Path(__file__).resolve().parents[1] / "README.md"
MARK = "<!-- runs in tests/test_serve.py -->"
# The server process uses one CPU thread (the tests share the machine); the rest is the CLI as users run it.
SERVER = "import sys, torch; torch.set_num_threads(1); from backpatch.cli import main; sys.exit(main(sys.argv[1:]))"


# ------------------------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
        return json.loads(response.read())


class Server:
    """``backpatch serve`` in a subprocess on a random free port; stopped (and waited for) on exit."""

    def __init__(self, model: str, *options: str) -> None:
        self.model, self.port = model, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="backpatch-serve-", suffix=".log", delete=False)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.process = subprocess.Popen([sys.executable, "-c", SERVER, "serve", "--model", model, "--host",
                                         "127.0.0.1", "--port", str(self.port), *options],
                                        stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait(self, timeout: float = 300) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if health(self.url)["status"] == "ok":
                    return self
            except (OSError, ValueError):
                time.sleep(0.5)
        raise AssertionError(f"the server did not answer /health in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()
        os.unlink(self.log.name)

    def client(self) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)


def audio_part(path: Path = CLIP, data: bytes | None = None) -> dict:
    data = path.read_bytes() if data is None else data
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": "wav"}}


def messages(prompt: str = PROMPT, path: Path = CLIP) -> list[dict]:
    return [{"role": "user", "content": [audio_part(path), {"type": "text", "text": prompt}]}]


def ask(client: OpenAI, model: str, prompt: str = PROMPT, path: Path = CLIP, stream: bool = False,
        backpatch_options: dict | None = None) -> str:
    """The answer text of one greedy request, streamed or not."""
    extra = None if backpatch_options is None else {"backpatch": backpatch_options}
    reply = client.chat.completions.create(model=model, messages=messages(prompt, path), max_tokens=MAX_TOKENS,
                                           temperature=0, stream=stream, extra_body=extra)
    if stream:
        return "".join(chunk.choices[0].delta.content or "" for chunk in reply if chunk.choices).strip()
    return reply.choices[0].message.content.strip()


class Python:
    """The same model loaded in this process: the answers ``wrap(...).generate`` gives."""

    def __init__(self, name: str, dtype: str = "auto") -> None:
        self.model, self.processor = load_model_and_processor(name, dtype)
        self.wrapped = backpatch.wrap(self.model, processor=self.processor)
        self._answers: dict[tuple, str] = {}

    def answer(self, prompt: str = PROMPT, path: Path = CLIP, enabled: bool = True, preset=None,
               truncate: bool = False) -> str:
        key = (prompt, str(path), enabled, truncate)
        if preset is None and key in self._answers:  # smol-whisper answers take seconds on a busy CPU
            return self._answers[key]
        wrapped = self.wrapped if preset is None else backpatch.wrap(self.model, preset, processor=self.processor)
        wave = load_audio(path, self.processor.feature_extractor.sampling_rate)
        inputs = build_inputs(self.processor, [wave], [prompt], truncate=truncate)
        for key, value in inputs.items():  # as the server (and the demo) do for a bf16/fp16 model
            if value.is_floating_point():
                inputs[key] = value.to(self.model.dtype)
        with torch.no_grad():
            if enabled:
                out = wrapped.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
            else:
                with wrapped.disabled():
                    out = wrapped.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        text = decode_new_tokens(self.processor, out, inputs["input_ids"].shape[1])[0]
        if preset is None:
            self._answers[key] = text
        return text


@pytest.fixture(scope="module")
def digits_server():
    server = Server("organism:digits")
    try:
        yield server.wait()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def smol_server():
    server = Server("organism:smol-whisper")
    try:
        yield server.wait()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def digits_python():
    return Python("organism:digits")


@pytest.fixture(scope="module")
def smol_python():
    return Python("organism:smol-whisper")


# ---------------------------------------------------------------------------------------------- the tests
def test_smol_whisper_answers_as_python_plain_patched_and_streamed(smol_server, smol_python):
    client, model = smol_server.client(), "organism:smol-whisper"
    patched, plain = smol_python.answer(path=SMOL_CLIP), smol_python.answer(path=SMOL_CLIP, enabled=False)
    assert (plain, patched) == ("two", "six")  # the misleading prompt wins plainly; the preset hears the audio
    assert ask(client, model, path=SMOL_CLIP) == patched
    assert ask(client, model, path=SMOL_CLIP, backpatch_options={"enabled": False}) == plain
    assert ask(client, model, path=SMOL_CLIP, stream=True) == patched
    assert ask(client, model, path=SMOL_CLIP, stream=True, backpatch_options={"enabled": False}) == plain
    assert ask(client, model, path=SMOL_CLIP, backpatch_options={"preset": "smol-whisper"}) == patched  # by name
    other = WAV / "te-one-Andy-0026-0.wav"
    assert ask(client, model, 'The speaker says "six". Which digit is spoken?', other) == smol_python.answer(
        'The speaker says "six". Which digit is spoken?', other)
    assert health(smol_server.url)["backpatch_hook_count"] == 0


def test_a_client_leaving_mid_stream_leaves_no_hook_and_no_change(smol_server, smol_python):
    """/health counts the hooks of a generation in flight (contrastive decoding holds two for the whole call); a client
    that disconnects mid-stream cancels it, the hooks go, and the next answer is unchanged."""
    client, model = smol_server.client(), "organism:smol-whisper"
    # 2000 tokens take minutes on one CPU thread (400 took 52 s here); cancelled, the hooks go within a second
    long = json.dumps({"max_new_tokens": 2000, "min_new_tokens": 2000, "do_sample": False})
    stream = client.chat.completions.create(model=model, messages=messages(), stream=True,
                                            extra_body={"generation_config": long})
    next(iter(stream))
    seen, deadline = 0, time.monotonic() + 30
    while not seen and time.monotonic() < deadline:
        seen = health(smol_server.url)["backpatch_hook_count"]
    stream.close()
    assert seen > 0
    deadline = time.monotonic() + 30
    while health(smol_server.url)["backpatch_hook_count"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert health(smol_server.url)["backpatch_hook_count"] == 0
    assert ask(client, model) == smol_python.answer()


def test_readme_client_snippet_runs_against_the_server(smol_server, smol_python, capsys):
    blocks = re.findall(re.escape(MARK) + r"\s*```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1, f"README.md has {len(blocks)} blocks marked {MARK!r}"
    code = blocks[0]
    assert code.count("http://127.0.0.1:8000/v1") == 1
    scope: dict = {"__name__": "__readme__"}
    exec(compile(code.replace("http://127.0.0.1:8000/v1", f"{smol_server.url}/v1"), "README.md serve", "exec"), scope)
    assert scope["reply"].choices[0].message.content.strip() == smol_python.answer(path=SMOL_CLIP)
    assert scope["plain"].choices[0].message.content.strip() == smol_python.answer(path=SMOL_CLIP, enabled=False)
    assert scope["streamed"].strip() == smol_python.answer(path=SMOL_CLIP)
    assert "with preset: six | plain: two" in capsys.readouterr().out


def test_per_request_presets_match_python(digits_server, digits_python):
    client, model = digits_server.client(), "organism:digits"
    assert ask(client, model) == digits_python.answer() == "zero"
    assert ask(client, model, backpatch_options={"enabled": False}) == digits_python.answer(enabled=False) == "two"
    assert ask(client, model, backpatch_options={"preset": "organism-digits"}) == "zero"
    # a preset sent inline: the calibrated patch without its contrastive part answers like the same preset in Python
    inline = {"name": "last-only", "patches": [{"source": 11, "target": 0, "mode": "replace", "positions": "last"}]}
    assert ask(client, model, backpatch_options={"preset": inline}) == digits_python.answer(
        preset=backpatch.Preset.from_dict(inline))
    # add with scale 0 is plain (DESIGN section 1), also when streamed
    zero = {"name": "zero", "patches": [{"source": 11, "target": 0, "scale": 0.0}]}
    assert ask(client, model, stream=True, backpatch_options={"preset": zero}) == "two"
    listed = digits_server.client().models.list().data
    assert [m.id for m in listed] == [model]
    assert listed[0].model_extra["backpatch"] == {"preset": "organism-digits", "presets": ["organism-digits"]}


def test_concurrent_clients_get_the_sequential_answers(digits_server, digits_python):
    """8 clients x 25 requests, mixed plain / back-patched / streamed over several clips and prompts."""
    model = "organism:digits"
    items = [json.loads(line) for line in backpatch.organism.examples_path().read_text().splitlines()]
    items = [i for i in items if i["kind"] == "conflict"][:12:2]
    root = backpatch.organism.examples_path().parent
    modes = [(True, False), (False, False), (True, True), (False, True)]  # (enabled, stream)
    requests = [(root / i["audio"], i["prompt"], enabled, stream) for i in items for enabled, stream in modes]
    client = digits_server.client()
    expected = {}
    for path, prompt, enabled, stream in requests:
        expected[path, prompt, enabled, stream] = ask(client, model, prompt, path, stream, {"enabled": enabled})
    for path, prompt, enabled, _ in requests[::2]:  # the sequential answers are the Python ones
        assert expected[path, prompt, enabled, False] == digits_python.answer(prompt, path, enabled)
    assert any(expected[p, q, True, False] != expected[p, q, False, False] for p, q, _, _ in requests)

    def client_run(seed: int) -> list[tuple[tuple, str]]:
        own = digits_server.client()
        picks = random.Random(seed).choices(requests, k=25)
        return [(key, ask(own, model, key[1], key[0], key[3], {"enabled": key[2]})) for key in picks]

    with ThreadPoolExecutor(8) as pool:
        results = [row for rows in pool.map(client_run, range(8)) for row in rows]
    assert len(results) == 200
    wrong = [(key, got, expected[key]) for key, got in results if got != expected[key]]
    assert not wrong, wrong[:5]
    state = health(digits_server.url)
    assert state["status"] == "ok" and state["backpatch_hook_count"] == 0
    assert ask(client, model) == digits_python.answer()


def _wav(seconds: float, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    sf.write(buffer, (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format="WAV")
    return buffer.getvalue()


def _body(**changes) -> dict:
    body = {"model": "organism:digits", "messages": messages(), "max_tokens": MAX_TOKENS, "temperature": 0}
    body.update(changes)
    return body


def _with_content(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


TEXT = {"type": "text", "text": PROMPT}
BAD_REQUESTS = {
    # name: (body (a dict, or raw bytes), the words the error message must hold, the param it names)
    "no audio": (_body(messages=[{"role": "user", "content": PROMPT}]), "no audio", "messages"),
    "non-audio bytes": (_body(messages=_with_content(audio_part(data=b"this is not audio at all" * 40), TEXT)),
                        "not audio that can be read (Format not recognised)",
                        "messages[0].content[0].input_audio.data"),
    "60-s clip": (_body(messages=_with_content(audio_part(data=_wav(60)), TEXT)), "60.00 s long",
                  "messages[0].content[0].input_audio.data"),
    "bad base64": (_body(messages=_with_content(
        {"type": "input_audio", "input_audio": {"data": "@@not base64!!", "format": "wav"}}, TEXT)),
        "not valid base64", "messages[0].content[0].input_audio.data"),
    "empty audio": (_body(messages=_with_content(audio_part(data=_wav(0)), TEXT)), "no audio samples",
                    "messages[0].content[0].input_audio.data"),
    "unknown preset": (_body(backpatch={"preset": "no-such-preset"}), "is not a bundled preset", "backpatch.preset"),
    "preset of another model": (_body(backpatch={"preset": "qwen2-audio-7b-instruct"}), "not made for this model",
                                "backpatch.preset"),
    "invalid inline preset": (_body(backpatch={"preset": {"name": "x", "patches": [{"source": 1, "target": 5}]}}),
                              "must be a later layer", "backpatch.preset"),
    "unknown option": (_body(backpatch={"enabeld": False}), "not a backpatch option", "backpatch.enabeld"),
    "option of the wrong type": (_body(backpatch={"enabled": "no"}), "true or false", "backpatch.enabled"),
    "backpatch not an object": (_body(backpatch="off"), "must be an object", "backpatch"),
    "max_tokens a string": (_body(max_tokens="8"), "whole number", "max_tokens"),
    "temperature a string": (_body(temperature="hot"), "a number", "temperature"),
    "messages a string": (_body(messages="hello"), "non-empty list", "messages"),
    "content a number": (_body(messages=[{"role": "user", "content": 5}]), "string or a list", "messages[0].content"),
    "audio data a number": (_body(messages=_with_content(
        {"type": "input_audio", "input_audio": {"data": 123}}, TEXT)), "must be an object",
        "messages[0].content[0].input_audio"),
    "remote audio_url": (_body(messages=_with_content({"type": "audio_url", "audio_url": {"url": "http://x/a.wav"}},
                                                      TEXT)),
                         "does not fetch URLs", "messages[0].content[0].audio_url.url"),
    "image part": (_body(messages=_with_content(audio_part(), {"type": "image_url", "image_url": {"url": "x"}})),
                   "not taken by this audio server", "messages[0].content[1].type"),
    "bad role": (_body(messages=[{"role": "robot", "content": PROMPT}]), "role must be one of", "messages[0].role"),
    "another model": (_body(model="gpt-4o"), "pinned to 'organism:digits'", "model"),
    "unknown field": (_body(temprature=0), "temprature is not a chat completion field", "temprature"),
    "body a list": (b"[1, 2]", "not a JSON object", None),
    "not JSON": (b"{not json", "not a JSON object", None),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_a_4xx_naming_the_problem(digits_server, name):
    body, words, param = BAD_REQUESTS[name]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{digits_server.url}/v1/chat/completions", content=content,
                          headers={"content-type": "application/json"}, timeout=60)
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert words in error["message"], error
    assert error["param"] == param
    assert "\n" not in error["message"]
    assert " object at 0x" not in error["message"]  # a Python object's repr tells a client nothing


def test_after_bad_requests_the_server_answers_as_before(digits_server, digits_python):
    client = digits_server.client()
    for body, _, _ in BAD_REQUESTS.values():  # every bad request again, then the same good answers as Python
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        httpx.post(f"{digits_server.url}/v1/chat/completions", content=content,
                   headers={"content-type": "application/json"}, timeout=60)
    assert httpx.post(f"{digits_server.url}/reset", timeout=10).status_code == 404  # would unload the model
    assert httpx.post(f"{digits_server.url}/v1/responses", json={}, timeout=10).status_code == 404  # unpatched
    assert ask(client, "organism:digits") == digits_python.answer()
    assert ask(client, "organism:digits", backpatch_options={"enabled": False}) == digits_python.answer(enabled=False)
    with pytest.raises(BadRequestError, match="no audio"):  # the openai client raises the sentence
        client.chat.completions.create(model="organism:digits", messages=[{"role": "user", "content": "hi"}])
    assert httpx.post(f"{digits_server.url}/load_model", json={"model": "x"}, timeout=10).status_code == 404
    # a 60-s clip is taken when the request asks for truncation: its first window, as truncate=True in Python
    long_clip = _write_tmp(_wav(60))
    assert ask(client, "organism:digits", path=long_clip, backpatch_options={"truncate_audio": True}) == \
        digits_python.answer(path=long_clip, truncate=True)
    state = health(digits_server.url)
    assert state == {"status": "ok", "model": "organism:digits", "preset": "organism-digits",
                     "backpatch_hook_count": 0}


def _write_tmp(data: bytes) -> Path:
    path = Path(tempfile.mkdtemp(prefix="backpatch-serve-test-")) / "long.wav"
    path.write_bytes(data)
    return path


def test_bfloat16_server_answers_as_python_in_bfloat16():
    server, python = Server("organism:digits", "--dtype", "bfloat16"), Python("organism:digits", "bfloat16")
    try:
        client = server.wait().client()
        assert ask(client, "organism:digits") == python.answer()
        assert ask(client, "organism:digits", stream=True, backpatch_options={"enabled": False}) == python.answer(
            enabled=False)
    finally:
        server.stop()


def test_cli_refuses_continuous_batching_in_one_sentence(capsys):
    assert main(["serve", "--model", "organism:digits", "--continuous-batching"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("backpatch: error: continuous batching cannot be back-patched") and "\n" not in err


def test_cli_names_a_busy_port_before_loading(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        assert main(["serve", "--model", "organism:digits", "--port", str(port)]) == 2
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err.strip()
    assert f"port {port} on 127.0.0.1 is already in use; pass a free one with --port" in err and "\n" not in err

