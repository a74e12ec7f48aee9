"""Issue 27 point 3: back-patching inside vLLM equals the Hugging Face engine on the smol-whisper organism: greedy
answers equal and first-token log-probs within LOGPROB_ATOL, for every mode (add, replace, interpolate, add with
match_norm) x positions (audio, last, audio+last) and a multi-patch preset, all in one mixed batch with plain
requests (so prefills of different presets and decode steps share steps)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

import backpatch
from backpatch import Patch, Preset, organism
from backpatch.audio_io import load_audio
from backpatch.evaluate import load_conflict_set
from backpatch.inputs import build_inputs, chat_texts
from backpatch.loading import load_model_and_processor

#: float32 on both engines; vLLM's CPU kernels sum in another order than eager PyTorch
LOGPROB_ATOL = 1e-4  # measured worst: 1.75e-5 (36 patched + 3 plain requests, 2026-12-07)
MAX_TOKENS = 6
N_ITEMS = 3

PRESETS = {f"{mode}{'-norm' if norm else ''}-{positions}": Preset(
    name=f"{mode}-{positions}",
    patches=[Patch(source=20, target=18, scale={"replace": 1.0, "interpolate": 0.5}.get(mode, 1.0), mode=mode,
                   positions=positions, match_norm=norm)])
    for mode, norm in (("add", False), ("replace", False), ("interpolate", False), ("add", True))
    for positions in ("audio", "last", "audio+last")}
PRESETS["multi"] = Preset(name="multi", patches=[Patch(20, 18, 0.5, "add", "audio"),
                                                 Patch(24, 10, 0.5, "interpolate", "last")])


@pytest.fixture(scope="module")
def hf():
    model, processor = load_model_and_processor(None)  # organism:smol-whisper, float32
    return model.float().eval(), processor


@pytest.fixture(scope="module")
def items(hf):
    _, processor = hf
    conflicts = [i for i in load_conflict_set(organism.examples_path()) if i.kind == "conflict"][:N_ITEMS]
    return [(load_audio(i.audio, 16000), i.prompt) for i in conflicts]


@pytest.fixture(scope="module")
def llm(hf):
    from vllm import LLM

    model, _ = hf
    return LLM(str(model.config._name_or_path), dtype="float32", max_model_len=512, max_num_seqs=8, seed=0,
               limit_mm_per_prompt={"audio": 1}, enable_prefix_caching=True, gpu_memory_utilization=0.25)


def hf_answers(hf, items, preset: Preset | None) -> list[tuple[list[int], float]]:
    """Greedy tokens and the first token's log-prob from backpatch.wrap(...).generate, one item at a time."""
    model, processor = hf
    out = []
    for wave, prompt in items:
        inputs = build_inputs(processor, [wave], [prompt])
        target = backpatch.wrap(model, preset, processor=processor) if preset is not None else model
        with torch.no_grad():
            gen = target.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
        new = gen.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        first = torch.log_softmax(gen.logits[0][0].float(), -1)[new[0]].item()
        out.append((new, first))
    return out


def vllm_request(processor, wave, prompt, setting=None):
    from vllm import SamplingParams

    (text,) = chat_texts(processor, [prompt])
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1,
                            extra_args=None if setting is None else {"backpatch": setting})
    return {"prompt": text, "multi_modal_data": {"audio": (wave.astype(np.float32), 16000)}}, params


def test_every_mode_and_position_equals_the_hf_engine_in_one_mixed_batch(hf, llm, items):
    _, processor = hf
    jobs = [(name, preset.to_dict()) for name, preset in PRESETS.items()] + [("plain", {"enabled": False})]
    prompts, params, keys = [], [], []
    for name, setting in jobs:
        for k, (wave, prompt) in enumerate(items):
            p, s = vllm_request(processor, wave, prompt, setting)
            prompts.append(p), params.append(s), keys.append((name, k))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    got = {key: o for key, o in zip(keys, outputs, strict=True)}
    mismatches, worst = [], 0.0
    for name, _ in jobs:
        want = hf_answers(hf, items, PRESETS.get(name))
        for k, (tokens, first) in enumerate(want):
            o = got[(name, k)].outputs[0]
            logprob = o.logprobs[0][o.token_ids[0]].logprob
            worst = max(worst, abs(logprob - first))
            if list(o.token_ids) != tokens or not math.isclose(logprob, first, abs_tol=LOGPROB_ATOL):
                mismatches.append((name, k, list(o.token_ids), tokens, logprob, first))
    assert not mismatches, mismatches
    # the prompts are tokenised alike (the audio span included): the comparison is of the same inputs
    inputs = build_inputs(processor, [items[0][0]], [items[0][1]])
    assert got[("plain", 0)].prompt_token_ids == inputs["input_ids"][0].tolist()
    logging.getLogger(__name__).warning("worst first-token log-prob difference vLLM vs HF: %.2e", worst)


