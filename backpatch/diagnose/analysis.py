"""Per-layer analysis of a recorded pass: probes, logit lens, convergence and attention shares, one row per layer.

Works on what :mod:`.passes` recorded (CPU float32 tensors), with the pure read-outs of :mod:`.probes`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..evaluate import ConflictItem, judge, metrics
from .passes import _Run
from .probes import class_mean_convergence, probe_layers

KINDS = ("conflict", "audio_only", "consistent")


#: how each curve is computed, copied into every report
METHODS = {
    "probe": "multinomial logistic regression, L2 1/n_train, LBFGS (100 iterations), standardized features, "
             "5-fold CV grouped by clip",
    "lens": "final norm + LM head on each layer's last-prompt-position state; probability summed over the "
            "answer word's possible first tokens, best rank",
    "convergence": "cosine of centred class means (audio: mean audio-position state per clip; text: claim-word "
                   "state in conflict prompts); convergence_answer: the same at the last prompt position "
                   "(audio-only prompts by audio answer vs conflict prompts by text answer)",
    "attention": "eager attention weights, mean over heads, from the last prompt position",
}


def _nanmean(values: torch.Tensor) -> float | None:
    values = values[torch.isfinite(values)]
    return float(values.mean()) if values.numel() else None


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    return value


def _analyse(run: _Run, items: Sequence[ConflictItem], num_layers: int, progress: bool, label: str) -> dict:
    """Per-layer curves of one pass: probes, lens, convergence and attention."""
    kinds = np.array([it.kind for it in items])
    clips = [str(it.audio) for it in items]
    audio_labels = [it.audio_answer for it in items]
    last, audio_mean, claim = run.stacked("last"), run.stacked("audio_mean"), run.stacked("claim")
    lens = {k: run.stacked(k) for k in run.lens}
    attn_audio, attn_text = run.stacked("attn_audio"), run.stacked("attn_text")
    select = {k: np.flatnonzero(kinds == k) for k in KINDS}
    conflict = torch.from_numpy(select["conflict"])
    # unique clips for the audio side of convergence (their audio states do not depend on the prompt)
    first_of_clip = sorted({c: i for i, c in reversed(list(enumerate(clips)))}.values())
    clip_index = torch.tensor(first_of_clip, dtype=torch.long)
    probes: dict[str, list[float | None]] = {}
    jobs = [(f"probe_audio_{kind}", last, kind, "audio") for kind in KINDS]
    jobs += [(f"probe_audio_span_{kind}", audio_mean, kind, "audio") for kind in KINDS]
    jobs += [("probe_text_conflict", last, "conflict", "text")]
    for key, states, kind, target in tqdm(jobs, desc=f"probes ({label})", unit="probe", disable=not progress):
        idx = select[kind]
        if not len(idx):
            probes[key] = [None] * num_layers
            continue
        lab = [items[j].audio_answer if target == "audio" else items[j].text_answer for j in idx]
        probes[key] = probe_layers(states[:, torch.from_numpy(idx)], lab, [clips[j] for j in idx])
    idx = select["conflict"]
    layers = []
    for i in range(num_layers):
        row: dict[str, Any] = {"layer": i, **{key: values[i] for key, values in probes.items()}}
        for key in ("audio_prob", "text_prob", "audio_rank", "text_rank"):
            row[f"lens_{key}"] = _nanmean(lens[key][i][conflict]) if len(idx) else None
        for kind in ("audio_only", "consistent"):
            rows = torch.from_numpy(select[kind])
            row[f"lens_audio_prob_{kind}"] = _nanmean(lens["audio_prob"][i][rows]) if len(rows) else None
        conv = class_mean_convergence(audio_mean[i][clip_index], [audio_labels[j] for j in first_of_clip],
                                      claim[i][conflict], [items[j].text_answer for j in idx])
        row["convergence"] = conv["cosine"]
        row["convergence_baseline"] = conv["baseline"]
        row["convergence_cka"] = conv["cka"]
        row["convergence_nc_acc"] = conv["nc_acc"]
        audio_only = select["audio_only"]
        answer = class_mean_convergence(last[i][torch.from_numpy(audio_only)], [audio_labels[j] for j in audio_only],
                                        last[i][conflict], [items[j].text_answer for j in idx])
        row["convergence_answer"] = answer["cosine"]
        row["attn_audio"] = _nanmean(attn_audio[i][conflict]) if len(idx) else None
        row["attn_text"] = _nanmean(attn_text[i][conflict]) if len(idx) else None
        for kind in ("audio_only", "consistent"):
            rows = torch.from_numpy(select[kind])
            row[f"attn_audio_{kind}"] = _nanmean(attn_audio[i][rows]) if len(rows) else None
            row[f"attn_text_{kind}"] = _nanmean(attn_text[i][rows]) if len(rows) else None
        layers.append({k: _round(v) for k, v in row.items()})
    return {"layers": layers}


def layer_rows(runs: dict[str, _Run], items: Sequence[ConflictItem], num_layers: int, progress: bool,
               has_patches: bool) -> list[dict]:
    """The report's ``layers``: the plain curves, and with patches the back-patched ones as ``KEY_patched``."""
    layers = _analyse(runs["plain"], items, num_layers, progress, "plain")["layers"]
    if has_patches:
        patched = _analyse(runs["backpatched"], items, num_layers, progress, "back-patched")["layers"]
        for row, prow in zip(layers, patched, strict=True):
            row.update({f"{k}_patched": v for k, v in prow.items() if k != "layer"})
    return layers


def first_token_metrics(runs: dict[str, _Run], items: Sequence[ConflictItem]) -> dict[str, dict]:
    """Metrics of each pass's first-token answers (argmax at the last prompt position)."""
    return {name: metrics(items, [judge(a, it) for a, it in zip(run.answers, items, strict=True)])
            for name, run in runs.items() if run.answers}
