"""Train the trained parts of ``smol-whisper``: the projector (Whisper tiny.en -> SmolLM2), everything else frozen.

Why projector only (LLaVA stage 1 / SLAM-ASR style): it is the realistic way to get a text-dominant audio LLM.
ALME (arXiv 2602.11488) reports that projector-only training *raises* text dominance while LoRA on the LM
lowers it, and the text dominance here is then inherited from a real LM's language prior, not taught.

Data: the project's espeak digit corpus only (``backpatch.organism.corpus``, train voices; 1 copy per clip).
The validation and test voices are never heard in training, so the held-out numbers measure a model that
never heard those speakers. Prompts: 50% ``Which digit is spoken?``, 50% a *correct* claim
``The speaker says "{digit}". Which digit is spoken?``; target ``{digit}<|im_end|>``, loss on those tokens.

The encoder is frozen, so its outputs are computed once per clip; a training step runs the projector and the
LM on precomputed encoder states (checked once against the full Hugging Face forward, see ``_check_path``).
Every ``--eval-every`` steps the validation conflict set is scored (first token over the digit words,
position ids from the left-padded attention mask, as ``generate`` computes them); every checkpoint's trained
parts are kept in ``--run-dir`` and the one shipped is chosen on validation only.

Usage (about 25 minutes on 2 cores)::

    python -m backpatch.organism.corpus --out /work/data/smol/corpus --copies 1
    python -m backpatch.organism.train_smol_whisper --corpus /work/data/smol/corpus --seed 0 \\
        --run-dir /work/data/smol/run-s0 --out backpatch/organism/smol-whisper
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from backpatch.organism import smol_whisper
from backpatch.organism._training import optimizer_step, right_padded
from backpatch.organism.corpus import load_manifest
from backpatch.organism.processor import make_prompt
from backpatch.organism.train import SUMMARY_KEYS, load_wavs, prepare_eval, quick_eval

logger = logging.getLogger(__name__)

#: the organism is a test bed only if it hears well and is text-dominant on validation
BAND = {"audio_only_acc": 0.95, "consistent_acc": 0.98, "tdr": (0.40, 1.0)}


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as ``generate`` derives them from the attention mask."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class _Captured(Exception):
    """Raised by the projector's pre-hook once it holds the encoder output: the LM need not run."""


@torch.no_grad()
def encode_clips(model, processor, waves: list[np.ndarray], batch: int = 64) -> tuple[torch.Tensor, list[int]]:
    """Frozen-encoder outputs ``[n, window tokens, 384]`` (the projector's input) and each clip's audio-token count,
    through the real Hugging Face merge path (processor, audio tower), stopped at the projector: the LM's forward
    would cost 20 times more."""
    from backpatch.inputs import build_inputs

    captured: list[torch.Tensor] = []

    def keep(_module, args):
        captured.append(args[0])
        raise _Captured

    hook = model.model.multi_modal_projector.register_forward_pre_hook(keep)
    counts: list[int] = []
    try:
        for i in tqdm(range(0, len(waves), batch), desc="encode clips"):
            enc = build_inputs(processor, waves[i:i + batch], ["x"] * len(waves[i:i + batch]))
            counts += (enc["input_ids"] == model.config.audio_token_id).sum(-1).tolist()
            try:
                model(**enc)
            except _Captured:
                pass
    finally:
        hook.remove()
    return torch.cat(captured), counts


def projector_only_model(wheels_dir: str | None, seed: int, spec: smol_whisper.Spec = smol_whisper.SPEC,
                         init_from: Path | None = None):
    """``(model, processor)`` ready for projector-only training: the pretrained parts from the pinned wheels, the
    projector re-initialized from ``seed`` (or loaded from ``init_from``, to continue a run), every other weight
    frozen, eval mode (no dropout anywhere; only the projector learns)."""
    wheels = smol_whisper.fetch_wheels(smol_whisper.WHEELS, smol_whisper.cache_root() / "wheels",
                                       Path(wheels_dir) if wheels_dir else None)
    with tempfile.TemporaryDirectory() as work:
        model, processor = smol_whisper.assemble(wheels, Path(work), trained=None, name=spec.name,
                                                 window_seconds=spec.window_seconds)
    torch.manual_seed(seed)
    projector = model.model.multi_modal_projector
    for module in projector.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    if init_from is not None:
        smol_whisper.load_trained(model, init_from, spec.name)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in projector.parameters():
        p.requires_grad_(True)
    return model.eval(), processor


