"""The Hugging Face side of tests_vllm/test_vllm_families.py, run in the MAIN environment (transformers >= 5.20,
where backpatch supports Audio Flamingo 3; vLLM's CPU build pins 5.19, on which backpatch refuses the family).

Writes to OUT: a tiny random Audio Flamingo 3 checkpoint with its processor (tests/test_processors.py's parts: a
word-level tokenizer, 30-s Whisper windows as in the real checkpoints, 4 text layers, the LM head sharpened so that
patches show in the log-probs), two clips (one window and two), and ``reference.json``: for each preset of
``presets()`` and each clip, the greedy tokens and each token's log-prob (the patched prefill's, and the decode
steps' that read its KV) of ``backpatch.wrap(model, preset).generate``.

    python tests_vllm/hf_reference.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import backpatch  # noqa: E402
from backpatch import Patch, Preset  # noqa: E402

MAX_TOKENS = 5
RATE = 16000
#: Audio Flamingo 3's own 30-s windows (vLLM's class takes 3000 mel frames a window), a short clip and one of two
CLIPS = {"one-window": 0.7, "two-windows": 31.0}
PROMPTS = ("Transcribe this", "Describe the music in this clip")


def presets() -> dict[str, dict]:
    """Every mode x positions on the 4-layer text model, and a two-patch preset (the smol-whisper test's set)."""
    out = {f"{mode}{'-norm' if norm else ''}-{positions}": Preset(
        name=f"{mode}-{positions}",
        patches=[Patch(source=3, target=1, scale=0.5 if mode == "interpolate" else 1.0, mode=mode,
                       positions=positions, match_norm=norm)])
        for mode, norm in (("add", False), ("replace", False), ("interpolate", False), ("add", True))
        for positions in ("audio", "last", "audio+last")}
    out["multi"] = Preset(name="multi", patches=[Patch(3, 1, 0.5, "add", "audio"),
                                                 Patch(2, 0, 0.5, "interpolate", "last")])
    return {name: preset.to_dict() for name, preset in out.items()}


def audioflamingo3() -> tuple[torch.nn.Module, object]:
    """tests/test_processors.py's tiny Audio Flamingo 3, with what vLLM's class and kernels demand: attention heads
    32 wide (the CPU kernels take no narrower: ``Unsupported CPU attention configuration: head_dim=8``) and the real
    30-s window (vLLM's feature schema is 3000 frames a window)."""
    import transformers as T
    from families import _sharpen
    from test_processors import _chat_template, _feature_extractor, _text, _tokenizer

    tokenizer = _tokenizer(("<sound>",))
    fe = _feature_extractor(16, window_s=30)
    processor = T.AudioFlamingo3Processor(feature_extractor=fe, tokenizer=tokenizer,
                                          chat_template=_chat_template("<sound>"))
    config = T.AudioFlamingo3Config(
        audio_config=dict(model_type="audioflamingo3_encoder", hidden_size=32, intermediate_size=64,
                          num_hidden_layers=1, num_attention_heads=2, num_mel_bins=fe.feature_size,
                          max_source_positions=fe.nb_max_frames // 2),
        text_config=dict(model_type="qwen2", **_text(len(tokenizer), hidden_size=64, num_attention_heads=2,
                                                     num_key_value_heads=1, head_dim=32)),
        audio_token_id=tokenizer.convert_tokens_to_ids("<sound>"))
    torch.manual_seed(0)
    model = _sharpen(T.AudioFlamingo3ForConditionalGeneration(config)).float().eval()
    model.generation_config.eos_token_id = None  # vLLM ignores EOS too: both answer MAX_TOKENS tokens
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def main(out: Path) -> None:
    from backpatch.inputs import build_inputs

    model, processor = audioflamingo3()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "checkpoint")
    processor.save_pretrained(out / "checkpoint")
    rng = np.random.default_rng(0)
    clips = {}
    for name, seconds in CLIPS.items():
        t = np.arange(int(seconds * RATE)) / RATE
        wave = (0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
        np.save(out / f"{name}.npy", wave)
        clips[name] = wave
    answers: dict[str, list] = {}
    for name, preset in {"plain": None, **presets()}.items():
        target = model if preset is None else backpatch.wrap(model, Preset.from_dict(preset),
                                                             processor=processor)
        rows = []
        for clip, wave in clips.items():
            for prompt in PROMPTS:
                inputs = build_inputs(processor, [wave], [prompt])
                with torch.no_grad():
                    gen = target.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_logits=True,
                                          return_dict_in_generate=True)
                new = gen.sequences[0, inputs["input_ids"].shape[1]:].tolist()
                logprobs = [torch.log_softmax(step[0].float(), -1)[token].item()
                            for step, token in zip(gen.logits, new, strict=True)]
                rows.append({"clip": clip, "prompt": prompt, "tokens": new, "logprobs": logprobs,
                             "prompt_token_ids": inputs["input_ids"][0].tolist()})
        answers[name] = rows
    (out / "reference.json").write_text(json.dumps({"max_tokens": MAX_TOKENS, "presets": presets(),
                                                    "answers": answers}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
