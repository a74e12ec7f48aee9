"""The default calibration search: coarse to fine on growing, nested item subsets, within a time budget.

Stage 1 scores the coarse band grid (:func:`.grid.band_grid`) on a small subset of clips; stage 2 re-scores the
best no-harm settings on a larger subset together with their neighbours (half/double scale, source or target one
layer away) and contrastive decoding (each alpha alone and with the two best patches); stage 3 scores the best
few of stage 2 on every item. Subsets are whole clips (all items of a clip together), seeded, nested. This is
successive halving: most settings are discarded on little data, the few that matter are measured on all of it.

Stage 2 also tries the audio-confidence gate (:func:`.grid.gate_grid`) on the strongest settings of stage 1
(by TDR reduction, whether or not they passed the no-harm rule: a gate is how a strong but harmful setting can
become harmless) and on the best ones; a step gate reuses its setting's patched logits, so it costs no forward.
The patch's agreement guard (:data:`.grid.PATCH_AGREEMENT_GRID`) is tried on the same patches, also from stored
logits. Stage 3 re-scores the finalists, gated ones included, on every item; it can be skipped (``full=False``) where a
forward over every item is expensive, since the ``generate()`` verification checks the finalists on every item.

No-harm rule (:mod:`backpatch.paired`): every scored setting gets a paired report against the plain answers of the
same items, per split (clean, perturbed) and control kind (audio-only, consistent). The screening stages (coarse,
refine) require the paired point loss to stay within ``max_harm``; the last stage requires its exact 95% upper
bound to (a bound on 30-odd items would reject any single flip, so it is used where the items are many). Settings
are ranked by the lower bound of their TDR reduction, then by TDR.

Combinations with the peer blocks: after stage 2, the best no-harm attention and steering candidates are scored
again on top of the best ungated back-patching and contrastive candidates of stage 2, and with each other
(:func:`combinations`, a handful of settings), on stage 2's items; without this the search would only ever
measure each block alone.

Order: stage 2 lists contrastive decoding alone, then the best stage-1 settings, the strongest, and their
neighbours, each setting's alphas and gates together (:func:`by_priority`), so a budget cut drops the least
promising settings.

Resume: ``previous`` results of an earlier run (``calibrate(resume=...)``) are reused, not scored again.

Budget: ``budget_s`` is the search's share of the calibration's budget (:mod:`.budget` reserves the ``generate()``
verification); stage 1 may use up to 45% of it, stage 2 up to 75%, stage 3 the rest; a stage that reaches its
share stops and says so (``truncated`` in the record). Stage 3's capture is skipped when its estimate
(``full_capture_seconds``) does not fit.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tqdm.auto import tqdm

from ..paired import paired_report
from .grid import (
    AGREEMENT_GRID,
    PATCH_AGREEMENT_GRID,
    PLAUSIBILITY_GRID,
    Candidate,
    Setting,
    band_grid,
    block_grid,
    gate_grid,
    refinements,
)

logger = logging.getLogger(__name__)

STAGE_SHARES = (0.45, 0.75, 1.0)


def passes_no_harm(candidate: dict[str, Any], plain: dict[str, Any], max_harm: float = 0.02,
                   bounded: bool = False) -> bool:
    """Audio-only and consistent accuracy each within ``max_harm`` of plain (missing kinds do not count).

    With a paired report (``candidate["paired"]``): per split and kind, and on perturbed data per perturbation family
    and kind (the worst family must pass, not the pooled set: issue 28), the paired point loss, or with ``bounded``
    its 95% upper bound. Without one (metrics of unpaired runs): the difference of the two accuracies."""
    paired = candidate.get("paired")
    if paired is not None:
        field = "upper" if bounded else "loss"
        groups = [*paired["harm"].values(), *(paired.get("harm_by_family") or {}).values()]
        return all(bound[field] is None or bound[field] <= max_harm + 1e-9
                   for kinds in groups for bound in kinds.values())
    for key in ("audio_only_acc", "consistent_acc"):
        if plain[key] is not None and candidate[key] is not None and candidate[key] < plain[key] - max_harm - 1e-9:
            return False
    return True


def family_losses(paired: dict[str, Any], max_harm: float = 0.02) -> list[str]:
    """The perturbation families (with control kind and point loss) on which a verified setting loses more than
    ``max_harm`` of accuracy, worst first, e.g. ``["reverb audio-only 0.04"]``.

    Point losses, not 95% bounds: a family holds 12-65 paired control items on the shipped validation data, where no
    bound can certify 2 points (one flip in 25 items is an upper bound near 0.2), but the point loss still catches
    harm that the pooled perturbed set averages away (issue 28)."""
    out = []
    for family, kinds in (paired.get("harm_by_family") or {}).items():
        if family == "clean":
            continue
        for kind, bound in kinds.items():
            if bound.get("loss") is not None and bound["loss"] > max_harm + 1e-9:
                out.append((bound["loss"], f"{family} {kind.replace('_', '-')} {bound['loss']:.3g}"))
    return [text for _, text in sorted(out, reverse=True)]


def verification_failures(paired: dict[str, Any], max_harm: float = 0.02) -> list[str]:
    """Every way a verified finalist (full generate on every item) breaks the rule, named: a split's pooled 95% upper
    bound above ``max_harm`` (``"perturbed consistent bound 0.03"``), then the families of :func:`family_losses`."""
    pooled = [f"{split} {kind.replace('_', '-')} bound {bound['upper']:.3g}"
              for split, kinds in paired["harm"].items() for kind, bound in kinds.items()
              if bound.get("upper") is not None and bound["upper"] > max_harm + 1e-9]
    return pooled + family_losses(paired, max_harm)


def verified_no_harm(paired: dict[str, Any], max_harm: float = 0.02) -> bool:
    """The rule a verified finalist must meet: no :func:`verification_failures`."""
    return not verification_failures(paired, max_harm)


def tdr_key(m: dict[str, Any]) -> float:
    return m["tdr"] if m["tdr"] is not None else 1.0


def rank_key(m: dict[str, Any]) -> tuple[float, float]:
    """Highest lower bound of the TDR reduction first (paired runs), then lowest TDR."""
    paired = m.get("paired") or {}
    lower = paired.get("tdr_reduction_lower")
    return (-lower if lower is not None else 0.0, tdr_key(m))


@dataclass
class StageRecord:
    """What one stage scored, on how many items, and whether the budget cut it short."""

    name: str
    n_items: int
    plain: dict[str, Any]
    results: list[tuple[Candidate, dict[str, Any]]] = field(default_factory=list)
    truncated: int = 0
    #: candidates whose metrics came from an earlier run (resume), not scored here
    reused: int = 0
    seconds: float = 0.0
    #: the stage's items and plain verdicts (for each setting's paired report), and which harm rule applies
    items: Sequence[Any] = ()
    bounded: bool = False


def clip_subsets(items: Sequence[Any], fractions: Sequence[float], seed: int = 0) -> list[list[Any]]:
    """Nested item subsets made of whole clips (every item of a clip together), in a seeded order; the last
    fraction 1.0 is all items. Each subset lists the previous one's items first."""
    clips: dict[Any, list[Any]] = {}
    for item in items:
        clips.setdefault(item.audio, []).append(item)
    order = list(clips)
    random.Random(seed).shuffle(order)
    out = []
    for fraction in fractions:
        n = max(1, round(len(order) * fraction))
        out.append([it for key in order[:n] for it in clips[key]])
    return out