@torch.no_grad()
def max_logit_diff(model, reference: dict, ours: dict) -> float:
    """Max |logit difference| over each row's real tokens between the full Hugging Face forward on left-padded
    processor outputs (``reference``) and the training path's right-padded ``inputs_embeds`` batch (``ours``)."""
    ref = model(**reference, position_ids=_positions(reference["attention_mask"])).logits
    out = model(inputs_embeds=ours["inputs_embeds"], attention_mask=ours["attention_mask"]).logits
    lengths = reference["attention_mask"].sum(-1).tolist()
    return max(float((ref[b, -n:] - out[b, :n]).abs().max()) for b, n in enumerate(lengths))


def require_same_path(check: float) -> None:
    """Stop a run whose training inputs are not what ``generate`` sees."""
    logger.info("training path vs full forward: max |logit diff| %.2e", check)
    if check > 1e-3:
        raise RuntimeError(f"training inputs differ from the Hugging Face forward (max logit diff {check:.3g})")


def prompt_ids(processor, prompt: str) -> list[int]:
    """Token ids of the chat-formatted prompt with ``n`` audio tokens marked by one placeholder id."""
    from backpatch.inputs import conversation

    text = processor.apply_chat_template(conversation(prompt), add_generation_prompt=True, tokenize=False)
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def make_batch(model, data: dict, idx: np.ndarray, hint: np.ndarray) -> dict:
    """Right-padded ``inputs_embeds`` with projected audio at the audio positions; labels on the answer only."""
    tok = data["tokens"]
    seqs, spans = [], []
    for i, h in zip(idx, hint, strict=True):
        ids = data["hint_ids"][i] if h else data["plain_ids"]
        at = ids.index(tok["audio"])
        full = ids[:at] + [tok["audio"]] * data["counts"][i] + ids[at + 1:] + [data["answer"][i], tok["eos"]]
        seqs.append(full)
        spans.append((at, data["counts"][i]))
    ids, mask, labels = right_padded(seqs, tok["pad"])
    embeds = model.get_input_embeddings()(ids)
    projected = model.model.multi_modal_projector(data["encoded"][torch.as_tensor(idx)])
    rows = [embeds[b].clone() for b in range(len(seqs))]
    for b, (at, count) in enumerate(spans):
        rows[b] = torch.cat([embeds[b, :at], projected[b, :count], embeds[b, at + count:]])
    return {"inputs_embeds": torch.stack(rows), "attention_mask": mask, "labels": labels}


def prepare_train(model, processor, corpus: Path) -> dict:
    rows = load_manifest(corpus, "train")
    waves = load_wavs(corpus, "train", rows)
    encoded, counts = encode_clips(model, processor, waves)
    tokenizer = processor.tokenizer
    tokens = {"audio": model.config.audio_token_id, "eos": tokenizer.convert_tokens_to_ids("<|im_end|>"),
              "pad": tokenizer.pad_token_id}
    plain = prompt_ids(processor, make_prompt(None))
    hint = {d: prompt_ids(processor, make_prompt(d)) for d in {r["word"] for r in rows}}
    return {"encoded": encoded, "counts": counts, "tokens": tokens, "plain_ids": plain,
            "hint_ids": [hint[r["word"]] for r in rows],
            "answer": [tokenizer.convert_tokens_to_ids(r["word"]) for r in rows]}


@torch.no_grad()
def _check_path(model, processor, corpus: Path, data: dict) -> float:
    """Max |logit difference| between a training batch and the full Hugging Face forward on the same inputs."""
    from backpatch.inputs import build_inputs

    rows = load_manifest(corpus, "train")[:4]
    waves = load_wavs(corpus, "train", rows)
    enc = build_inputs(processor, waves, [make_prompt(None)] * 4)
    return max_logit_diff(model, enc, make_batch(model, data, np.arange(4), np.zeros(4, bool)))


def in_band(m: dict) -> bool:
    lo, hi = BAND["tdr"]
    return (m["audio_only_acc"] >= BAND["audio_only_acc"] and m["consistent_acc"] >= BAND["consistent_acc"]
            and m["tdr"] is not None and lo <= m["tdr"] <= hi)


