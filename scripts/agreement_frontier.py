"""Issue 28: which contrastive settings keep every perturbation family within the no-harm bound, scored on first
answer tokens from the logits that scripts/agreement_probe.py saved (validation only: clean validation and the
every-family perturbed validation, 240 consistent + 240 audio-only items per family).

The grid: alpha 1, 2, 3, 4, 6; no gate or an audio_gap ramp (0.1..0.3, 0.2..0.4); no plausibility guard or 0.05,
0.1, 0.2, 0.3; no agreement guard or 0, 0.1, 0.2, 0.3 nats (375 settings, about 14 min on 2 cores). The rule: the
paired 95% upper bound on the loss of consistent and of audio-only accuracy at most 0.02 on clean data and on *each*
family. Writes every setting's worst family and TDR cuts.

    python scripts/agreement_frontier.py /work/probe/logits.pt --out docs/stress/agreement-frontier.json

With ``--patched`` (the output of scripts/patch_probe.py) it scores back-patching instead: the patch at each measured
scale, alone or with contrastive decoding (alpha 1-3, no plausibility guard or 0.1, no agreement guard or 0-0.3),
under no gate or either audio_gap ramp (the gate scales the patch too, as in generate()), 31 settings per scale and
gate; ``--with-rows`` pools the contrastive-only rows in, so the choice and the leave-one-family-out estimate run
over both (about 15 min for two scales):

    python scripts/agreement_frontier.py /work/probe/logits.pt --patched /work/probe/patched.pt \
        --with-rows docs/stress/agreement-frontier.json --out docs/stress/patch-frontier.json

``--patch-agreement`` adds the patch's agreement guard (``Patch.agreement``: a row whose plain answer the audio
raised by at least the threshold over the null-audio stream is not patched, a 0/1 factor on top of the gate, so it
needs no forward of its own); ``none`` among the thresholds keeps the unguarded rows. ``--patched`` may name several
probes (their scales are pooled), and settings already in ``--with-rows`` are not scored again:

    python scripts/agreement_frontier.py /work/probe/logits.pt \
        --patched /work/probe/patched.pt /work/probe/patched-075.pt /work/probe/patched-15.pt \
        --patch-agreement none 0.5 1 2 --with-rows docs/stress/patch-frontier-075.json \
        --out docs/stress/guarded-patch-frontier.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from collections import defaultdict
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm
from transformers import AutoProcessor

from backpatch.evaluate import metrics
from backpatch.items import judge
from backpatch.loading import resolve_model_id
from backpatch.methods import Gate
from backpatch.methods.contrastive import agreement_signal
from backpatch.methods.gate import gate_strength
from backpatch.paired import harm_bound, tdr_reduction_bound

MAX_HARM = 0.02
METRICS = ("tdr", "audio_only_acc", "consistent_acc", "n_conflict", "n_consistent", "n_audio_only")
GRID = list(itertools.product((1.0, 2.0, 3.0, 4.0, 6.0), (None, (0.1, 0.3), (0.2, 0.4)),
                              (None, 0.05, 0.1, 0.2, 0.3), (None, 0.0, 0.1, 0.2, 0.3)))
#: with a patch: no contrastive term, or alpha 1..3 with no plausibility guard or 0.1 and the agreement guards
PATCHED_GRID = [(0.0, None, None)] + list(itertools.product((1.0, 2.0, 3.0), (None, 0.1), (None, 0.0, 0.1, 0.2, 0.3)))


def combined_logits(main: torch.Tensor, gap: torch.Tensor, relative: torch.Tensor, agreement: torch.Tensor,
                    alpha: float, strength, plausibility, threshold) -> torch.Tensor:
    """``contrastive_logits``' math from its parts computed once per distribution (``gap = main - null``,
    ``relative = p / max p``, ``agreement = agreement_signal(main, null)``), so a grid pays for them once."""
    if not alpha:
        return main
    scale = alpha if strength is None else (alpha * strength).unsqueeze(-1)
    combined = main + scale * gap
    if plausibility is not None:
        combined = combined.masked_fill(relative < plausibility, torch.finfo(combined.dtype).min)
    if threshold is not None:
        combined = torch.where((agreement >= threshold).unsqueeze(-1), main, combined)
    return combined


def leave_one_family_out(rows: list[dict], families: list[str]) -> dict[str, dict]:
    """For each family F: the setting the rule chooses without F (highest clean TDR cut among those within the bound
    on clean data and every other family), its bound on F, and how many settings that passed without F harm F."""
    def on(row: dict, family: str) -> list[float]:
        return [b for k, b in row["bounds"].items() if k.startswith(family + " ")]

    def off(row: dict, family: str) -> list[float]:
        return [b for k, b in row["bounds"].items() if not k.startswith(family + " ")]

    out = {}
    for held in families:
        passed = [r for r in rows if max(off(r, held)) <= MAX_HARM + 1e-9]
        harmed = [r for r in passed if max(on(r, held)) > MAX_HARM + 1e-9]
        chosen = max(passed, key=lambda r: r["clean_tdr_cut"], default=None)
        out[held] = {"passed_without": len(passed), "harmed_held_out": len(harmed),
                     "chosen": None if chosen is None else {k: chosen.get(k) for k in ("patch", "alpha", "gate",
                                                                                      "plausibility", "agreement",
                                                                                      "clean_tdr_cut")},
                     "chosen_harms_held_out": None if chosen is None else chosen in harmed,
                     "chosen_bound_on_held_out": None if chosen is None else max(on(chosen, held))}
    return out


def patched_main(probe: dict, scale: float, gate, main_l: torch.Tensor, strength) -> torch.Tensor:
    """What the engine's first-token logits are with the probe's patch at ``scale`` under ``gate``: full strength
    where the gate is 1 (or absent), plain where it is 0, the probe's gated forward where it is in between."""
    measured = probe["scales"][scale]
    full = measured["full"].float()
    if gate is None:
        return full
    patched = torch.where((strength == 1).unsqueeze(-1), full, main_l)
    part = measured["gated"][f"{gate[0]}-{gate[1]}"]
    patched[part["rows"]] = part["logits"].float()
    return patched


