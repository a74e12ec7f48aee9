"""Train the model organism: a tiny ``Qwen2AudioForConditionalGeneration`` that answers spoken digits.

Why it ends up text-dominant: during training the prompt's claim is *always right* when present (75% of
examples) and absent otherwise (25%), and a single tiny audio-encoder layer makes the audio path the harder
one. The cheapest solution is to copy the claim whenever there is one, while still learning the audio for
claim-free prompts. On conflicting prompts (never seen in training) the model then mostly follows the
text: the behaviour back-patching is meant to fix. This is the "H1" recipe of the scratch findings.

TDR drifts with training length, so the run evaluates the *validation* conflict set every
``--eval-every`` steps, keeps every checkpoint (outside the repo) and ships the best one by validation
metrics only (the test split is never looked at here). The shipped directory loads offline with
``AutoProcessor.from_pretrained`` and ``Qwen2AudioForConditionalGeneration.from_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm
from transformers import (
    GenerationConfig,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    get_cosine_schedule_with_warmup,
)

from backpatch.organism._training import optimizer_step, right_padded
from backpatch.organism.conflicts import make_items, score
from backpatch.organism.corpus import DEFAULT_OUT as DEFAULT_CORPUS
from backpatch.organism.corpus import load_manifest
from backpatch.organism.processor import AUDIO, DIGITS, EOS, PAD, build_processor, encode, make_prompt

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "digits"
DEFAULT_RUN_DIR = Path("/work/data/organism/run")
SUMMARY_KEYS = ("tdr", "afr", "other_rate", "audio_only_acc", "consistent_acc")
BAND = {"audio_only_acc": 0.90, "consistent_acc": 0.95, "tdr": (0.60, 0.95)}


def build_config(tokenizer, args: argparse.Namespace) -> Qwen2AudioConfig:
    """Tiny Qwen2-Audio config: 1-layer d32 encoder over 200 mel frames, 12 x 128 Qwen2 decoder."""
    vocab = -(-len(tokenizer) // 8) * 8
    eos, pad = tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(PAD)
    audio_config = {
        "model_type": "qwen2_audio_encoder",
        "num_mel_bins": 80,
        "encoder_layers": args.enc_layers,
        "encoder_attention_heads": 2,
        "encoder_ffn_dim": args.enc_ffn,
        "d_model": args.enc_dim,
        "max_source_positions": 100,
        "encoder_layerdrop": args.enc_layerdrop,
    }
    text_config = {
        "model_type": "qwen2",
        "vocab_size": vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.ffn,
        "num_hidden_layers": args.layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "bos_token_id": None,
    }
    return Qwen2AudioConfig(
        audio_config=audio_config, text_config=text_config, audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO)
    )


def load_wavs(corpus: Path, split: str, rows: list[dict]) -> list[np.ndarray]:
    """Read a split's wavs (float32, 16 kHz) in manifest order."""
    return [sf.read(corpus / split / r["path"], dtype="float32")[0] for r in rows]