def select(history: list[dict]) -> dict:
    """Validation only: in band first, then audio-only + consistent accuracy, then the later step."""
    return max(history, key=lambda h: (in_band(h["val"]), h["val"]["audio_only_acc"] + h["val"]["consistent_acc"],
                                       h["step"]))


def train(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, processor = projector_only_model(args.wheels, args.seed)
    projector = model.model.multi_modal_projector
    data = prepare_train(model, processor, args.corpus)
    check = _check_path(model, processor, args.corpus, data)
    require_same_path(check)
    val_items, val_batches = prepare_eval(processor, args.corpus, "validation", args.conflict_seed, batch_size=80)
    for enc in val_batches:
        enc["position_ids"] = _positions(enc["attention_mask"])
    t_prep = time.perf_counter() - t0
    logger.info("prepared %d clips, %d validation items in %.0f s", len(data["answer"]), len(val_items), t_prep)

    rng = np.random.default_rng(args.seed)
    opt = torch.optim.AdamW(projector.parameters(), lr=args.lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, args.warmup, args.steps)
    ckpt_dir = args.run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    history, losses = [], []
    bar = tqdm(range(1, args.steps + 1), desc="train")
    for step in bar:
        idx = rng.integers(0, len(data["answer"]), args.batch_size)
        hint = rng.random(args.batch_size) < args.hint_rate
        loss = model(**make_batch(model, data, idx, hint)).loss
        optimizer_step(loss, opt, sched, projector.parameters())
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if step % args.eval_every == 0 or step == args.steps:
            val = quick_eval(model, processor.tokenizer, val_items, val_batches)
            model.eval()
            save_file(smol_whisper.trained_state(model), str(ckpt_dir / f"step{step}.safetensors"))
            history.append({"step": step, "loss": float(np.mean(losses[-args.eval_every:])), "val": val,
                            "elapsed_s": round(time.perf_counter() - t0, 1)})
            logger.info("step %d loss %.4f val tdr %.3f afr %.3f other %.3f ao %.3f cons %.3f", step,
                        history[-1]["loss"], val["tdr"], val["afr"], val["other_rate"], val["audio_only_acc"],
                        val["consistent_acc"])
    wall = time.perf_counter() - t0
    best = select(history)
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = ckpt_dir / f"step{best['step']}.safetensors"
    (args.out / "trained.safetensors").write_bytes(chosen.read_bytes())
    report = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "trainable_parameters": sum(p.numel() for p in projector.parameters()),
              "check_max_logit_diff": check, "prep_s": round(t_prep, 1), "wall_s": round(wall, 1),
              "loadavg_end": [round(x, 2) for x in os.getloadavg()], "loss_curve": [round(x, 5) for x in losses],
              "selected_step": best["step"], "selected_val": best["val"], "selected_in_band": in_band(best["val"]),
              "history": history}
    (args.run_dir / "training.json").write_text(json.dumps(report, indent=2))
    brief = [{"step": h["step"], "loss": round(h["loss"], 5), "elapsed_s": h["elapsed_s"],
              "val": {k: h["val"][k] for k in SUMMARY_KEYS}} for h in history]
    shipped = {k: v for k, v in report.items() if k not in ("history", "loss_curve")} | {"history": brief}
    shipped["loss_every_10"] = [round(float(np.mean(losses[i:i + 10])), 4) for i in range(0, len(losses), 10)]
    (args.out / "training.json").write_text(json.dumps(shipped, indent=1))
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the smol-whisper projector (encoder and LM frozen).")
    p.add_argument("--corpus", type=Path, required=True, help="espeak digit corpus (backpatch.organism.corpus)")
    p.add_argument("--out", type=Path, default=smol_whisper.TRAINED_DIR, help="where trained.safetensors goes")
    p.add_argument("--run-dir", type=Path, required=True, help="checkpoints and the full log (outside the repo)")
    p.add_argument("--wheels", help="folder holding the two pinned wheels (default: download into the cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--conflict-seed", type=int, default=0, help="seed of the validation claims (as conflicts build)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--hint-rate", type=float, default=0.5, help="share of prompts with the (correct) claim")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = train(parse_args(argv))
    sys.stdout.write(json.dumps({k: v for k, v in report.items() if k not in ("history", "loss_curve")},
                                indent=2) + "\n")


if __name__ == "__main__":
    main()