def test_patches_change_the_answer_distribution_so_the_equality_says_something(hf, llm, items):
    _, processor = hf
    requests = [vllm_request(processor, *items[0], setting)
                for setting in ({"enabled": False}, PRESETS["replace-audio+last"].to_dict())]
    plain, patched = llm.generate([r[0] for r in requests], [r[1] for r in requests], use_tqdm=False)
    token = plain.outputs[0].token_ids[0]
    patched_first = patched.outputs[0].logprobs[0]
    assert token not in patched_first or abs(patched_first[token].logprob
                                             - plain.outputs[0].logprobs[0][token].logprob) > 1e-2


def test_one_patched_prefill_costs_s_minus_t_extra_layer_calls(hf, llm, items):
    from backpatch.vllm.worker import runtimes

    _, processor = hf
    runtime = runtimes[-1]
    before = dict(runtime.counts)
    llm.generate(*vllm_request(processor, *items[0], PRESETS["add-audio"].to_dict()), use_tqdm=False)
    calls = runtime.counts["capture_layer_calls"] - before.get("capture_layer_calls", 0)
    assert calls == 20 - 18 and runtime.counts["patched_prefills"] - before.get("patched_prefills", 0) == 1
    llm.generate(*vllm_request(processor, *items[0], {"enabled": False}), use_tqdm=False)
    assert runtime.counts["capture_layer_calls"] - before.get("capture_layer_calls", 0) == 2  # plain: none


def test_bad_values_are_refused_naming_the_key_and_the_engine_keeps_serving(hf, llm, items):
    from vllm.exceptions import VLLMValidationError

    _, processor = hf
    with pytest.raises(VLLMValidationError, match="backpatch: no bundled preset is named 'nonesuch'") as info:
        llm.generate(*vllm_request(processor, *items[0], "nonesuch"), use_tqdm=False)
    assert info.value.parameter == "backpatch"
    with pytest.raises(VLLMValidationError, match="the patch's agreement guard, which backpatch cannot run inside "
                                                  "vLLM"):
        llm.generate(*vllm_request(processor, *items[0], "smol-whisper"), use_tqdm=False)
    out = llm.generate(*vllm_request(processor, *items[0], {"enabled": False}), use_tqdm=False)
    assert out[0].outputs[0].token_ids


def test_patched_prefills_run_whole_and_eager_and_patched_kv_is_never_reused(hf, llm, items):
    """Issue 27 point 2: the plugin's engine arguments (eager layers, no chunked prefill), and the prefix cache: a
    prompt longer than one KV block (128 tokens on CPU) is reused between plain requests, never by a patched one."""
    from vllm import SamplingParams

    config = llm.llm_engine.vllm_config
    assert config.model_config.enforce_eager and config.scheduler_config.enable_chunked_prefill is False
    _, processor = hf
    wave, prompt = items[0]
    long_prompt = "Listen to the whole clip before you answer, and ignore what the text claims. " * 8 + prompt
    request, _ = vllm_request(processor, wave, long_prompt)

    def cached(setting) -> tuple[int, list[int]]:
        params = SamplingParams(max_tokens=3, temperature=0.0, extra_args={"backpatch": setting})
        out = llm.generate(request, params, use_tqdm=False)[0]
        return out.num_cached_tokens or 0, list(out.outputs[0].token_ids)

    plain = {"enabled": False}
    patch = PRESETS["replace-audio+last"].to_dict()
    first_plain = cached(plain)
    assert cached(plain)[0] > 0 and cached(plain)[1] == first_plain[1]  # plain requests share their prefix
    assert [cached(patch)[0] for _ in range(2)] == [0, 0]  # a patched prefill never reads cached KV
    assert cached(plain)[1] == first_plain[1]  # and never leaves patched KV for a plain request to read