def setting_key(setting: dict) -> str:
    """A setting's identity across frontier files (a patch without ``agreement`` is an unguarded one)."""
    patch = setting.get("patch")
    patch = {"agreement": None, **patch} if patch else None
    return json.dumps([patch, setting["alpha"], setting["gate"], setting["plausibility"], setting["agreement"]],
                      sort_keys=True)


def patched_rows(probe: dict, items: list[dict], main_l: torch.Tensor, null_l: torch.Tensor, strengths: dict,
                 row, guards=(None,), done: frozenset[str] = frozenset()) -> list[dict]:
    """Back-patching alone (alpha 0) and with guarded contrastive decoding, each under no gate or an audio_gap gate
    and each patch agreement guard in ``guards`` (None: unguarded); the contrastive gate re-measured on the patched
    distribution, as ``generate()`` does. Settings whose key is in ``done`` are skipped."""
    if [it["id"] for it in probe["items"]] != [it["id"] for it in items]:
        raise ValueError("the patch probe's items differ from the logits' items")
    agreement = agreement_signal(main_l, null_l)
    rows = []
    for scale, gate, guard in tqdm(list(itertools.product(probe["scales"], (None, (0.1, 0.3), (0.2, 0.4)), guards)),
                                   desc="patch settings"):
        patch = {**probe["patch"], "scale": scale, **({"agreement": guard} if guard is not None else {})}
        todo = [(alpha, plausibility, threshold) for alpha, plausibility, threshold in PATCHED_GRID
                if setting_key({"patch": patch, "alpha": alpha, "gate": list(gate) if gate else None,
                                "plausibility": plausibility, "agreement": threshold}) not in done]
        if not todo:
            continue
        main = patched_main(probe, scale, gate, main_l, strengths[gate])
        if guard is not None:  # the patch's agreement guard: rows the audio already agrees on stay plain
            main = torch.where((agreement >= guard).unsqueeze(-1), main_l, main)
        strength = gate_strength(Gate("audio_gap", *gate), main, null_l) if gate else None
        # contrastive_logits' math with its per-setting parts computed once per patched distribution
        gap = main - null_l
        probs = main.softmax(-1)
        relative = probs / probs.amax(-1, keepdim=True)
        del probs
        kept = agreement_signal(main, null_l)
        for alpha, plausibility, threshold in todo:
            combined = combined_logits(main, gap, relative, kept, alpha, strength, plausibility, threshold)
            setting = {"patch": patch, "alpha": alpha, "gate": list(gate) if gate else None,
                       "plausibility": plausibility, "agreement": threshold}
            rows.append(row(setting, combined))
        del gap, relative
    return rows


