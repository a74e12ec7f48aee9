"""Overhead of back-patched generate() against plain generate(), measured side by side in one process.

For each model and patch it runs three things: plain ``generate()``, the engine's two-pass path ("before":
capture pass over layers 0..s, then the whole patched prefill) and its short path ("after": layers 0..t run
once, shared by capture and patched prefill; DESIGN section 1). It prints:
- deterministic counts per generate() call, from hooks of this script's own: audio-encoder calls and
  decoder-layer calls (the engine promises encoder 1 on both paths, layers plain + s + 1 before and
  plain + (s - t) after);
- wall time, median and minimum of --runs runs after --warmup, all variants interleaved so that machine noise
  hits them alike, and the ratios to plain (on a shared machine the minimum is the steadier estimate);
- the ratios the design predicts, 1 + (s + 1) / N x prefill share before and 1 + (s - t) / N x prefill share
  after, where the prefill share is the median time of the prefill forward over the median time of a whole
  plain generate().

``smol`` is the organism ``smol-whisper`` (30 layers, a real 2-s clip from its shipped examples) with the
back-patch of its calibrated preset (the contrastive part, a second decoding stream, is left out: its cost is
the README's "time vs plain" column) and the prototype's 10 -> 8.

``--sweep`` adds the calibration sweep on ``smol-whisper``: seconds per scored setting when each setting runs the
whole patched model (before) and when it runs only layers t+1..N-1 from the shared capture (after), with the
decoder-layer calls of each.

Usage: python benchmarks/overhead.py [--runs 7] [--threads 2] [--models tiny,mid,smol] [--sweep]
"""

from __future__ import annotations

import argparse
import dataclasses
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
#: patches per model: the old bundled default rule (3N/4 -> N/4) and a short hop; for smol-whisper the
#: back-patch of its bundled (calibrated) preset comes first, read from the preset (see :func:`patches_for`)
PATCHES = {
    "tiny": [Patch(4, 2)],
    "mid": [Patch(9, 3), Patch(9, 8)],
    "smol": [Patch(10, 8, 0.5, "interpolate", "audio")],  # the prototype's patch
}


def patches_for(name: str) -> list[Patch]:
    """The patches benchmarked on ``name``; smol-whisper's calibrated one is read from its preset, never copied."""
    if name == "smol":
        return backpatch.load_preset("smol-whisper").patches + PATCHES["smol"]
    return PATCHES[name]
AUDIO_TOKEN, PAD = 3, 0


def build_smol(n_items: int = 1):
    """smol-whisper, its processor, the first ``n_items`` shipped example items and their inputs."""
    from backpatch.evaluate import encode_items, load_conflict_set
    from backpatch.loading import load_model_and_processor
    from backpatch.organism import examples_path

    model, processor = load_model_and_processor("organism:smol-whisper")
    model.generation_config.eos_token_id = None  # always generate exactly max_new_tokens
    items = load_conflict_set(examples_path())[:n_items]
    return model, processor, items, dict(encode_items(processor, items))


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


def two_pass(wrapped: backpatch.BackpatchedModel) -> backpatch.BackpatchedModel:
    """The same wrapper on the engine's two-pass path (what every generate() ran before the short path)."""
    wrapped._resolved = dataclasses.replace(wrapped.resolved, short_path=False)
    return wrapped


