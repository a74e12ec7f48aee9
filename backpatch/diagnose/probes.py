"""Layer-wise read-outs for diagnostics: cross-validated linear probes and audio/text convergence.

Pure functions on collected states (no model, no hooks), so they are tested on planted signals: a feature that is
decodable at one layer only must be found there, and features that only identify a clip must not leak across folds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------- probes
def _group_folds(groups: Sequence[Any], folds: int, seed: int) -> list[np.ndarray]:
    """Test-index arrays of a group k-fold split: every group's items land in exactly one fold."""
    unique = sorted(set(groups), key=str)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(unique))
    fold_of = {unique[g]: i % folds for i, g in enumerate(order)}
    assignment = np.array([fold_of[g] for g in groups])
    return [np.flatnonzero(assignment == k) for k in range(folds)]


def probe_layers(
    states: torch.Tensor | np.ndarray,
    labels: Sequence[Any],
    groups: Sequence[Any],
    folds: int = 5,
    l2: float | None = None,
    max_iter: int = 100,
    seed: int = 0,
) -> list[float | None]:
    """Cross-validated accuracy of a linear probe on every layer of ``states`` (``[layers, items, hidden]``).

    The probe is multinomial logistic regression on features standardized with the training fold's statistics,
    with an L2 penalty (``l2``; default ``1 / n_train``, the per-item equivalent of scikit-learn's ``C=1``), fitted
    by LBFGS (``max_iter`` 100 reaches the optimum's accuracy within about half a point on the organism). Folds
    are grouped by ``groups``: items built from one clip share its audio states, so an ungrouped split would let
    the probe memorise clips instead of reading the label.

    All layers and folds are fitted as one optimisation problem (their parameters are independent, so the
    joint optimum is every single optimum); one LBFGS run instead of layers x folds keeps Python overhead
    out of the way. Standardization is folded into the weights, so no standardized copy of the states is made.
    Items with non-finite features in any layer are left out. Returns ``None`` per layer when there are fewer
    than two groups or two classes. Features are cast to float32 (fp16/bf16 models).
    """
    x = torch.as_tensor(np.asarray(states) if not isinstance(states, torch.Tensor) else states)
    x = x.detach().to("cpu", torch.float32)
    if x.dim() != 3:
        raise ValueError(f"states must be [layers, items, hidden], got shape {tuple(x.shape)}")
    num_layers = x.shape[0]
    keep = torch.isfinite(x).all(dim=2).all(dim=0)
    x = x[:, keep]
    keep_list = keep.tolist()
    labels = [lab for lab, k in zip(labels, keep_list, strict=True) if k]
    groups = [g for g, k in zip(groups, keep_list, strict=True) if k]
    classes = sorted(set(labels), key=str)
    n_groups = len(set(groups))
    if len(classes) < 2 or n_groups < 2:
        return [None] * num_layers
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[lab] for lab in labels])
    n, n_classes = len(y), len(classes)
    tests = _group_folds(groups, min(folds, n_groups), seed)
    test = torch.zeros(len(tests), n, dtype=torch.bool)
    for f, idx in enumerate(tests):
        test[f, torch.from_numpy(idx)] = True
    weights = (~test).float()
    n_train = weights.sum(1).clamp_min(1)  # [F]
    weights = weights / n_train.unsqueeze(1)  # [F, n]: mean over each fold's training items
    penalty = (1.0 / n_train if l2 is None else torch.full_like(n_train, float(l2))).view(1, -1, 1, 1)
    mean = torch.einsum("fn,lnd->lfd", weights, x)
    var = torch.einsum("fn,lnd->lfd", weights, x * x) - mean * mean
    inv_std = 1.0 / var.clamp_min(0).sqrt().clamp_min(1e-6)  # [L, F, d]
    shape = (num_layers, len(tests), x.shape[2], n_classes)
    weight = torch.zeros(shape, requires_grad=True)
    bias = torch.zeros(num_layers, len(tests), n_classes, requires_grad=True)
    targets = y.expand(num_layers, len(tests), n).reshape(-1)

    def logits() -> torch.Tensor:
        scaled = weight * inv_std.unsqueeze(-1)  # standardized weights -> raw-feature weights
        offset = torch.einsum("lfd,lfdc->lfc", mean, scaled)
        return torch.einsum("lnd,lfdc->lfnc", x, scaled) - offset.unsqueeze(2) + bias.unsqueeze(2)

    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-10)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        ce = F.cross_entropy(logits().reshape(-1, n_classes), targets, reduction="none").view(num_layers, -1, n)
        loss = (ce * weights).sum() + 0.5 * (penalty * weight.pow(2)).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        correct = (logits().argmax(-1) == y) & test  # [L, F, n]
    return [float(c) / n for c in correct.sum(dim=(1, 2))]


