"""Overhead of back-patched generate() against plain generate(), measured side by side in one process.

For each model it prints:
- deterministic counts per generate() call, from hooks of this script's own: audio-encoder calls and
  decoder-layer calls (plain vs back-patched; the engine promises encoder 1 and layers plain + s + 1);
- wall time, median of --runs runs after --warmup, plain and back-patched runs interleaved so that machine
  noise hits both alike, and the ratio;
- the ratio the design predicts, 1 + (s + 1) / N * prefill share, where the prefill share is the median time
  of the prefill forward over the median time of a whole plain generate().

Usage: python benchmarks/overhead.py [--runs 7] [--threads 2] [--models tiny,mid]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

import backpatch
from backpatch import Patch, Preset

MODELS = {
    # name: (text layers, hidden, heads, kv heads, ffn, encoder d_model, encoder layers, mel frames, text tokens)
    "tiny": dict(layers=6, hidden=32, heads=4, kv=2, ffn=64, enc_d=32, enc_layers=1, frames=200, text=20),
    # about 12 decoder layers, hidden 512, 750 audio tokens (30 s of audio), as the core issue asks
    "mid": dict(layers=12, hidden=512, heads=8, kv=4, ffn=1536, enc_d=256, enc_layers=2, frames=3000, text=40),
}
AUDIO_TOKEN, PAD = 3, 0


def build(spec: dict) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    config = Qwen2AudioConfig(
        audio_config=dict(d_model=spec["enc_d"], encoder_layers=spec["enc_layers"], encoder_attention_heads=4,
                          encoder_ffn_dim=2 * spec["enc_d"], num_mel_bins=80, max_source_positions=spec["frames"] // 2),
        text_config=dict(model_type="qwen2", vocab_size=1000, hidden_size=spec["hidden"],
                         intermediate_size=spec["ffn"], num_hidden_layers=spec["layers"],
                         num_attention_heads=spec["heads"], num_key_value_heads=spec["kv"],
                         max_position_embeddings=4096, pad_token_id=PAD),
        audio_token_index=AUDIO_TOKEN,
    )
    model = Qwen2AudioForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None  # always generate exactly max_new_tokens
    frames = spec["frames"]
    n_audio = ((frames - 1) // 2 + 1 - 2) // 2 + 1
    text = torch.randint(10, 1000, (spec["text"],))
    ids = torch.cat([torch.tensor([4]), torch.full((n_audio,), AUDIO_TOKEN), torch.tensor([5]), text])[None]
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "input_features": torch.randn(1, 80, frames),
        "feature_attention_mask": torch.ones(1, frames, dtype=torch.long),
    }
    return model, inputs


class Counter:
    def __init__(self, model: torch.nn.Module) -> None:
        self.encoder = 0
        self.layers = 0
        self.handles = [model.model.audio_tower.register_forward_pre_hook(self._enc)]
        self.handles += [layer.register_forward_pre_hook(self._layer) for layer in model.model.language_model.layers]

    def _enc(self, *_):
        self.encoder += 1

    def _layer(self, *_):
        self.layers += 1

    def take(self) -> tuple[int, int]:
        out = (self.encoder, self.layers)
        self.encoder = self.layers = 0
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def timed(fn, runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench(name: str, runs: int, warmup: int, new_tokens: int) -> None:
    spec = MODELS[name]
    model, inputs = build(spec)
    n = spec["layers"]
    source, target = round(3 * n / 4), round(n / 4)  # the bundled presets' default rule
    wrapped = backpatch.wrap(model, Preset(patches=[Patch(source=source, target=target)]))
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False)

    with torch.no_grad():
        counter = Counter(model)
        model.generate(**inputs, **kwargs)
        plain_counts = counter.take()
        wrapped.generate(**inputs, **kwargs)
        patched_counts = counter.take()
        counter.close()

        def plain():
            model.generate(**inputs, **kwargs)

        def patched():
            wrapped.generate(**inputs, **kwargs)

        def prefill():
            model(**inputs, use_cache=True)

        for fn in (plain, patched, prefill):
            timed(fn, 0, warmup)
        plain_t, patched_t, prefill_t = [], [], []
        for _ in range(runs):  # interleave so that noise hits all three alike
            plain_t += timed(plain, 1, 0)
            patched_t += timed(patched, 1, 0)
            prefill_t += timed(prefill, 1, 0)

    med = statistics.median
    ratio = med(patched_t) / med(plain_t)
    share = med(prefill_t) / med(plain_t)
    predicted = 1 + (source + 1) / n * share
    n_audio = int((inputs["input_ids"] == AUDIO_TOKEN).sum())
    print(f"\n## {name}: {n} decoder layers, hidden {spec['hidden']}, {n_audio} audio tokens, "
          f"{inputs['input_ids'].shape[1]} prompt tokens, {new_tokens} new tokens; patch {source}->{target}")
    print(f"counts per generate(): audio encoder plain {plain_counts[0]}, back-patched {patched_counts[0]}; "
          f"decoder-layer calls plain {plain_counts[1]}, back-patched {patched_counts[1]} "
          f"(= plain + {patched_counts[1] - plain_counts[1]}; bound plain + s + 1 = plain + {source + 1})")
    print(f"time (median of {runs}, warm-up {warmup}): plain {med(plain_t) * 1e3:.1f} ms, back-patched "
          f"{med(patched_t) * 1e3:.1f} ms, prefill forward {med(prefill_t) * 1e3:.1f} ms")
    print(f"ratio back-patched / plain: {ratio:.3f}; predicted 1 + (s+1)/N x prefill share "
          f"= 1 + {source + 1}/{n} x {share:.3f} = {predicted:.3f}; measured/predicted = {ratio / predicted:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--models", default="tiny,mid")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# backpatch overhead benchmark: torch {torch.__version__}, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}, python {platform.python_version()}")
    for name in args.models.split(","):
        bench(name, args.runs, args.warmup, args.new_tokens)


if __name__ == "__main__":
    main()
