"""Throughput and latency of ``backpatch serve``, plain against back-patched requests, in one run.

For each model it starts ``backpatch serve`` as a subprocess on 127.0.0.1 (a free port), warms it up, then runs
``--rounds`` rounds; in each round ``--clients`` concurrent clients (the official ``openai`` client) send
``--requests`` greedy requests over the organism's shipped conflict items, once per variant: ``plain``
(``extra_body`` ``{"backpatch": {"enabled": false}}``), ``backpatched`` (the model's preset, as served by default;
the organisms' presets add contrastive decoding, a second decoding stream) and ``patches-only`` (the same preset's
patches without its contrastive part, sent inline as ``{"backpatch": {"preset": {...}}}``); the variant order
rotates between rounds so that machine noise hits all alike. It prints per variant: requests/s (requests over the
summed wall time of its phases), p50/p95 latency of single requests, mean completion tokens (an answer's length
changes with its content), and the ratios to plain.

Usage: python benchmarks/serve.py [--models organism:digits,organism:smol-whisper] [--clients 4] [--requests 24]
       [--rounds 2] [--threads 2] [--max-tokens 8] [--stream]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from openai import OpenAI

import backpatch

SERVER = ("import sys, torch; torch.set_num_threads(int(sys.argv[1])); from backpatch.cli import main; "
          "sys.exit(main(sys.argv[2:]))")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(model: str, threads: int) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="backpatch-serve-bench-", suffix=".log")[1])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    url = f"http://127.0.0.1:{port}"
    process = launch([sys.executable, "-c", SERVER, str(threads), "serve", "--model", model, "--port", str(port)],
                     env, url, log, ready=lambda response: json.loads(response.read())["status"] == "ok")
    return process, url, log


def launch(command: list[str], env: dict[str, str], url: str, log: Path,
           ready: Callable[[Any], bool] = lambda response: response.status == 200,
           timeout: float = 600) -> subprocess.Popen:
    """Start a server (its output to ``log``) and wait until ``url``/health answers ``ready``; its log tail if it
    exits or never comes up."""
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if ready(response):
                    return process
        except OSError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the server did not come up:\n{log.read_text()[-3000:]}")


def requests_for(n: int) -> list[list[dict]]:
    """``n`` chat requests cycling over the organism's shipped conflict items (clip + misleading prompt)."""
    path = backpatch.organism.examples_path()
    items = [json.loads(line) for line in path.read_text().splitlines()]
    items = [i for i in items if i["kind"] == "conflict"]
    out = []
    for k in range(n):
        item = items[k % len(items)]
        data = base64.b64encode((path.parent / item["audio"]).read_bytes()).decode()
        out.append([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data,
                                                                                         "format": "wav"}},
                                                 {"type": "text", "text": item["prompt"]}]}])
    return out


def variants(url: str) -> dict[str, dict | None]:
    """The extra body of each variant's requests: its ``backpatch`` object (``None``: the server's preset)."""
    with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
        preset = backpatch.load_preset(json.loads(response.read())["preset"]).to_dict()
    out: dict[str, dict | None] = {"plain": {"backpatch": {"enabled": False}}, "backpatched": None}
    if preset.get("contrastive") is not None and preset.get("patches"):
        out["patches-only"] = {"backpatch": {"preset": {k: v for k, v in preset.items()
                                                        if k not in ("contrastive", "calibration")}}}
    return out


def one(client: OpenAI, model: str, messages: list[dict], extra: dict | None, max_tokens: int,
        stream: bool) -> tuple[float, int]:
    """Latency of one request (to its last byte) and its completion tokens; ``extra``: the body's non-OpenAI keys."""
    start = time.perf_counter()
    if stream:
        chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                     temperature=0, stream=True, extra_body=extra))
        tokens = next((c.usage.completion_tokens for c in reversed(chunks) if c.usage is not None), 0)
    else:
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                               extra_body=extra)
        tokens = reply.usage.completion_tokens
    return time.perf_counter() - start, tokens


def phase(url: str, model: str, batch: list[list[dict]], extra: dict | None, clients: int, max_tokens: int,
          stream: bool = False) -> tuple[float, list[float], list[int]]:
    """Wall time of ``batch`` sent by ``clients`` concurrent clients, and each request's latency and tokens."""
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        rows = list(pool.map(lambda m: one(client, model, m, extra, max_tokens, stream), batch))
    return time.perf_counter() - start, [r[0] for r in rows], [r[1] for r in rows]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def bench(model: str, args: argparse.Namespace) -> dict:
    process, url, log = start(model, args.threads)
    try:
        batch = requests_for(args.requests)
        kinds = variants(url)
        for options in kinds.values():  # warm-up
            phase(url, model, batch[: args.clients], options, args.clients, args.max_tokens, args.stream)
        totals: dict[str, list] = {name: [0.0, [], []] for name in kinds}
        names = list(kinds)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                wall, latencies, tokens = phase(url, model, batch, kinds[name], args.clients, args.max_tokens,
                                                args.stream)
                totals[name][0] += wall
                totals[name][1] += latencies
                totals[name][2] += tokens
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            hooks = json.loads(response.read())["backpatch_hook_count"]
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.unlink()
    out = {"model": model, "hooks_after": hooks}
    for name, (wall, latencies, tokens) in totals.items():
        out[name] = {"requests": len(latencies), "rps": len(latencies) / wall, "p50": percentile(latencies, 0.5),
                     "p95": percentile(latencies, 0.95), "tokens": statistics.mean(tokens)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="organism:digits,organism:smol-whisper")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--requests", type=int, default=24, help="requests per variant and round (default 24)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, variant order alternating (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server process (default 2)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--stream", action="store_true", help="streamed requests (latency to the last chunk)")
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"backpatch serve benchmark: {os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}, "
          f"server threads {args.threads}, {args.clients} concurrent clients, {args.requests} requests x "
          f"{args.rounds} rounds per variant, max_tokens {args.max_tokens}, greedy, "
          f"{'streamed' if args.stream else 'not streamed'}; load average at start {load:.2f}")
    print(f"{'model':<24} {'variant':<14} {'requests':>8} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'tokens':>7}")
    for model in args.models.split(","):
        result = bench(model.strip(), args)
        names = [name for name in result if name not in ("model", "hooks_after")]
        for name in names:
            r = result[name]
            print(f"{result['model']:<24} {name:<14} {r['requests']:>8} {r['rps']:>7.2f} {r['p50']:>7.3f} "
                  f"{r['p95']:>7.3f} {r['tokens']:>7.2f}")
        p = result["plain"]
        for name in names[1:]:
            b = result[name]
            print(f"{result['model']:<24} {name + '/plain':<26} {b['rps'] / p['rps']:>7.3f} "
                  f"{b['p50'] / p['p50']:>7.3f} {b['p95'] / p['p95']:>7.3f} {b['tokens'] / p['tokens']:>7.3f}")
        print(f"{result['model']:<24} backpatch hooks left on the model after the run: {result['hooks_after']}")


if __name__ == "__main__":
    main()