def linear_probe(
    features: torch.Tensor | np.ndarray, labels: Sequence[Any], groups: Sequence[Any], **kwargs: Any
) -> float | None:
    """:func:`probe_layers` on one ``[items, hidden]`` feature matrix."""
    x = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    return probe_layers(x.unsqueeze(0), labels, groups, **kwargs)[0]


def chance_rate(labels: Sequence[Any]) -> float | None:
    """Majority-class rate: what a probe that ignores the features reaches."""
    if not labels:
        return None
    values, counts = np.unique(np.asarray([str(x) for x in labels]), return_counts=True)
    return float(counts.max() / counts.sum())


# --------------------------------------------------------------------------------------------- convergence
def _linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear CKA between two row-matched, column-centred matrices."""
    cross = (a.T @ b).pow(2).sum()
    norm = torch.sqrt((a.T @ a).pow(2).sum() * (b.T @ b).pow(2).sum())
    return float(cross / norm) if float(norm) > 0 else float("nan")


def class_mean_convergence(
    audio_states: torch.Tensor, audio_labels: Sequence[str], text_states: torch.Tensor, text_labels: Sequence[str]
) -> dict[str, float | None]:
    """How close a class heard is to the same class read, in one layer's state space.

    Class means are taken per modality and centred by that modality's mean over classes (so a shared offset,
    e.g. "this is an audio token", does not count as agreement). Returns the mean cosine between the audio and
    text means of the same class (``cosine``), of different classes (``baseline``), linear CKA of the two
    class-mean matrices (same geometry, possibly in different directions) and the accuracy of classifying each
    audio item by the nearest text class mean (``nc_acc``; chance ``1/classes``).
    """
    empty = {"cosine": None, "baseline": None, "cka": None, "nc_acc": None, "n_classes": 0}
    a = torch.as_tensor(audio_states).to(torch.float32)
    t = torch.as_tensor(text_states).to(torch.float32)
    a_ok = torch.isfinite(a).all(1)
    t_ok = torch.isfinite(t).all(1)
    a_labels = [lab for lab, ok in zip(audio_labels, a_ok.tolist(), strict=True) if ok]
    t_labels = [lab for lab, ok in zip(text_labels, t_ok.tolist(), strict=True) if ok]
    a, t = a[a_ok], t[t_ok]
    classes = sorted(set(a_labels) & set(t_labels))
    if len(classes) < 2:
        return empty
    a_lab = np.asarray(a_labels)
    t_lab = np.asarray(t_labels)
    a_means = torch.stack([a[torch.from_numpy(a_lab == c)].mean(0) for c in classes])
    t_means = torch.stack([t[torch.from_numpy(t_lab == c)].mean(0) for c in classes])
    a_centre, t_centre = a_means.mean(0), t_means.mean(0)
    a_means, t_means = a_means - a_centre, t_means - t_centre
    cos = F.normalize(a_means, dim=1) @ F.normalize(t_means, dim=1).T
    k = len(classes)
    matched = float(cos.diag().mean())
    baseline = float((cos.sum() - cos.diag().sum()) / (k * k - k))
    members = torch.from_numpy(np.isin(a_lab, classes))
    items = F.normalize(a[members] - a_centre, dim=1) @ F.normalize(t_means, dim=1).T
    truth = torch.tensor([classes.index(c) for c in a_lab[members.numpy()]])
    nc_acc = float((items.argmax(1) == truth).float().mean())
    return {"cosine": matched, "baseline": baseline, "cka": _linear_cka(a_means, t_means), "nc_acc": nc_acc,
            "n_classes": k}


def text_takeover_layer(audio_prob: Sequence[float | None], text_prob: Sequence[float | None]) -> int | None:
    """First layer from which the text answer's lens probability exceeds the audio answer's in every later
    layer (``None`` if the text answer is not ahead at the last layer)."""
    layer = None
    for i in range(len(audio_prob) - 1, -1, -1):
        a, t = audio_prob[i], text_prob[i]
        if a is None or t is None or not t > a:
            break
        layer = i
    return layer


#: both answers below this lens probability count as "neither readable yet", not as one ahead of the other
LENS_FLOOR = 0.01


def text_ahead_ranges(audio_prob: Sequence[float | None], text_prob: Sequence[float | None],
                      floor: float = LENS_FLOOR) -> list[list[int]]:
    """``[first, last]`` layer ranges where the text answer's lens probability is above the audio answer's while
    one of them is readable (>= ``floor``): a model may lead with the text in the middle and still let the audio
    draw level at the last layer, which :func:`text_takeover_layer` alone would hide."""
    ranges: list[list[int]] = []
    for i, (a, t) in enumerate(zip(audio_prob, text_prob, strict=True)):
        if a is None or t is None or not t > a or max(a, t) < floor:
            continue
        if ranges and ranges[-1][1] == i - 1:
            ranges[-1][1] = i
        else:
            ranges.append([i, i])
    return ranges
