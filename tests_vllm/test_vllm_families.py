"""Issue 27 point 3 beyond the organism: back-patching inside vLLM on a tiny random Audio Flamingo 3 equals the
Hugging Face engine (every mode x positions and a two-patch preset, in one mixed batch with plain requests; greedy
tokens equal and every generated token's log-prob within LOGPROB_ATOL, so the decode steps that read the patched
KV are compared too), and a model of a family the plugin does not patch refuses a ``backpatch`` request instead of
running it plain.

The Hugging Face side runs in the main environment (``hf_reference.py``): vLLM's CPU build pins transformers 5.19,
on which backpatch refuses Audio Flamingo 3 (its module layout is 5.20's). ``BACKPATCH_HF_PYTHON`` names that
environment's Python (CI sets it; by default the checkout's ``.venv``)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
#: float32 on both engines; vLLM's CPU kernels sum in another order than eager PyTorch
LOGPROB_ATOL = 1e-4  # measured worst: 4e-6 (2026-12-07)
SOURCE, TARGET = 3, 1  # hf_reference.presets()' single patches


def _hf_python() -> str:
    named = os.environ.get("BACKPATCH_HF_PYTHON")
    candidates = [Path(named)] if named else [ROOT / ".venv" / "bin" / "python", ROOT / ".venv-ci" / "bin" / "python"]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    pytest.fail(f"no main environment for the Hugging Face reference: looked for {', '.join(map(str, candidates))}; "
                "set BACKPATCH_HF_PYTHON to the Python of an environment with backpatch and transformers >= 5.20")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("af3")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    done = subprocess.run([_hf_python(), str(Path(__file__).with_name("hf_reference.py")), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "reference.json").read_text())


@pytest.fixture(scope="module")
def processor(reference):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(reference[0] / "checkpoint")


@pytest.fixture(scope="module")
def llm(reference):
    from vllm import LLM

    return LLM(str(reference[0] / "checkpoint"), dtype="float32", max_model_len=1024, max_num_seqs=8, seed=0,
               limit_mm_per_prompt={"audio": 1}, kv_cache_memory_bytes=256 << 20)


def _request(directory: Path, processor, row: dict, setting, max_tokens: int):
    from vllm import SamplingParams

    from backpatch.inputs import chat_texts

    (text,) = chat_texts(processor, [row["prompt"]])
    wave = np.load(directory / f"{row['clip']}.npy")
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1, ignore_eos=True,
                            extra_args={"backpatch": setting})
    return {"prompt": text, "multi_modal_data": {"audio": (wave, 16000)}}, params


def test_audio_flamingo_3_patched_in_vllm_equals_the_hf_engine_in_one_mixed_batch(reference, processor, llm):
    directory, ref = reference
    jobs = [(name, setting) for name, setting in ref["presets"].items()] + [("plain", {"enabled": False})]
    keys, requests = [], []
    for name, setting in jobs:
        for k, row in enumerate(ref["answers"][name]):
            keys.append((name, k))
            requests.append(_request(directory, processor, row, setting, ref["max_tokens"]))
    outputs = llm.generate([r[0] for r in requests], [r[1] for r in requests], use_tqdm=False)
    mismatches, worst = [], 0.0
    for (name, k), out in zip(keys, outputs, strict=True):
        want, got = ref["answers"][name][k], out.outputs[0]
        logprobs = [got.logprobs[i][token].logprob for i, token in enumerate(got.token_ids)]
        diffs = [abs(a - b) for a, b in zip(logprobs, want["logprobs"], strict=False)]
        worst = max([worst, *diffs])
        if list(got.token_ids) != want["tokens"] or max(diffs) > LOGPROB_ATOL:
            mismatches.append((name, k, list(got.token_ids), want["tokens"], max(diffs)))
        assert out.prompt_token_ids == want["prompt_token_ids"]  # the same prompt, the audio spans expanded alike
    assert not mismatches, mismatches
    logging.getLogger(__name__).warning("worst log-prob difference vLLM vs HF over %d requests: %.1e", len(outputs),
                                        worst)


def test_the_patches_change_the_answers_so_the_equality_says_something(reference):
    _, ref = reference
    plain = ref["answers"]["plain"]
    for name in ref["presets"]:
        moved = max(abs(a["logprobs"][0] - b["logprobs"][0]) for a, b in zip(ref["answers"][name], plain,
                                                                            strict=True))
        assert moved > 1e-3, name  # every preset moves the first token's log-prob on some clip
    assert any(a["tokens"] != b["tokens"] for a, b in zip(ref["answers"]["replace-audio+last"], plain, strict=True))
    # the long clip spans two 30-s windows: its audio span is the multi-window expansion
    assert len(plain[-1]["prompt_token_ids"]) > 2 * len(plain[0]["prompt_token_ids"])


def test_a_patched_prefill_costs_s_minus_t_extra_layer_calls(reference, processor, llm):
    from backpatch.vllm.model import BackpatchAudioFlamingo3
    from backpatch.vllm.worker import runtimes

    directory, ref = reference
    runtime = runtimes[-1]
    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    assert isinstance(model, BackpatchAudioFlamingo3) and model.backpatch is runtime
    before = runtime.counts["capture_layer_calls"]
    llm.generate(*_request(directory, processor, ref["answers"]["plain"][0], ref["presets"]["add-audio"], 2),
                 use_tqdm=False)
    assert runtime.counts["capture_layer_calls"] - before == SOURCE - TARGET


def test_a_family_the_plugin_does_not_patch_refuses_a_backpatch_request_and_serves_the_rest(reference, processor):
    """A text-only Qwen2 model stands for every family without a class in MODEL_CLASSES: a request that asks it
    for backpatch gets one sentence naming the key, never a plain answer it did not ask for."""
    import torch
    import transformers as T
    from vllm import LLM, SamplingParams
    from vllm.exceptions import VLLMValidationError

    directory, _ = reference
    config = T.AutoConfig.from_pretrained(directory / "checkpoint").text_config
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(0)
    T.Qwen2ForCausalLM(config).save_pretrained(directory / "text-only")
    processor.tokenizer.save_pretrained(directory / "text-only")
    llm = LLM(str(directory / "text-only"), dtype="float32", max_model_len=256, kv_cache_memory_bytes=256 << 20)
    prompt = {"prompt_token_ids": [5, 6, 7]}
    with pytest.raises(VLLMValidationError, match=r"backpatch: this engine serves a 'qwen2' model, which backpatch's "
                                                  r"vLLM plugin does not patch \(it patches audioflamingo3, "
                                                  r"qwen2_audio\)") as info:
        llm.generate(prompt, SamplingParams(max_tokens=2, extra_args={"backpatch": {"enabled": False}}),
                     use_tqdm=False)
    assert info.value.parameter == "backpatch"
    assert llm.generate(prompt, SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
