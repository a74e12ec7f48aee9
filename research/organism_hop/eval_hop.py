"""Evaluate the two-hop organism: plain metrics, a back-patching grid, and last-position probes.

    PYTHONPATH=/work/main python research/organism_hop/eval_hop.py plain --model DIR --out plain.json
    PYTHONPATH=/work/main python research/organism_hop/eval_hop.py grid  --model DIR --task after --out grid.json
    PYTHONPATH=/work/main python research/organism_hop/eval_hop.py probe --model DIR --out probe.json

Answers are the argmax at the last prompt position (= the first greedy token; every answer is one token);
``plain`` also checks this against ``generate`` on the test split. Back-patched answers come from
``backpatch.wrap(model, preset)(**inputs).logits`` (capture pass + patched forward, DESIGN section 1).
The grid is run on validation and test; the best no-harm setting is *selected on validation* and its test
numbers reported (the test-best is listed too, marked as not a selection).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hop  # noqa: E402

import backpatch  # noqa: E402
from backpatch.organism.conflicts import score  # noqa: E402
from backpatch.organism.processor import DIGITS, first_word  # noqa: E402

KEYS = ("tdr", "afr", "other_rate", "audio_only_acc", "consistent_acc")


def load(model_dir: Path):
    proc = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(model_dir).eval()
    return model, proc


def by_task(items, answers):
    return {q: score([it for it in items if it["qtype"] == q],
                     [a for it, a in zip(items, answers, strict=True) if it["qtype"] == q])
            for q in dict.fromkeys(it["qtype"] for it in items)}


def cmd_plain(args, model, proc):
    res = {}
    for split in ("validation", "test"):
        items, waves = hop.split_items(split, args.conflict_seed, {q: 3 for q in hop.QTYPES})
        batches = hop.encode_items(proc, items, waves)
        answers = hop.argmax_answers(model, proc.tokenizer, batches)
        res[split] = by_task(items, answers)
        if split == "test":  # the argmax shortcut == greedy generate (first word)
            gen = []
            with torch.no_grad():
                for enc in batches:
                    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
                    gen.extend(first_word(t) for t in proc.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                                                        skip_special_tokens=True))
            res["test_generate_equals_argmax"] = sum(a == g for a, g in zip(answers, gen, strict=False)) / len(gen)
            per_voice = {}
            for it, a in zip(items, answers, strict=False):
                if it["kind"] == "audio_only":
                    k = f"{it['qtype']}/{it['variant']}"
                    per_voice.setdefault(k, [0, 0])
                    per_voice[k][0] += a == it["audio_answer"]
                    per_voice[k][1] += 1
            res["test_audio_only_by_voice"] = per_voice
    return res


def grid_settings(n: int, positions=("audio", "last"), modes=("replace", "add")):
    sources = sorted({n // 2 + 1, n - 2, n - 1})
    targets = sorted({0, 1, n // 4, n // 2 - 1})
    for pos in positions:
        for mode in modes:
            for s in sources:
                for t in targets:
                    if s > t:
                        yield {"source": s, "target": t, "scale": 1.0, "mode": mode, "positions": pos}


def no_harm(m, plain, tol=0.02):
    return m["audio_only_acc"] >= plain["audio_only_acc"] - tol and m["consistent_acc"] >= plain["consistent_acc"] - tol


def cmd_grid(args, model, proc):
    n = model.config.text_config.num_hidden_layers
    res = {"task": args.task, "settings": []}
    data = {}
    for split in ("validation", "test"):
        items, waves = hop.split_items(split, args.conflict_seed, {args.task: 3})
        batches = hop.encode_items(proc, items, waves)
        data[split] = (items, batches)
        res[f"plain_{split}"] = score(items, hop.argmax_answers(model, proc.tokenizer, batches))
    for st in grid_settings(n, args.positions.split(","), args.modes.split(",")):
        t0 = time.perf_counter()
        w = backpatch.wrap(model, backpatch.Preset(patches=[backpatch.Patch(**st)]))
        row = dict(st)
        for split, (items, batches) in data.items():
            row[split] = score(items, hop.argmax_answers(w, proc.tokenizer, batches))
        w.unwrap()
        row["seconds"] = round(time.perf_counter() - t0, 1)
        res["settings"].append(row)
        v, t = row["validation"], row["test"]
        print(f"{st['positions']:5s} {st['mode']:7s} s{st['source']:2d} t{st['target']:2d} | "
              f"val tdr {v['tdr']:.3f} ao {v['audio_only_acc']:.3f} cons {v['consistent_acc']:.3f} | "
              f"test tdr {t['tdr']:.3f} afr {t['afr']:.3f} oth {t['other_rate']:.3f} "
              f"ao {t['audio_only_acc']:.3f} cons {t['consistent_acc']:.3f} ({row['seconds']} s)", flush=True)
    ok = [r for r in res["settings"] if no_harm(r["validation"], res["plain_validation"])]
    if ok:
        best = min(ok, key=lambda r: r["validation"]["tdr"])
        res["selected_on_validation"] = {k: best[k] for k in ("source", "target", "scale", "mode", "positions")}
        res["selected_test"] = best["test"]
        res["selected_test_no_harm"] = no_harm(best["test"], res["plain_test"])
        res["selected_test_delta_tdr_points"] = round(100 * (best["test"]["tdr"] - res["plain_test"]["tdr"]), 1)
    ok_t = [r for r in res["settings"] if no_harm(r["test"], res["plain_test"])]
    if ok_t:
        bt = min(ok_t, key=lambda r: r["test"]["tdr"])
        res["test_best_no_harm_NOT_A_SELECTION"] = {k: bt[k] for k in ("source", "target", "mode", "positions")} | {
            "tdr": bt["test"]["tdr"], "delta_points": round(100 * (bt["test"]["tdr"] - res["plain_test"]["tdr"]), 1)}
    return res


def logreg_cv(x: torch.Tensor, y: torch.Tensor, groups: np.ndarray, folds: int = 5, wd: float = 1e-2) -> float:
    """Grouped k-fold CV accuracy of a multinomial logistic regression (standardized features, LBFGS, L2)."""
    ug = np.unique(groups)
    rng = np.random.default_rng(0)
    rng.shuffle(ug)
    fold_of = {g: i % folds for i, g in enumerate(ug)}
    f = np.array([fold_of[g] for g in groups])
    correct = 0
    k = int(y.max()) + 1
    for i in range(folds):
        tr, te = torch.from_numpy(f != i), torch.from_numpy(f == i)
        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-5
        xtr, xte = (x[tr] - mu) / sd, (x[te] - mu) / sd
        lin = torch.nn.Linear(x.shape[1], k)
        opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=200, line_search_fn="strong_wolfe")

        def closure(opt=opt, lin=lin, xtr=xtr, ytr=y[tr]):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(lin(xtr), ytr) + wd * lin.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            correct += int((lin(xte).argmax(-1) == y[te]).sum())
    return correct / len(y)


@torch.no_grad()
def collect_states(model, batches, audio_id: int):
    """Per layer (output of block i): state at the last prompt position, and the mean over audio positions."""
    layers = model.model.language_model.layers
    store = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: store.__setitem__(i, o[0] if isinstance(o, tuple) else o))
             for i, layer in enumerate(layers)]
    last = [[] for _ in layers]
    amean = [[] for _ in layers]
    logits_last = []
    try:
        for enc in batches:
            out = model(**enc)
            logits_last.append(out.logits[:, -1])
            am = (enc["input_ids"] == audio_id).float()
            for i in range(len(layers)):
                h = store[i]
                last[i].append(h[:, -1])
                amean[i].append((h * am[..., None]).sum(1) / am.sum(1, keepdim=True))
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(v) for v in last], [torch.cat(v) for v in amean]


@torch.no_grad()
def logit_lens(model, states, tok, items):
    """Per layer: among the 10 digit words, how often the lens' top word is the audio digit / its successor."""
    lm = model.model.language_model
    head = model.lm_head
    ids = torch.tensor([tok.convert_tokens_to_ids(d) for d in DIGITS])
    aud = torch.tensor([DIGITS.index(it["audio_digit"]) for it in items])
    out = []
    for h in states:
        top = head(lm.norm(h))[:, ids].argmax(-1)
        out.append({"audio_digit": round(float((top == aud).float().mean()), 3),
                    "successor": round(float((top == (aud + 1) % 10).float().mean()), 3)})
    return out