def bench(name: str, runs: int, warmup: int, new_tokens: int) -> None:
    if name == "smol":
        model, processor, _, inputs = build_smol()
        spec = {"layers": model.config.text_config.num_hidden_layers, "hidden": model.config.text_config.hidden_size}
        audio_token, base = model.config.audio_token_id, backpatch.load_preset("smol-whisper")
    else:
        spec, processor, base = MODELS[name], None, None
        (model, inputs), audio_token = build(spec), AUDIO_TOKEN
    n = spec["layers"]
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False)
    variants = {}  # (source, target, "before" | "after") -> wrapper
    for patch in patches_for(name):
        facts = {"audio_span": base.audio_span, "model": base.model} if base is not None else {}
        preset = Preset(patches=[patch], **facts)
        source, target = patch.source, patch.target
        variants[(source, target, "before")] = two_pass(backpatch.wrap(model, preset, processor=processor))
        variants[(source, target, "after")] = backpatch.wrap(model, preset, processor=processor)

    with torch.no_grad():
        counter = Counter(model)
        model.generate(**inputs, **kwargs)
        plain_counts = counter.take()
        counts, paths = {}, {}
        for key, wrapped in variants.items():
            wrapped.generate(**inputs, **kwargs)
            counts[key], paths[key] = counter.take(), wrapped.last_session.path
        counter.close()

        fns = {"plain": lambda: model.generate(**inputs, **kwargs),
               "prefill": lambda: model(**inputs, use_cache=True)}
        for key, wrapped in variants.items():
            fns[key] = lambda wrapped=wrapped: wrapped.generate(**inputs, **kwargs)
        for fn in fns.values():
            timed(fn, 0, warmup)
        times: dict = {key: [] for key in fns}
        for _ in range(runs):  # interleave so that noise hits every variant alike
            for key, fn in fns.items():
                times[key] += timed(fn, 1, 0)

    med = statistics.median
    plain_t, plain_min = med(times["plain"]), min(times["plain"])
    share = med(times["prefill"]) / plain_t
    share_min = min(times["prefill"]) / plain_min
    n_audio = int((inputs["input_ids"] == audio_token).sum())
    print(f"\n## {name}: {n} decoder layers, hidden {spec['hidden']}, {n_audio} audio tokens, "
          f"{inputs['input_ids'].shape[1]} prompt tokens, {new_tokens} new tokens")
    print(f"time (median / min of {runs}, warm-up {warmup}): plain {plain_t * 1e3:.1f} / {plain_min * 1e3:.1f} ms, "
          f"prefill forward {med(times['prefill']) * 1e3:.1f} / {min(times['prefill']) * 1e3:.1f} ms (prefill share "
          f"{share:.3f} / {share_min:.3f}); audio encoder calls plain {plain_counts[0]}; decoder-layer calls plain "
          f"{plain_counts[1]}")
    print("ratios and predictions by median, then by min (min is the steadier one on a shared machine)")
    print("| patch | path | encoder calls | layer calls | extra (bound) | time ms | ratio | predicted | "
          "measured/predicted | ratio (min) | predicted (min) | measured/predicted (min) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (source, target, when), (encoder, layers) in counts.items():
        extra = source + 1 if when == "before" else source - target
        predicted, predicted_min = 1 + extra / n * share, 1 + extra / n * share_min
        t, t_min = med(times[(source, target, when)]), min(times[(source, target, when)])
        print(f"| {source} -> {target} | {when} ({paths[(source, target, when)]}) | {encoder} | {layers} | "
              f"+{layers - plain_counts[1]} (+{extra}) | {t * 1e3:.1f} | {t / plain_t:.3f} | {predicted:.3f} | "
              f"{t / plain_t / predicted:.3f} | {t_min / plain_min:.3f} | {predicted_min:.3f} | "
              f"{t_min / plain_min / predicted_min:.3f} |")


def bench_sweep(runs: int, n_items: int, batch_size: int) -> None:
    """Calibration sweep on smol-whisper: seconds and decoder-layer calls per scored setting, before/after."""
    from backpatch.calibrate.grid import Candidate, Setting
    from backpatch.calibrate.sweep import Scorer, prepare_batches
    from backpatch.calibrate.writing import candidate_preset

    model, processor, items, _ = build_smol(n_items)
    wrapped = backpatch.wrap(model, processor=processor)
    settings = [Setting(p.source, p.target, p.scale, p.mode, p.positions) for p in patches_for("smol")]
    settings += [Setting(28, 15, 0.1, "add", "audio"), Setting(17, 16, 1.0, "replace", "last"),
                 Setting(29, 2, 0.25, "add", "audio")]
    grid = {"sources": sorted({s.source for s in settings}), "positions": sorted({s.positions for s in settings})}
    with torch.no_grad():
        start = time.perf_counter()
        batches, _ = prepare_batches(wrapped, processor, items, grid, batch_size, False, layer_states=True)
        capture = time.perf_counter() - start
    scorers = {}
    for when, short in (("before", False), ("after", True)):
        scorers[when] = Scorer(model, processor, wrapped.preset, "silence", None, candidate_preset)
        scorers[when].short_path_ok = short  # before: every setting runs the whole patched model (the engine)
    counter = Counter(model)
    calls, times = {}, {}
    for setting in settings:
        for when, scorer in scorers.items():
            scorer.score(Candidate(setting), batches)
            calls[(setting, when)] = counter.take()[1] // len(batches)
            times[(setting, when)] = []
    counter.close()
    for _ in range(runs):  # interleaved, as above
        for setting in settings:
            for when, scorer in scorers.items():
                start = time.perf_counter()
                scorer.score(Candidate(setting), batches)
                times[(setting, when)].append(time.perf_counter() - start)
    n = wrapped.resolved.num_layers
    print(f"\n## calibration sweep on smol-whisper: {len(items)} items in {len(batches)} batch(es) of {batch_size}, "
          f"{n} decoder layers; shared capture (plain forward keeping every layer) {capture:.2f} s, once per batch "
          f"list; times per scored setting, median / min of {runs}")
    print("| setting | layer calls per batch before | after (N - t - 1) | s before | s after | after / before "
          "(median) | after / before (min) | predicted (N - t - 1) / N |")
    print("|---|---|---|---|---|---|---|---|")
    med = statistics.median
    for setting in settings:
        b, a = times[(setting, "before")], times[(setting, "after")]
        print(f"| {setting.label()} | {calls[(setting, 'before')]} | {calls[(setting, 'after')]} | {med(b):.3f} | "
              f"{med(a):.3f} | {med(a) / med(b):.3f} | {min(a) / min(b):.3f} | {(n - setting.target - 1) / n:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--models", default="tiny,mid,smol")
    parser.add_argument("--sweep", action="store_true", help="also time the calibration sweep on smol-whisper")
    parser.add_argument("--sweep-items", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# backpatch overhead benchmark: torch {torch.__version__}, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}, python {platform.python_version()}")
    for name in args.models.split(","):
        bench(name, args.runs, args.warmup, args.new_tokens)
    if args.sweep:
        bench_sweep(args.runs, args.sweep_items, args.sweep_items)


if __name__ == "__main__":
    main()
