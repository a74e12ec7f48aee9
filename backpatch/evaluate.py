"""Text-dominance evaluation on conflict sets (README: "Evaluation"), for any supported model.

A conflict set is JSONL: one item per line with the audio clip (relative to the file), a prompt, the answer
the audio supports and the answer the text claims. Every item is answered twice, plainly and with the
preset applied, through the processor's chat template; the report gives TDR, AFR, "other", consistent and
audio-only accuracy with 95% Wilson intervals, and the same metrics per framing and per label when the items
carry ``framing`` / ``label`` keys (as ``backpatch conflicts`` writes them). With accelerate
(``accelerate launch -m backpatch eval``) the items are split across processes and the answers gathered, so
the report equals the single-process one.

Clips longer than the model's audio window are refused before any model work, all of them named
(:func:`check_clip_lengths`), unless ``truncate=True``; then the report records which items were cut
(``truncated_audio``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .answers import answer_items, encode_items, item_waves
from .audio_io import TRUNCATE_HINT, AudioTooLongError, clip_seconds, exceeds_window
from .inputs import (
    audio_window_seconds,
    check_system_turn,
    truncation_enabled,
)
from .items import ANNOTATIONS, ConflictItem, ConflictSetError, judge, load_conflict_set, normalize
from .paired import family_of, paired_report, wilson
from .preset import Preset, PresetError, methods_label

__all__ = [
    "ConflictItem",
    "ConflictSetError",
    "answer_items",
    "breakdown",
    "check_clip_lengths",
    "encode_items",
    "evaluate",
    "item_waves",
    "judge",
    "load_conflict_set",
    "metrics",
    "normalize",
    "wilson",
]

logger = logging.getLogger(__name__)

METRICS = ("tdr", "afr", "other_rate", "consistent_acc", "audio_only_acc")
#: annotations the report breaks the metrics down by (``by_<key>``)
BREAKDOWNS = ("task", "framing", "label", "perturbation")
#: rows shown per breakdown in the terminal table (the JSON report has all)
TABLE_ROWS = 30
#: long clips named in a refusal (all are counted)
NAMED_CLIPS = 10


def _rate(k: int, n: int) -> float | None:
    return round(k / n, 4) if n else None


def metrics(items: Sequence[ConflictItem], verdicts: Sequence[str]) -> dict[str, Any]:
    """TDR, AFR and the accuracies (README: "Evaluation"). A rate with a zero denominator is ``None`` (JSON
    null), never a made-up 0."""
    counts: Counter = Counter()
    for item, verdict in zip(items, verdicts, strict=True):
        counts[item.kind] += 1
        counts[(item.kind, verdict)] += 1
    n_conflict, n_cons, n_ao = counts["conflict"], counts["consistent"], counts["audio_only"]
    text, audio, other = (counts[("conflict", v)] for v in ("text", "audio", "other"))
    fractions = {
        "tdr": (text, text + audio),
        "afr": (audio, n_conflict),
        "other_rate": (other, n_conflict),
        "consistent_acc": (counts[("consistent", "audio")], n_cons),
        "audio_only_acc": (counts[("audio_only", "audio")], n_ao),
    }
    out: dict[str, Any] = {name: _rate(k, n) for name, (k, n) in fractions.items()}
    out |= {"n_conflict": n_conflict, "n_consistent": n_cons, "n_audio_only": n_ao,
            "followed_text": text, "followed_audio": audio, "other": other}
    out["ci95"] = {name: wilson(k, n) for name, (k, n) in fractions.items()}
    return out


def breakdown(items: Sequence[ConflictItem], plain: Sequence[str], patched: Sequence[str],
              key: str | Callable[[ConflictItem], str | None]) -> dict[str, dict[str, Any]] | None:
    """Metrics per value of an item annotation (``framing``, ``label``) or of a function of the item (its
    perturbation family): ``{value: {"plain": ..., "backpatched": ...}}`` in first-seen order, over the items that
    carry one; ``None`` when no item does."""
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        value = key(item) if callable(key) else getattr(item, key)
        if value is not None:
            groups.setdefault(value, []).append(i)
    if not groups:
        return None
    return {value: {column: metrics([items[i] for i in rows], [verdicts[i] for i in rows])
                    for column, verdicts in (("plain", plain), ("backpatched", patched))}
            for value, rows in groups.items()}


def check_system_turns(items: Sequence[ConflictItem], processor: Any) -> None:
    """Items whose claim is stated in a system turn (their ``system`` field) are refused, naming the first, when the
    model's chat template drops system turns: they would silently be answered without their claim. One check for
    the set: whether a template keeps system turns does not depend on the text."""
    with_system = next((it for it in items if it.system), None)
    if with_system is not None:
        check_system_turn(processor, with_system.system, f"the system turn of item {with_system.id}",
                          "leave out this set's system-turn items (their 'system' field) for this model")


def check_clip_lengths(items: Sequence[ConflictItem], processor: Any,
                       truncate: bool | None = None) -> dict[str, Any] | None:
    """The long-clip rule for a conflict set, before any model work: every item whose clip is longer than the
    model's audio window (:func:`backpatch.inputs.audio_window_seconds`) is counted, and without ``truncate``
    they raise :class:`AudioTooLongError` naming them. With ``truncate`` the record for the report:
    ``{"n": ..., "ids": [...], "limit_s": ...}``; without it ``None``. Reads only the files' headers."""
    truncate = truncation_enabled(truncate)
    limit = audio_window_seconds(processor)
    long: list[tuple[str, float]] = []
    if limit is not None:
        seconds: dict[Path, float] = {}
        for item in items:
            if item.audio not in seconds:
                seconds[item.audio] = clip_seconds(item.audio)
            if exceeds_window(seconds[item.audio], limit):
                long.append((item.id, seconds[item.audio]))
    if long and not truncate:
        named = ", ".join(f"{i} ({s:.2f} s)" for i, s in long[:NAMED_CLIPS])
        more = f" and {len(long) - NAMED_CLIPS} more" if len(long) > NAMED_CLIPS else ""
        raise AudioTooLongError(
            f"{len(long)} of {len(items)} items have clips longer than the {limit:g} s of audio this model accepts "
            f"(its processor's audio window): {named}{more}; trim them, or {TRUNCATE_HINT.format(limit=limit)}")
    if not truncate:
        return None
    if long:
        logger.warning("%d items have clips longer than %g s; only their first %g s are used", len(long), limit,
                       limit)
    return {"n": len(long), "ids": [i for i, _ in long], "limit_s": limit}


