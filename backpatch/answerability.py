"""Can this model answer these labels at all? Checks that keep eval and calibrate from reporting noise as results.

Why: text dominance is only measurable where the model hears the audio. A label the tokenizer cannot even write
(it becomes ``<unk>``) is never produced; a model whose audio-only accuracy is at chance level does not hear the
labels. On such data TDR, "harm" and every calibration choice are noise, yet the numbers look like results
(issue 21: colour words on the digits organism gave ``TDR None -> None`` and a preset marked calibrated). Two
checks, one before any model work and one on the plain answers:

- :func:`unwritable_labels`: labels whose tokens include the tokenizer's unknown token (or no token at all);
- :func:`chance_warning`: plain audio-only accuracy whose 95% Wilson upper bound is below
  ``min(2 * chance, chance + 0.1)``, chance being one over the number of distinct labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .items import ConflictItem, ConflictSetError
from .paired import wilson

__all__ = ["UnanswerableError", "chance_warning", "check_labels", "labels_of", "unwritable_labels"]

#: how many labels a message names
NAMED = 8


class UnanswerableError(ConflictSetError):
    """The model cannot answer this conflict set (its labels, or its hearing of them)."""


def labels_of(items: Sequence[ConflictItem]) -> list[str]:
    """Every answer the set expects: audio answers and the claims of conflict items, in first-seen order."""
    seen = dict.fromkeys(it.audio_answer for it in items)
    seen.update(dict.fromkeys(it.text_answer for it in items if it.text_answer))
    return list(seen)


def unwritable_labels(labels: Sequence[str], processor: Any) -> list[str]:
    """Labels the model's tokenizer turns into its unknown token (or into nothing): the model can never say them."""
    tokenizer = getattr(processor, "tokenizer", processor)
    unk = getattr(tokenizer, "unk_token_id", None)
    bad = []
    for label in labels:
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (label, " " + label)]
        if any(not seq or (unk is not None and unk in seq) for seq in ids):
            bad.append(label)
    return bad


def _named(labels: Sequence[str]) -> str:
    more = f" and {len(labels) - NAMED} more" if len(labels) > NAMED else ""
    return ", ".join(repr(label) for label in labels[:NAMED]) + more


def check_labels(items: Sequence[ConflictItem], processor: Any) -> str | None:
    """Before any model work: refuse a set none of whose labels the model can write; a warning (returned) when
    some cannot be written; ``None`` when all can."""
    labels = labels_of(items)
    bad = unwritable_labels(labels, processor)
    if bad and len(bad) == len(labels):
        raise UnanswerableError(
            f"this model cannot answer this conflict set: its tokenizer cannot write any of its labels ({_named(bad)} "
            "become the unknown token), so every answer would be 'other'; use a model that knows these words, or a "
            "conflict set with labels it can say")
    if bad:
        return (f"{len(bad)} of {len(labels)} labels cannot be written by this model's tokenizer ({_named(bad)}): "
                "items that expect them can never be answered right; drop them from the conflict set")
    return None


def chance_warning(items: Sequence[ConflictItem], plain: dict[str, Any]) -> str | None:
    """A warning when the plain model's audio-only accuracy is at chance level (it does not hear the labels)."""
    n, acc = plain.get("n_audio_only") or 0, plain.get("audio_only_acc")
    audio_answers = {it.audio_answer for it in items}
    if not n or acc is None or len(audio_answers) < 2:
        return None
    chance = 1.0 / len(audio_answers)
    upper = wilson(round(acc * n), n)[1]
    if upper >= min(2 * chance, chance + 0.1):
        return None
    return (f"the plain model's audio-only accuracy is {acc:.3f} (95% upper bound {upper:.3f}), about chance level "
            f"for {len(audio_answers)} labels ({chance:.3f}): it does not hear these labels, so TDR and harm measured "
            "here are noise; use data this model can hear (check its audio-only accuracy first), or another model")