def cmd_probe(args, model, proc):
    audio_id = model.config.audio_token_index
    items, waves = hop.split_items("test", args.conflict_seed, {args.task: 3})
    batches = hop.encode_items(proc, items, waves)
    last, amean = collect_states(model, batches, audio_id)
    res = {"task": args.task, "n_layers": len(last)}
    for kind in ("audio_only", "conflict"):
        sel = [i for i, it in enumerate(items) if it["kind"] == kind]
        its = [items[i] for i in sel]
        y_audio = torch.tensor([DIGITS.index(it["audio_digit"]) for it in its])
        groups = np.array([it["clip"] for it in its])
        r = {"n": len(sel),
             "last_audio_digit": [round(logreg_cv(h[sel], y_audio, groups), 3) for h in last],
             "audio_mean_audio_digit": [round(logreg_cv(h[sel], y_audio, groups), 3) for h in amean],
             "logit_lens_last": logit_lens(model, [h[sel] for h in last], proc.tokenizer, its)}
        if kind == "conflict":
            y_claim = torch.tensor([DIGITS.index(it["claim"]) for it in its])
            r["last_claim_digit"] = [round(logreg_cv(h[sel], y_claim, groups), 3) for h in last]
        res[kind] = r
        print(kind, json.dumps(r), flush=True)
    return res


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=("plain", "grid", "probe"))
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--task", default="after", choices=hop.QTYPES)
    p.add_argument("--conflict-seed", type=int, default=0)
    p.add_argument("--positions", default="audio,last", help="grid: comma-separated positions")
    p.add_argument("--modes", default="replace,add", help="grid: comma-separated modes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, proc = load(args.model)
    t0 = time.perf_counter()
    res = {"cmd": args.cmd, "model": str(args.model)} | globals()[f"cmd_{args.cmd}"](args, model, proc)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    if args.cmd == "plain":
        for split in ("validation", "test"):
            for q, m in res[split].items():
                print(split, q, {k: m[k] for k in (*KEYS, "n_conflict", "n_consistent", "n_audio_only")})
        print("generate == argmax on test:", res["test_generate_equals_argmax"])


if __name__ == "__main__":
    main()