def truncation_line(record: dict[str, Any] | None) -> str | None:
    """The line a printed report gets when truncation was asked for."""
    if record is None:
        return None
    if record["limit_s"] is None:
        return "truncated audio: none (--truncate-audio; this model's processor has no fixed audio window)"
    ids = ", ".join(record["ids"][:NAMED_CLIPS]) + (f" and {record['n'] - NAMED_CLIPS} more"
                                                    if record["n"] > NAMED_CLIPS else "")
    return (f"truncated audio: {record['n']} items cut to their first {record['limit_s']:g} s (--truncate-audio)"
            + (f": {ids}" if record["n"] else ""))


def evaluate(
    wrapped: Any,
    processor: Any,
    data: str | Path,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    limit: int | None = None,
    model_name: str | None = None,
    progress: bool = True,
    truncate: bool | None = None,
    max_harm: float = 0.02,
    plain_answers: Sequence[str] | None = None,
    instruction: str | None = None,
    instruction_role: str = "user",
    mitigate: bool = True,
) -> dict[str, Any] | None:
    """Plain vs back-patched metrics on a conflict set; the report (README: "Evaluation") as a dict.

    ``report["paired"]`` has the paired no-harm bounds (:mod:`backpatch.paired`) per split and control kind; a
    control metric whose upper bound on the loss exceeds ``max_harm`` is marked in the table (``!``).
    ``plain_answers`` (single process): the plain answers of an earlier report on the same data and settings.
    ``instruction`` / ``instruction_role`` / ``mitigate``: prompt framing in the second column (see
    :func:`answer_items`); the report's ``settings`` record them.

    Clips longer than the model's audio window are refused before any model work, naming every such item,
    unless ``truncate=True``: then they are cut to the window and ``report["truncated_audio"]`` says which.
    Under ``accelerate launch`` every process answers its share of the items; the main process gets the
    report and the others get ``None``.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from .answerability import chance_warning, check_labels

    items = load_conflict_set(data, limit)
    truncate = truncation_enabled(truncate)
    truncated = check_clip_lengths(items, processor, truncate)
    warnings = [w for w in (check_labels(items, processor),) if w]  # raises when no label can be written
    if instruction and instruction_role == "system":
        check_system_turn(processor, instruction)
    check_system_turns(items, processor)
    # On a CPU-only machine accelerate treats torchrun-launched processes as distributed only with cpu=True.
    state = PartialState(cpu=not torch.cuda.is_available())
    indices = list(range(len(items)))
    with state.split_between_processes(indices) as mine:
        gates: list = []
        if plain_answers is not None and len(plain_answers) != len(items):
            raise ValueError(f"plain_answers has {len(plain_answers)} answers for {len(items)} items")
        known = [plain_answers[i] for i in mine] if plain_answers is not None else None
        plain, patched = answer_items(wrapped, processor, [items[i] for i in mine], batch_size, max_new_tokens,
                                      progress=progress and state.is_local_main_process, truncate=truncate,
                                      gates=gates, plain_answers=known, instruction=instruction,
                                      instruction_role=instruction_role, mitigate=mitigate)
        rows = list(zip(mine, plain, patched, gates, strict=True))
    if state.num_processes > 1:
        rows = gather_object(rows)
        # Every rank leaves the process group together. A rank that exits while another still holds its gloo
        # connections makes the survivor's gloo thread hit a closed socket and abort (SIGABRT in rank 0 when the
        # machine is loaded and the ranks finish at different times).
        state.wait_for_everyone()
        state.destroy_process_group()
    if not state.is_main_process:
        return None
    answers = {index: (p, b, g) for index, p, b, g in rows}
    plain = [answers[i][0] for i in indices]
    patched = [answers[i][1] for i in indices]
    gate_rows = [answers[i][2] for i in indices]
    plain_verdicts = [judge(a, it) for a, it in zip(plain, items, strict=True)]
    patched_verdicts = [judge(a, it) for a, it in zip(patched, items, strict=True)]
    report = {
        "model": model_name or getattr(wrapped.config, "_name_or_path", type(wrapped.base_model).__name__),
        "preset": wrapped.preset.to_dict(),
        "data": str(data),
        "settings": {"max_new_tokens": max_new_tokens, "decoding": "greedy", "limit": limit,
                     "num_processes": state.num_processes, "truncate_audio": truncate,
                     "instruction": {"text": instruction, "role": instruction_role} if instruction else None,
                     "mitigation": "preset" if mitigate else "none"},
        "plain": metrics(items, plain_verdicts),
        "backpatched": metrics(items, patched_verdicts),
        "items": [
            {"id": it.id, "kind": it.kind, "audio_answer": it.audio_answer, "text_answer": it.text_answer,
             **{key: getattr(it, key) for key in ANNOTATIONS if getattr(it, key) is not None},
             "plain": p, "backpatched": b, "plain_follows": pv, "backpatched_follows": bv,
             **({"gate": g} if g is not None else {})}
            for it, p, b, pv, bv, g in zip(items, plain, patched, plain_verdicts, patched_verdicts, gate_rows,
                                           strict=True)
        ],
        "paired": paired_report(items, plain_verdicts, patched_verdicts),
        "max_harm": max_harm,
    }
    # the JSON twin of the table's "!": every control metric whose paired bound exceeds max_harm, and where
    report["beyond_harm_bound"] = {name: splits for name in _CONTROL_OF if (splits := harmed(report, name))}
    if wrapped.preset.gate is not None:
        report["gate"] = gate_summary(gate_rows)
    warnings += [w for w in (chance_warning(items, report["plain"]),) if w]
    if warnings:
        report["warnings"] = warnings
        for warning in warnings:
            logger.warning("eval: %s", warning)
    if truncated is not None:
        report["truncated_audio"] = truncated
    for key in BREAKDOWNS:  # TDR broken down by task, framing, label and perturbation, when the items say
        parts = breakdown(items, plain_verdicts, patched_verdicts, key)
        if parts is not None:
            report[f"by_{key}"] = parts
    families = report["paired"].get("harm_by_family")
    if families:  # each perturbation family (and the clean items) with its own paired harm bound (issue 28)
        parts = breakdown(items, plain_verdicts, patched_verdicts, family_of)
        for family, part in parts.items():
            uppers = [b["upper"] for b in families.get(family, {}).values() if b["upper"] is not None]
            part["harm_upper"] = max(uppers) if uppers else None
        report["by_perturbation_family"] = parts
    return report


def gate_summary(rows: Sequence[dict | None]) -> dict[str, Any]:
    """How often and how much the audio-confidence gate weakened the mitigation over an evaluation."""
    out: dict[str, Any] = {}
    for key in ("patch", "contrastive_first_step"):
        values = [r[key] for r in rows if r is not None and r[key] is not None]
        if values:
            out[key] = {"mean": round(sum(values) / len(values), 4),
                        "weakened": round(sum(v < 1.0 for v in values) / len(values), 4),
                        "closed": round(sum(v == 0.0 for v in values) / len(values), 4), "n": len(values)}
    return out


#: control metric -> the item kind whose paired harm bound it shows
_CONTROL_OF = {"consistent_acc": "consistent", "audio_only_acc": "audio_only"}


def harmed(report: dict[str, Any], metric: str) -> list[str]:
    """The splits where ``metric`` (a control accuracy) loses more than the report's ``max_harm`` at the paired
    upper bound; empty when it holds (or the report has no paired block)."""
    kind = _CONTROL_OF.get(metric)
    paired, limit = report.get("paired"), report.get("max_harm", 0.02)
    if kind is None or not paired:
        return []
    return [split for split, kinds in paired["harm"].items()
            if kind in kinds and kinds[kind]["upper"] is not None and kinds[kind]["upper"] > limit + 1e-9]


def format_table(report: dict[str, Any]) -> str:
    """The two metric columns side by side, with intervals and counts, for the terminal; ``!`` marks a control
    metric whose paired harm bound exceeds the no-harm limit."""
    lines = [f"WARNING: {warning}" for warning in report.get("warnings", [])]
    label = second_column_label(report)
    width = max(24, len(label) + 2)
    lines.append(f"{'metric':<16}{'plain':>24}{label:>{width}}")
    marked = []
    for name in METRICS:
        cells = []
        for column in ("plain", "backpatched"):
            value, ci = report[column][name], report[column]["ci95"][name]
            cells.append("n/a" if value is None else f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]")
        splits = harmed(report, name)
        if splits:
            marked.append(f"{name} ({', '.join(splits)})")
        flag = " !" if splits else ""
        lines.append(f"{name:<16}{cells[0]:>24}{cells[1]:>{width}}{flag}")
    p = report["plain"]
    lines.append(f"items: {p['n_conflict']} conflict, {p['n_consistent']} consistent, {p['n_audio_only']} audio-only")
    if marked:
        limit = report.get("max_harm", 0.02)
        lines.append(f"! harm: the paired 95% upper bound on the accuracy loss exceeds {limit:g} "
                     f"for {'; '.join(marked)}: this preset costs accuracy here; recalibrate (backpatch calibrate) "
                     "or add a gate")
    paired = report.get("paired")
    if paired and paired.get("tdr_reduction") is not None:
        lines.append(f"TDR reduction {paired['tdr_reduction']:+.3f} (paired bootstrap 95% lower bound "
                     f"{paired['tdr_reduction_lower']:+.3f}); worst harm bound {paired['harm_upper']}")
    gate = report.get("gate")
    if gate and gate.get("patch"):
        lines.append(f"gate: patch strength mean {gate['patch']['mean']:.3f}, weakened on "
                     f"{100 * gate['patch']['weakened']:.1f}% of items, closed on {100 * gate['patch']['closed']:.1f}%")
    if truncation_line(report.get("truncated_audio")):
        lines.append(truncation_line(report["truncated_audio"]))
    for key in BREAKDOWNS:
        if f"by_{key}" in report:
            lines += ["", *_breakdown_table(report[f"by_{key}"], key)]
    if "by_perturbation_family" in report:
        limit = report.get("max_harm", 0.02)
        lines += ["", *_breakdown_table(report["by_perturbation_family"], "perturbation family", limit)]
    return "\n".join(lines)


def second_column_label(report: dict[str, Any]) -> str:
    """The table's name for the report's second column (JSON key ``backpatched``): what ran there, e.g.
    ``contrastive a=2 + gate`` or ``back-patched 20->18 + instruction``. A preset without patches is not
    "back-patched"; a report without a readable preset says "with preset"."""
    settings = report.get("settings") or {}
    if settings.get("mitigation") == "none":
        label = "no preset"
    else:
        try:
            label = methods_label(Preset.from_dict(report["preset"]))
        except (KeyError, TypeError, PresetError):
            label = "with preset"
    return f"{label} + instruction" if settings.get("instruction") else label


def _cell(m: dict[str, Any], name: str) -> str:
    value, ci = m[name], m["ci95"][name]
    return "n/a" if value is None else f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _breakdown_table(parts: dict[str, dict[str, Any]], key: str, limit: float | None = None) -> list[str]:
    """One row per value; with ``limit``, ``!`` marks a row whose paired harm bound (``harm_upper``) exceeds it."""
    width = max(len(key), *(len(v) for v in list(parts)[:TABLE_ROWS])) + 2
    # the second column is named over the main table; here it is "mitigated", whatever its methods
    lines = [f"{key:<{width}}{'conflicts':>10}{'TDR plain':>24}{'TDR mitigated':>24}{'AFR plain':>11}"
             f"{'AFR mitigated':>15}{'audio-only':>16}{'consistent':>16}"]
    for value, m in list(parts.items())[:TABLE_ROWS]:
        p, b = m["plain"], m["backpatched"]
        short = {name: ["n/a" if x[name] is None else f"{x[name]:.3f}" for x in (p, b)]
                 for name in ("afr", "audio_only_acc", "consistent_acc")}
        controls = "".join(f"{short[n][0] + ' > ' + short[n][1]:>16}" for n in ("audio_only_acc", "consistent_acc"))
        upper = m.get("harm_upper")
        flag = f"  ! harm bound {upper:.3f}" if limit is not None and upper is not None and upper > limit + 1e-9 \
            else ""
        lines.append(f"{value:<{width}}{p['n_conflict']:>10}{_cell(p, 'tdr'):>24}{_cell(b, 'tdr'):>24}"
                     f"{short['afr'][0]:>11}{short['afr'][1]:>15}{controls}{flag}")
    if len(parts) > TABLE_ROWS:
        lines.append(f"... {len(parts) - TABLE_ROWS} more {key}s in the JSON report (by_{key.replace(' ', '_')})")
    if limit is not None and any((m.get("harm_upper") or 0) > limit + 1e-9 for m in parts.values()):
        lines.append(f"! a family's paired 95% upper bound on a control accuracy loss exceeds {limit:g}: the preset "
                     "harms that kind of speech")
    return lines
