"""Train the two-hop organism: the H1 digit-organism recipe on a question mix (spoken / after / parity).

Same corpus, model size, optimizer and hint policy as ``backpatch.organism.train`` (claim correct 75%,
absent 25%, never conflicting); every training example draws its question type with ``--mix``. Validation
metrics of every question type are logged every ``--eval-every`` steps, every checkpoint is kept, and the
selection uses validation metrics of ``--select-on`` only (the test split is never read here).

    PYTHONPATH=/work/main python research/organism_hop/train_hop.py --run-dir /work/data/organism_hop/run-s0
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import GenerationConfig, Qwen2AudioForConditionalGeneration, get_cosine_schedule_with_warmup

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hop  # noqa: E402

from backpatch.organism._training import optimizer_step, right_padded  # noqa: E402
from backpatch.organism.conflicts import score  # noqa: E402
from backpatch.organism.corpus import load_manifest  # noqa: E402
from backpatch.organism.processor import EOS, PAD, encode  # noqa: E402
from backpatch.organism.train import BAND, build_config  # noqa: E402

logger = logging.getLogger("train_hop")


def prepare_train(processor) -> dict:
    """Encode every training clip once per (question type, with/without claim); features are shared."""
    rows = load_manifest(hop.CORPUS, "train")
    waves = hop.load_wavs("train", rows)
    wl = [waves[r["id"]] for r in rows]
    feats, ids = [], {(q, h): [] for q in hop.QTYPES for h in (True, False)}
    keys = list(ids)
    for i in tqdm(range(0, len(rows), 64), desc="encode train"):
        chunk, w = rows[i : i + 64], wl[i : i + 64]
        prompts = [hop.make_prompt(q, r["word"] if h else None) for (q, h) in keys for r in chunk]
        enc = encode(processor, w * len(keys), prompts)
        feats.append(enc["input_features"][: len(chunk)])
        for j, (x, m) in enumerate(zip(enc["input_ids"], enc["attention_mask"], strict=True)):
            ids[keys[j // len(chunk)]].append(x[m.bool()].tolist())
    tok = processor.tokenizer
    return {
        "features": torch.cat(feats),
        "frames": torch.tensor([min(200, -(-len(w) // 160)) for w in wl]),
        "ids": ids,
        "answer": {q: [tok.convert_tokens_to_ids(hop.answer_of(q, r["word"])) for r in rows] for q in hop.QTYPES},
        "eos": tok.convert_tokens_to_ids(EOS),
        "pad": tok.convert_tokens_to_ids(PAD),
    }


def make_batch(data: dict, idx, qtypes, hint) -> dict:
    seqs = [
        data["ids"][(q, bool(h))][i] + [data["answer"][q][i], data["eos"]]
        for i, q, h in zip(idx, qtypes, hint, strict=True)
    ]
    ids, mask, labels = right_padded(seqs, data["pad"])
    fmask = (torch.arange(200)[None, :] < data["frames"][idx][:, None]).long()
    return {"input_ids": ids, "attention_mask": mask, "input_features": data["features"][idx],
            "feature_attention_mask": fmask, "labels": labels}


def evaluate(model, tok, items, batches) -> dict:
    model.eval()
    answers = hop.argmax_answers(model, tok, batches)
    model.train()
    return {q: score([it for it in items if it["qtype"] == q],
                     [a for it, a in zip(items, answers, strict=True) if it["qtype"] == q])
            for q in dict.fromkeys(it["qtype"] for it in items)}


def in_band(m: dict) -> bool:
    lo, hi = BAND["tdr"]
    return m["audio_only_acc"] >= BAND["audio_only_acc"] and m["consistent_acc"] >= BAND["consistent_acc"] \
        and lo <= m["tdr"] <= hi


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", type=Path, default=hop.DATA / "run-s0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--hint-rate", type=float, default=0.75)
    p.add_argument("--mix", default="spoken=0.25,after=0.5,parity=0.25")
    p.add_argument("--select-on", default="after")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--ffn", type=int, default=320)
    p.add_argument("--enc-layers", type=int, default=1)
    p.add_argument("--enc-dim", type=int, default=32)
    p.add_argument("--enc-ffn", type=int, default=64)
    p.add_argument("--enc-layerdrop", type=float, default=0.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    mix = {k: float(v) for k, v in (kv.split("=") for kv in args.mix.split(","))}
    qnames, qprob = list(mix), np.array(list(mix.values())) / sum(mix.values())

    processor = hop.build_processor()
    config = build_config(processor.tokenizer, args)
    model = Qwen2AudioForConditionalGeneration(config)
    n_params = sum(p.numel() for p in model.parameters())
    data = prepare_train(processor)
    spec = {q: (3 if q == args.select_on else 1) for q in qnames}
    val_items, val_waves = hop.split_items("validation", 0, spec)
    val_batches = hop.encode_items(processor, val_items, val_waves)
    t_prep = time.perf_counter() - t0
    logger.info("params %d, prep %.0f s, %d val items", n_params, t_prep, len(val_items))

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, args.warmup, args.steps)
    ckpt = args.run_dir / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    history, losses = [], []
    n_clips = len(data["frames"])
    model.train()
    for step in tqdm(range(1, args.steps + 1), desc="train", mininterval=30):
        idx = rng.integers(0, n_clips, args.batch_size)
        qt = [qnames[k] for k in rng.choice(len(qnames), size=args.batch_size, p=qprob)]
        hint = rng.random(args.batch_size) < args.hint_rate
        loss = model(**make_batch(data, idx, qt, hint)).loss
        optimizer_step(loss, opt, sched, model.parameters())
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            val = evaluate(model, processor.tokenizer, val_items, val_batches)
            torch.save(model.state_dict(), ckpt / f"step{step}.pt")
            history.append({"step": step, "loss": float(np.mean(losses[-args.eval_every:])), "val": val,
                            "elapsed_s": round(time.perf_counter() - t0, 1)})
            logger.info("step %d loss %.4f %s (%.0f s)", step, history[-1]["loss"], "  ".join(
                f"{q}: tdr {m['tdr']:.3f} afr {m['afr']:.3f} ao {m['audio_only_acc']:.3f} "
                f"cons {m['consistent_acc']:.3f}" for q, m in val.items()), time.perf_counter() - t0)
            (args.run_dir / "training.json").write_text(json.dumps({"args": vars(args) | {"run_dir": str(args.run_dir)},
                                                                    "history": history}, indent=1))

    def key(h):
        m = h["val"][args.select_on]
        return (in_band(m), m["audio_only_acc"] + m["consistent_acc"], -abs(m["tdr"] - 0.8))

    best = max(history, key=key)
    model.load_state_dict(torch.load(ckpt / f"step{best['step']}.pt"))
    model.generation_config = GenerationConfig(eos_token_id=config.text_config.eos_token_id,
                                               pad_token_id=config.text_config.pad_token_id,
                                               do_sample=False, max_new_tokens=4)
    out = args.run_dir / "model"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    report = {"args": vars(args) | {"run_dir": str(args.run_dir)}, "parameters": n_params, "prep_s": round(t_prep, 1),
              "wall_s": round(time.perf_counter() - t0, 1), "selected_step": best["step"],
              "selected_val": best["val"], "selected_in_band": in_band(best["val"][args.select_on]),
              "history": history}
    (args.run_dir / "training.json").write_text(json.dumps(report, indent=1))
    sys.stdout.write(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=1) + "\n")


if __name__ == "__main__":
    main()