def prepare_train(processor, corpus: Path) -> dict:
    """Encode every training clip once, with its (correct) claim and without; features are shared."""
    rows = load_manifest(corpus, "train")
    waves = load_wavs(corpus, "train", rows)
    feats, hint_ids, plain_ids = [], [], []
    for i in tqdm(range(0, len(rows), 64), desc="encode train"):
        chunk, w = rows[i : i + 64], waves[i : i + 64]
        prompts = [make_prompt(r["word"]) for r in chunk] + [make_prompt(None)] * len(chunk)
        enc = encode(processor, w + w, prompts)
        feats.append(enc["input_features"][: len(chunk)])
        for j, (ids, mask) in enumerate(zip(enc["input_ids"], enc["attention_mask"], strict=True)):
            (hint_ids if j < len(chunk) else plain_ids).append(ids[mask.bool()].tolist())
    tok = processor.tokenizer
    return {
        "features": torch.cat(feats),
        "frames": torch.tensor([min(200, -(-len(w) // 160)) for w in waves]),
        "hint_ids": hint_ids,
        "plain_ids": plain_ids,
        "answer": [tok.convert_tokens_to_ids(r["word"]) for r in rows],
        "eos": tok.convert_tokens_to_ids(EOS),
        "pad": tok.convert_tokens_to_ids(PAD),
    }


def make_batch(data: dict, idx: np.ndarray, hint: np.ndarray) -> dict:
    """Right-padded batch; labels are -100 except on the answer tokens ``<digit> <|im_end|>``."""
    seqs = [
        (data["hint_ids"] if h else data["plain_ids"])[i] + [data["answer"][i], data["eos"]]
        for i, h in zip(idx, hint, strict=True)
    ]
    ids, mask, labels = right_padded(seqs, data["pad"])
    fmask = (torch.arange(200)[None, :] < data["frames"][idx][:, None]).long()
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "input_features": data["features"][idx],
        "feature_attention_mask": fmask,
        "labels": labels,
    }


def prepare_eval(processor, corpus: Path, split: str, seed: int, batch_size: int = 120) -> tuple[list, list]:
    """Conflict items for a split (same function and seed as ``conflicts build``), pre-encoded in batches."""
    rows = load_manifest(corpus, split)
    wave_of = dict(zip((r["id"] for r in rows), load_wavs(corpus, split, rows), strict=True))
    items = make_items(rows, seed)
    batches = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        batches.append(
            encode(processor, [wave_of[Path(it["audio"]).stem] for it in chunk], [it["prompt"] for it in chunk])
        )
    return items, batches


@torch.no_grad()
def quick_eval(model, tokenizer, items: list, batches: list) -> dict:
    """Metrics from the argmax at the last prompt position (= the first greedy token: one token per word)."""
    model.eval()
    id2word = {tokenizer.convert_tokens_to_ids(d): d for d in DIGITS}
    answers = []
    for enc in batches:
        logits = model(**enc).logits[:, -1]
        answers.extend(id2word.get(int(t), "") for t in logits.argmax(-1))
    model.train()
    return score(items, answers)


def in_band(m: dict) -> bool:
    """Whether validation metrics meet the organism's target band."""
    lo, hi = BAND["tdr"]
    return (
        m["audio_only_acc"] >= BAND["audio_only_acc"]
        and m["consistent_acc"] >= BAND["consistent_acc"]
        and m["tdr"] is not None  # undefined when no conflict answer names either digit
        and lo <= m["tdr"] <= hi
    )


def select(history: list[dict]) -> dict:
    """Pick the checkpoint by validation only: in band first, then audio + consistent accuracy, then TDR ~0.8."""

    def key(h: dict) -> tuple:
        m = h["val"]
        return (in_band(m), m["audio_only_acc"] + m["consistent_acc"], -abs((m["tdr"] or 0.0) - 0.8))

    return max(history, key=key)


def train(args: argparse.Namespace) -> dict:
    """Run training, keep every checkpoint's validation metrics, ship the selected checkpoint."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    processor = build_processor()
    config = build_config(processor.tokenizer, args)
    model = Qwen2AudioForConditionalGeneration(config)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("parameters: %d (%.1f MB fp32)", n_params, n_params * 4 / 2**20)
    data = prepare_train(processor, args.corpus)
    val_items, val_batches = prepare_eval(processor, args.corpus, "validation", args.conflict_seed)
    t_prep = time.perf_counter() - t0
    logger.info("prepared %d train clips, %d validation items in %.0f s", len(data["answer"]), len(val_items), t_prep)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, args.warmup, args.steps)
    ckpt_dir = args.run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    history, losses = [], []
    model.train()
    for step in tqdm(range(1, args.steps + 1), desc="train"):
        idx = rng.integers(0, len(data["answer"]), args.batch_size)
        hint = rng.random(args.batch_size) < args.hint_rate
        loss = model(**make_batch(data, idx, hint)).loss
        optimizer_step(loss, opt, sched, model.parameters())
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            val = quick_eval(model, processor.tokenizer, val_items, val_batches)
            torch.save(model.state_dict(), ckpt_dir / f"step{step}.pt")
            history.append(
                {
                    "step": step,
                    "loss": float(np.mean(losses[-args.eval_every :])),
                    "val": val,
                    "elapsed_s": round(time.perf_counter() - t0, 1),
                }
            )
            logger.info(
                "step %d loss %.4f val tdr %.3f afr %.3f ao %.3f cons %.3f",
                step,
                history[-1]["loss"],
                val["tdr"],
                val["afr"],
                val["audio_only_acc"],
                val["consistent_acc"],
            )
    t_train = time.perf_counter() - t0
    best = select(history)
    model.load_state_dict(torch.load(ckpt_dir / f"step{best['step']}.pt"))
    model.generation_config = GenerationConfig(
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
        do_sample=False,
        max_new_tokens=4,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    for f in args.out.iterdir():  # safetensors writes 0600; the package data should be world-readable
        f.chmod(0o644)
    report = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "parameters": n_params,
        "prep_s": round(t_prep, 1),
        "wall_s": round(t_train, 1),
        "loadavg_start": [round(x, 2) for x in load0],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "selected_step": best["step"],
        "selected_val": best["val"],
        "selected_in_band": in_band(best["val"]),
        "history": history,
    }
    (args.run_dir / "training.json").write_text(json.dumps(report, indent=2))
    brief = [{"step": h["step"], "val": {k: h["val"][k] for k in SUMMARY_KEYS}} for h in history]
    shipped = {k: v for k, v in report.items() if k != "history"} | {"history": brief}
    (args.out / "training.json").write_text(json.dumps(shipped, indent=1))
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; defaults are the H1 recipe."""
    p = argparse.ArgumentParser(description="Train the spoken-digit model organism (H1 recipe).")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR, help="where the selected model is saved")
    p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help="checkpoints and full log (outside repo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--conflict-seed", type=int, default=0, help="seed of the validation claims (as conflicts build)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--hint-rate", type=float, default=0.75, help="fraction of prompts with the (correct) claim")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--ffn", type=int, default=320)
    p.add_argument("--enc-layers", type=int, default=1)
    p.add_argument("--enc-dim", type=int, default=32)
    p.add_argument("--enc-ffn", type=int, default=64)
    p.add_argument("--enc-layerdrop", type=float, default=0.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = train(parse_args(argv))
    sys.stdout.write(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2) + "\n")


if __name__ == "__main__":
    main()