def by_priority(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates grouped by patch setting, groups in the order their first candidate comes: one setting's
    candidates (its alphas and gates) share its patched logits (the scorer caches the latest settings), and a
    budget cut drops the groups that were listed last, the least promising, not a part chosen by name."""
    first: dict[Setting | None, int] = {}
    for i, c in enumerate(candidates):
        first.setdefault(c.setting, i)
    return sorted(candidates, key=lambda c: first[c.setting])  # stable: within a group, the listed order


def _run_stage(record: StageRecord, candidates: Sequence[Candidate], score: Callable[[Candidate], dict],
               deadline: float, max_harm: float, progress: bool,
               previous: dict[Candidate, dict[str, Any]] | None = None) -> None:
    """Score ``candidates`` into ``record`` until ``deadline``; a record may be run on again (stage 2's
    :func:`combinations`): its results, counts and seconds add up."""
    started = time.perf_counter()
    previous = previous or {}
    bar = tqdm(candidates, desc=f"calibrate {record.name} ({record.n_items} items)", unit="setting",
               disable=not progress)
    best = None
    for i, candidate in enumerate(bar):
        if candidate in previous:
            m = previous[candidate]
            record.reused += 1
        elif time.perf_counter() > deadline:
            truncated = sum(1 for c in candidates[i:] if c not in previous)
            record.truncated += truncated
            logger.warning("calibration %s: time budget reached, %d of %d settings not scored", record.name,
                           truncated, len(candidates))
            reused = [(c, previous[c]) for c in candidates[i:] if c in previous]
            record.results += reused
            record.reused += len(reused)
            break
        else:
            m = score(candidate)
            if record.items and "verdicts" in m and "verdicts" in record.plain:
                m["paired"] = paired_report(record.items, record.plain["verdicts"], m["verdicts"])
        record.results.append((candidate, m))
        if passes_no_harm(m, record.plain, max_harm, record.bounded) and (best is None or
                                                                          rank_key(m) < rank_key(best[1])):
            best = (candidate, m)
            bar.set_postfix_str(f"best {candidate.label()} TDR {m['tdr']}")
    bar.close()
    record.seconds = round(record.seconds + time.perf_counter() - started, 1)


def ranked(record: StageRecord, max_harm: float | None, patches_only: bool | None = None) -> list[Candidate]:
    """Candidates of a stage that pass the no-harm rule (all of them with ``max_harm=None``), best first
    (:func:`rank_key`)."""
    rows = [(c, m) for c, m in record.results
            if max_harm is None or passes_no_harm(m, record.plain, max_harm, record.bounded)]
    if patches_only is not None:
        rows = [(c, m) for c, m in rows if (c.alpha == 0) == patches_only]
    return [c for c, _ in sorted(rows, key=lambda r: rank_key(r[1]))]


def combinations(record: StageRecord, max_harm: float) -> list[Candidate]:
    """The best no-harm candidate of each peer block (alone) joined with the best no-harm ungated back-patching
    candidate, the best with a contrastive alpha, and the other block: the settings that ask whether the blocks
    add to what the other methods already buy. Gates are left out (a gate does not act on the blocks, so a preset
    with both is refused). Settings already in ``record`` are not listed again."""
    passing = ranked(record, max_harm)
    alone: dict[str, Candidate] = {}  # per block method, its best no-harm candidate alone
    for c in passing:
        if c.setting is None and not c.alpha and len(c.blocks) == 1:
            alone.setdefault(c.blocks[0][0], c)
    plain_methods = [c for c in passing if not c.has_blocks and c.gate is None]
    bases = [c for c in plain_methods if not c.alpha][:1] + [c for c in plain_methods if c.alpha][:1]
    out = [base.with_blocks(**dict(block.blocks)) for block in alone.values() for base in bases]
    if len(alone) > 1:  # the blocks together
        out.append(Candidate.of(**{key: c.block(key) for key, c in alone.items()}))
    scored = {c for c, _ in record.results}
    return [c for c in dict.fromkeys(out) if c not in scored]


def staged_search(
    num_layers: int,
    stage_scorers: Sequence[Callable[[Candidate], dict]],
    full_stage: Callable[[list[Candidate]], tuple[Callable[[Candidate], dict], dict[str, Any], int]],
    alphas: Sequence[float],
    budget_s: float,
    max_harm: float = 0.02,
    keep: tuple[int, int, int] = (16, 8, 6),
    seed: int = 0,
    progress: bool = True,
    gates: bool = True,
    full: bool = True,
    previous: dict[str, dict[Candidate, dict[str, Any]]] | None = None,
    full_capture_seconds: float = 0.0,
    on_skip: Callable[[str], None] | None = None,
    blocks: bool = True,
) -> list[StageRecord]:
    """Run the three stages. ``stage_scorers[k]`` is ``(score, plain metrics, n_items, items)`` of stage ``k``'s
    subset; ``full_stage(finalists)`` prepares the last stage for just the finalists (only their source layers are
    captured on the full set) and returns the same four. ``gates``: try the audio-confidence gates in stage 2.
    ``full``: run stage 3 (else the records end with stage 2). ``previous``: per stage name, the metrics of
    candidates an earlier run of the same search scored (:func:`.run.previous_results`): they are taken as
    they are, not scored again, so a search that its budget cut short goes on where it stopped.
    ``full_capture_seconds``: the estimated time of stage 3's capture; stage 3 is skipped (``on_skip`` is told)
    when it would not end before the stage's deadline. ``blocks``: stage 2 also scores the attention-to-audio and
    audio-silence-steering grids (:func:`.grid.block_grid`)."""
    previous = previous or {}
    started = time.perf_counter()
    deadlines = [started + share * budget_s for share in STAGE_SHARES]
    coarse = [Candidate(s) for s in band_grid(num_layers)]
    random.Random(seed).shuffle(coarse)  # a budget cut then drops a random, not a systematic, part of the grid
    records = [StageRecord(name, n, plain, items=items) for name, (_, plain, n, items)
               in zip(("coarse", "refine"), stage_scorers, strict=True)]
    _run_stage(records[0], coarse, stage_scorers[0][0], deadlines[0], max_harm, progress, previous.get("coarse"))

    best1 = ranked(records[0], max_harm)[: keep[0]]
    settings: list[Setting] = [c.setting for c in best1 if c.setting is not None]
    neighbours = [Candidate(s) for s in refinements(settings[: keep[1]], num_layers)]
    top_patches = [c.setting for c in best1[:2]]
    strongest = [c.setting for c in ranked(records[0], None)[:2]]  # harmful or not: a gate may make them harmless
    guards = [(p, None) for p in (None, *PLAUSIBILITY_GRID)] + [(None, g) for g in AGREEMENT_GRID]
    contrastive = [Candidate.of(s, float(a), plausibility=p, agreement=g) for a in alphas if a > 0
                   for s in dict.fromkeys((None, *top_patches, *strongest)) for p, g in guards]
    refine = list(dict.fromkeys([*contrastive, *best1, *(Candidate(s) for s in strongest), *neighbours]))
    if gates:
        gated = [c for c in refine if c.setting in (*top_patches[:1], *strongest) or (c.setting is None)]
        refine += [replace(c, gate=g) for c in gated for g in gate_grid()]
        # the patch's agreement guard on the same patches: a 0/1 step per row, so no forward of its own
        refine += [Candidate(s, patch_agreement=g) for s in dict.fromkeys((*top_patches, *strongest))
                   if s is not None for g in PATCH_AGREEMENT_GRID]
    if blocks:  # the peer methods' small grids (a full forward each: no stored states serve them)
        refine += block_grid(num_layers)
    refine = by_priority(refine)
    _run_stage(records[1], refine, stage_scorers[1][0], deadlines[1], max_harm, progress, previous.get("refine"))
    combined = combinations(records[1], max_harm) if blocks else []
    if combined:  # stage 2 goes on with them, until stage 3's deadline (halfway to it when stage 3 runs)
        end = deadlines[2] if not full else (deadlines[1] + deadlines[2]) / 2
        _run_stage(records[1], combined, stage_scorers[1][0], end, max_harm, progress, previous.get("refine"))
    if not full:
        return records

    finalists = ranked(records[1], max_harm, patches_only=True)[: keep[2]]
    finalists += ranked(records[1], max_harm, patches_only=False)[: max(2, keep[2] // 2)]
    if not finalists:  # nothing passed: measure the lowest-TDR settings anyway, so the report shows why
        finalists = [c for c, _ in sorted(records[1].results, key=lambda r: tdr_key(r[1]))[: keep[2]]]
    finalists = by_priority(finalists)
    if time.perf_counter() + full_capture_seconds > deadlines[2]:
        if on_skip is not None:
            on_skip(f"the full stage (its capture needs about {full_capture_seconds:.0f} s, "
                    f"{max(0.0, deadlines[2] - time.perf_counter()):.0f} s left)")
        return records
    score, plain, n_items, items = full_stage(finalists)
    records.append(StageRecord("full", n_items, plain, items=items, bounded=True))
    _run_stage(records[2], finalists, score, deadlines[2], max_harm, progress, previous.get("full"))
    return records
