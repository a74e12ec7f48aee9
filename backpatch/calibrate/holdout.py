"""Does the no-harm rule predict harm on speech it has not seen? Leave one perturbation family out: choose with the
rule on the other families (and the clean items) only, then measure the chosen setting on the family left out; for
every family. Also: of all settings that passed on the other families, how many harmed the one left out.

A rule that predicts well chooses settings that stay harmless on the held-out family; a high rate of settings that
pass elsewhere and harm the held-out family says the rule's checks do not carry over to unseen kinds of speech (the
smol-whisper preset's loss on other synthesizers is such a case).

The estimate uses the statistic the stage itself chose with (``StageRecord.bounded``): the paired upper bound on a
full-data stage, the point loss on a screening stage. Choosing with another statistic than the stage's would report
on a choice the calibration never makes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..evaluate import metrics
from ..paired import family_of, harm_by_group, paired_report
from .search import StageRecord, passes_no_harm, rank_key

__all__ = ["leave_one_family_out"]


def leave_one_family_out(record: StageRecord, max_harm: float) -> dict[str, Any] | None:
    """Per held-out family: the setting the rule chooses without it, that setting's harm on it (``harm_statistic``:
    the paired upper bound or the point loss, as the stage chose), and how many settings passing without it harm it.
    None when the record's items hold fewer than two perturbation families."""
    items, plain = list(record.items), record.plain.get("verdicts")
    families = [family_of(it) for it in items]
    held_out = [f for f in dict.fromkeys(families) if f != "clean"]
    rows = [(c, m) for c, m in record.results if m.get("verdicts") is not None]  # reused rows carry no verdicts
    if plain is None or len(held_out) < 2 or not rows:
        return None
    statistic = "upper" if record.bounded else "loss"
    out: dict[str, Any] = {}
    for family in held_out:
        keep = [i for i, f in enumerate(families) if f != family]
        held = [i for i, f in enumerate(families) if f == family]
        passing = []
        for candidate, m in rows:
            others = paired_report(_pick(items, keep), _pick(plain, keep), _pick(m["verdicts"], keep))
            if passes_no_harm({"paired": others}, record.plain, max_harm, bounded=record.bounded):
                score = {"paired": others, "tdr": metrics(_pick(items, keep), _pick(m["verdicts"], keep))["tdr"]}
                passing.append((rank_key(score), candidate, _worst(items, plain, m["verdicts"], held, statistic)))
        harmful = sum(upper is not None and upper > max_harm + 1e-9 for _, _, upper in passing)
        entry: dict[str, Any] = {"n_items": len(held), "passed_without_it": len(passing),
                                 "of_those_harmful_on_it": harmful, "chosen": None}
        if passing:
            _, chosen, upper = min(passing, key=lambda row: row[0])
            entry.update(chosen=chosen.label(), chosen_harm=upper,
                         chosen_harmed=upper is not None and upper > max_harm + 1e-9)
        out[family] = entry
    chosen = [e for e in out.values() if e["chosen"] is not None]
    passed = sum(e["passed_without_it"] for e in out.values())
    return {"families": out, "max_harm": max_harm, "harm_statistic": statistic,
            "chosen_harmed_held_out": sum(e["chosen_harmed"] for e in chosen), "n_families": len(out),
            "passing_harmful_rate": round(sum(e["of_those_harmful_on_it"] for e in out.values()) / passed, 4)
            if passed else None}


def _pick(values: Sequence[Any], rows: Sequence[int]) -> list[Any]:
    return [values[i] for i in rows]


def _worst(items: Sequence[Any], plain: Sequence[str], mitigated: Sequence[str], rows: Sequence[int],
           statistic: str) -> float | None:
    """The worst paired ``statistic`` (``upper`` bound or point ``loss``) of a control accuracy over ``rows`` (None:
    no control items there)."""
    bounds = harm_by_group(_pick(items, rows), _pick(plain, rows), _pick(mitigated, rows), lambda _: "held")
    uppers = [b[statistic] for kinds in bounds.values() for b in kinds.values() if b[statistic] is not None]
    return max(uppers) if uppers else None