def pooled_probe(paths: list[str]) -> dict:
    """Several patch probes of the same patch and items as one, their scales pooled."""
    probes = [torch.load(path) for path in paths]
    first = probes[0]
    for path, probe in zip(paths[1:], probes[1:], strict=True):
        if probe["patch"] != first["patch"] or [it["id"] for it in probe["items"]] != [it["id"] for it in
                                                                                      first["items"]]:
            raise ValueError(f"{path}: another patch or other items than {paths[0]}")
    return {**first, "scales": {scale: m for probe in probes for scale, m in probe["scales"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("logits")
    ap.add_argument("--out", required=True)
    ap.add_argument("--patched", nargs="+",
                    help="scripts/patch_probe.py's outputs: score back-patching with contrastive decoding")
    ap.add_argument("--with-rows", help="with --patched: an earlier frontier's JSON, pooled in (not scored again)")
    ap.add_argument("--patch-agreement", nargs="+", default=["none"],
                    help="with --patched: the patch's agreement guards (nats; none: unguarded)")
    args = ap.parse_args()
    saved = torch.load(args.logits)
    main_l, null_l, items = saved["main"].float(), saved["null"].float(), saved["items"]
    processor = AutoProcessor.from_pretrained(resolve_model_id("organism:smol-whisper"))
    words: dict[int, str] = {}

    def verdicts(logits: torch.Tensor) -> list[str]:
        out = []
        for token, item in zip(logits.argmax(-1).tolist(), items, strict=True):
            if token not in words:
                words[token] = processor.decode([token], skip_special_tokens=True)
            out.append(judge(words[token], SimpleNamespace(**item)))
        return out

    plain = verdicts(main_l)
    # the same math as contrastive_logits, its expensive parts computed once for the whole grid
    gap = main_l - null_l
    probs = main_l.softmax(-1)
    relative = probs / probs.amax(-1, keepdim=True)
    del probs
    strengths = {g: gate_strength(Gate("audio_gap", *g), main_l, null_l) if g else None
                 for g in dict.fromkeys(gate for _, gate, _, _ in GRID)}
    agreement = agreement_signal(main_l, null_l)
    families = defaultdict(list)
    for i, item in enumerate(items):
        families[item["family"]].append(i)
    conflicts = {split: [i for i, it in enumerate(items) if it["kind"] == "conflict"
                         and (it["family"] == "clean") == (split == "clean")] for split in ("clean", "perturbed")}
    splits = {split: [i for i, it in enumerate(items) if (it["family"] == "clean") == (split == "clean")]
              for split in ("clean", "perturbed")}
    plain_metrics = {split: metrics([SimpleNamespace(kind=items[i]["kind"]) for i in idx], [plain[i] for i in idx])
                     for split, idx in splits.items()}

    def row(setting: dict, combined: torch.Tensor) -> dict:
        out = verdicts(combined)
        bounds = {}
        for family, idx in families.items():
            for kind in ("consistent", "audio_only"):
                ks = [i for i in idx if items[i]["kind"] == kind]
                bounds[f"{family} {kind}"] = harm_bound([plain[i] == "audio" for i in ks],
                                                        [out[i] == "audio" for i in ks])
        worst = max(bounds, key=lambda k: bounds[k]["upper"])
        cuts = {split: tdr_reduction_bound([plain[i] for i in idx], [out[i] for i in idx])
                for split, idx in conflicts.items()}
        split_metrics = {split: metrics([SimpleNamespace(kind=items[i]["kind"]) for i in idx], [out[i] for i in idx])
                         for split, idx in splits.items()}
        return {**setting, "bounds": {k: b["upper"] for k, b in bounds.items()},
                "worst_bound": bounds[worst]["upper"], "worst": worst,
                "worst_lost_gained": [bounds[worst]["lost"], bounds[worst]["gained"]],
                "passes": bounds[worst]["upper"] <= MAX_HARM + 1e-9,
                "clean_tdr_cut": cuts["clean"]["reduction"], "perturbed_tdr_cut": cuts["perturbed"]["reduction"],
                "metrics": {split: {k: m[k] for k in METRICS} for split, m in split_metrics.items()}}

    rows = []
    if args.patched is None:
        for alpha, gate, plausibility, threshold in tqdm(GRID, desc="settings", mininterval=30):
            combined = combined_logits(main_l, gap, relative, agreement, alpha, strengths[gate], plausibility,
                                       threshold)
            rows.append(row({"alpha": alpha, "gate": list(gate) if gate else None, "plausibility": plausibility,
                             "agreement": threshold}, combined))
    else:
        del gap, relative
        earlier = []
        if args.with_rows:  # an earlier frontier on the same items: one choice and one LOFO over both
            with open(args.with_rows) as f:
                earlier = json.load(f)["settings"]
        guards = [None if g.lower() == "none" else float(g) for g in args.patch_agreement]
        rows = patched_rows(pooled_probe(args.patched), items, main_l, null_l, strengths, row, guards,
                            frozenset(setting_key(r) for r in earlier)) + earlier
    passing = sorted((r for r in rows if r["passes"]), key=lambda r: -r["clean_tdr_cut"])
    report = {"max_harm": MAX_HARM, "n_items": len(items), "best_passing": passing[:1],
              "plain": {split: {k: m[k] for k in METRICS} for split, m in plain_metrics.items()},
              "leave_one_family_out": leave_one_family_out(rows, [f for f in families if f != "clean"]),
              "passing_without_agreement": [r for r in passing if r["agreement"] is None], "settings": rows}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    logging.getLogger(__name__).info("%d of %d settings pass; best %s", len(passing), len(rows), passing[:1])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
