"""Conflict sets (DESIGN section 4) from labelled audio: the one generator behind ``backpatch conflicts`` and
the organisms' own sets.

Why: calibration only helps on the user's own model and task, and ALME (arXiv 2602.11488) builds its
stimuli exactly like this: audio with a known answer, a text that contradicts it under several framings,
and matched consistent and audio-only controls. :func:`build_conflict_set` reads a manifest or a
``LABEL/clip`` folder (``backpatch.labelled_audio``), checks everything, and writes the JSONL;
:func:`make_conflict_items` is the generator itself, also used by ``backpatch.organism.conflicts``.

Per clip (label ``L``), for every framing: ``conflicts_per_clip`` conflict items whose claims are other
labels, drawn without replacement by a generator seeded with ``(seed, clip id)``, then one consistent item
(claim ``L``) for a ``consistent_share`` of the clips; after all framings, one audio-only item (the question
alone) for an ``audio_only_share`` of the clips. The claims of a clip are the same in every framing, so
framings are compared on matched items. Prompts are ``<claim template with the claim> <question>
[<choices>]``; a claim template holding ``{question}`` places the question itself.

Items carry the DESIGN keys, then ``choices`` (multiple choice, shuffled per item), and, unless
``annotate=False``: ``label`` (the clip's label), ``framing`` (the framing's name, on claim items of a named
framing) and ``group`` (when grouped). ``audio`` is relative to the output file; audio is not copied.
"""

from __future__ import annotations

import json
import logging
import os
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .labelled_audio import Clip, ConflictSourceError, check_audio, read_labelled_audio

__all__ = [
    "DEFAULT_CHOICES_TEMPLATE",
    "DEFAULT_FRAMINGS",
    "ConflictSourceError",
    "Framing",
    "PromptTemplates",
    "build_conflict_set",
    "make_conflict_items",
    "parse_split",
    "split_clips",
]

logger = logging.getLogger(__name__)

#: ALME-style framings used when no ``--claim`` is given: the claim as a transcript, a caption, a belief
DEFAULT_FRAMINGS = (
    'transcript=Transcript of the audio: "{claim}".',
    "caption=Audio caption: {claim}.",
    "belief=I am quite sure the answer is {claim}.",
)
DEFAULT_CHOICES_TEMPLATE = "Choose one of: {choices}."
_NAME = re.compile(r"^([A-Za-z][\w-]*)=(.*)$", re.DOTALL)


def _placeholders(template: str, what: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ConflictSourceError(f"{what} {template!r} is not a valid template ({exc}); write literal braces as "
                                  f"{{{{ and }}}}") from None


@dataclass(frozen=True)
class Framing:
    """One way of stating a claim: ``template`` holds ``{claim}`` (and optionally ``{question}``).

    ``role``: ``user`` puts the claim in the user turn, before the question; ``system`` states it in a system turn
    (ALME's system-prompt framing), the user turn holding the question alone (the item's ``system`` field)."""

    name: str | None
    template: str
    role: str = "user"

    def prompt(self, claim: str, question: str) -> str:
        """The user turn's text."""
        if self.role == "system":
            return question
        if "{question}" in self.template:
            return self.template.format(claim=claim, question=question)
        return f"{self.template.format(claim=claim)} {question}"

    def system(self, claim: str) -> str | None:
        """The system turn's text, or ``None`` for a user-turn claim."""
        return self.template.format(claim=claim) if self.role == "system" else None


@dataclass(frozen=True)
class PromptTemplates:
    """The question, the claim framings and the multiple-choice suffix; validated on construction."""

    question: str
    framings: tuple[Framing, ...]
    choices: str = DEFAULT_CHOICES_TEMPLATE

    def __post_init__(self) -> None:
        if not self.question.strip():
            raise ConflictSourceError("the question is empty; pass --question 'Which digit is spoken?'")
        if _placeholders(self.question, "the question"):
            raise ConflictSourceError(f"the question {self.question!r} must not hold placeholders; the claim goes "
                                      f"in --claim")
        if not self.framings:
            raise ConflictSourceError("at least one claim template is needed")
        for framing in self.framings:
            names = _placeholders(framing.template, "the claim template")
            if "claim" not in names:
                raise ConflictSourceError(f"the claim template {framing.template!r} has no {{claim}}; write e.g. "
                                          f"'The speaker says \"{{claim}}\".'")
            if framing.role not in ("user", "system"):
                raise ConflictSourceError(f"framing {framing.name!r} has role {framing.role!r}; use 'user' or 'system'")
            if framing.role == "system" and "question" in names:
                raise ConflictSourceError(f"the system-turn claim template {framing.template!r} cannot hold "
                                          f"{{question}}: the question stays in the user turn")
            if names - {"claim", "question"}:
                raise ConflictSourceError(f"the claim template {framing.template!r} has unknown placeholder(s) "
                                          f"{', '.join(sorted(names - {'claim', 'question'}))}; use {{claim}} and "
                                          f"optionally {{question}}")
        names = [f.name for f in self.framings]
        if len(self.framings) > 1 and None in names:
            raise ConflictSourceError("name every framing when there are several, e.g. --claim "
                                      "'transcript=The speaker says \"{claim}\".'")
        if len(set(names)) != len(names):
            raise ConflictSourceError(f"framing names must be unique; got {', '.join(map(str, names))}")
        if _placeholders(self.choices, "the choices template") != {"choices"}:
            raise ConflictSourceError(f"the choices template {self.choices!r} needs exactly the placeholder "
                                      f"{{choices}}")

    @classmethod
    def parse(cls, question: str, claims: Sequence[str] | None = None,
              choices: str = DEFAULT_CHOICES_TEMPLATE, system_claims: Sequence[str] | None = None,
              ) -> PromptTemplates:
        """From CLI-style strings: each claim is ``TEMPLATE`` or ``NAME=TEMPLATE`` (default, when neither
        ``claims`` nor ``system_claims`` is given: the ALME-style :data:`DEFAULT_FRAMINGS`); ``system_claims`` are
        stated in a system turn (:class:`Framing` ``role="system"``)."""
        user = claims or ([] if system_claims else DEFAULT_FRAMINGS)
        framings = [_parsed_framing(text, "user") for text in user]
        framings += [_parsed_framing(text, "system") for text in system_claims or ()]
        return cls(question, tuple(framings), choices)


def _parsed_framing(text: str, role: str) -> Framing:
    match = _NAME.match(text)
    if match and "{claim}" in match.group(2):
        return Framing(match.group(1), match.group(2), role)
    return Framing(None, text, role)


def _chosen(clips: Sequence[Clip], share: float, seed: int, salt: int) -> set[str]:
    """Ids of round(share * n) clips, a seeded choice (all of them for share 1)."""
    if share >= 1:
        return {clip.id for clip in clips}
    k = round(share * len(clips))
    order = np.random.default_rng([seed, salt]).permutation(len(clips))
    return {clips[i].id for i in order[:k]}


def _audio_field(clip: Clip, relative_to: Path | None) -> str:
    if relative_to is None:
        return Path(clip.path).as_posix()
    try:
        return Path(os.path.relpath(clip.path, relative_to)).as_posix()
    except ValueError:  # another drive (Windows): an absolute path still resolves from any JSONL file
        return Path(clip.path).as_posix()


def _check_options(clips: Sequence[Clip], labels: Sequence[str] | None, conflicts_per_clip: int,
                   consistent_share: float, audio_only_share: float, choices: int | None) -> tuple[str, ...]:
    """The claim pool (``labels``, default: the clips' labels sorted), after checking every count and share."""
    labels = tuple(dict.fromkeys(labels)) if labels is not None else tuple(sorted({clip.label for clip in clips}))
    if len(labels) < 2:
        raise ConflictSourceError(f"a conflict set needs at least two labels; found {len(labels)} "
                                  f"({', '.join(labels) or 'none'})")
    unknown = sorted({clip.label for clip in clips} - set(labels))
    if unknown:
        raise ConflictSourceError(f"{len(unknown)} label(s) of the clips are not in the label list: "
                                  f"{', '.join(map(repr, unknown[:5]))}")
    if conflicts_per_clip < 1:
        raise ConflictSourceError(f"conflicts per clip must be at least 1, got {conflicts_per_clip}")
    for name, share in (("consistent", consistent_share), ("audio-only", audio_only_share)):
        if not 0 <= share <= 1:
            raise ConflictSourceError(f"the {name} share must be between 0 and 1, got {share}")
    if choices is not None and not 2 <= choices <= len(labels):
        raise ConflictSourceError(f"choices must be between 2 and the number of labels ({len(labels)}), got "
                                  f"{choices}")
    return labels


def make_conflict_items(
    clips: Sequence[Clip],
    templates: PromptTemplates,
    labels: Sequence[str] | None = None,
    conflicts_per_clip: int = 3,
    consistent_share: float = 1.0,
    audio_only_share: float = 1.0,
    choices: int | None = None,
    seed: int = 0,
    relative_to: str | Path | None = None,
    annotate: bool = True,
) -> list[dict[str, Any]]:
    """Conflict-set items (DESIGN section 4 dicts) for ``clips``; see the module docstring for the layout.

    ``labels`` is the claim pool in its order (default: the clips' labels, sorted); the claims of a clip are
    a seeded function of ``(seed, clip id, labels)`` only. ``choices``: the number of options per item
    (answer, claim and other labels, shuffled per item), or ``None`` for open questions. ``relative_to``: the
    folder the JSONL will live in (``audio`` is written relative to it; ``None`` writes ``clip.path`` as is).
    """
    labels = _check_options(clips, labels, conflicts_per_clip, consistent_share, audio_only_share, choices)
    relative_to = Path(os.path.abspath(relative_to)) if relative_to is not None else None
    with_consistent = _chosen(clips, consistent_share, seed, 1)
    with_audio_only = _chosen(clips, audio_only_share, seed, 2)
    several = len(templates.framings) > 1
    items: list[dict[str, Any]] = []

    def add(item_id: str, clip: Clip, audio: str, claim: str | None, kind: str, framing: Framing | None) -> None:
        prompt = templates.question if framing is None else framing.prompt(claim, templates.question)
        item: dict[str, Any] = {"id": item_id, "audio": audio, "prompt": prompt, "audio_answer": clip.label,
                                "text_answer": claim, "kind": kind}
        system = None if framing is None else framing.system(claim)
        if system is not None:
            item["system"] = system
        if choices is not None:
            rng = np.random.default_rng([seed, 3, *item_id.encode()])
            required = list(dict.fromkeys(x for x in (clip.label, claim) if x is not None))
            rest = [label for label in labels if label not in required]
            picked = required + [rest[i] for i in rng.choice(len(rest), size=choices - len(required), replace=False)]
            item["choices"] = [picked[i] for i in rng.permutation(len(picked))]
            item["prompt"] = f"{prompt} {templates.choices.format(choices=', '.join(item['choices']))}"
        if annotate:
            item["label"] = clip.label
            if framing is not None and framing.name is not None:
                item["framing"] = framing.name
            if clip.group is not None:
                item["group"] = clip.group
        items.append(item)

    for clip in clips:
        rng = np.random.default_rng([seed, *clip.id.encode()])
        wrong = [label for label in labels if label != clip.label]
        claims = [wrong[i] for i in rng.choice(len(wrong), size=min(conflicts_per_clip, len(wrong)), replace=False)]
        audio = _audio_field(clip, relative_to)
        for framing in templates.framings:
            prefix = f"{clip.id}-{framing.name}" if several else clip.id
            for k, claim in enumerate(claims):
                add(f"{prefix}-c{k}", clip, audio, claim, "conflict", framing)
            if clip.id in with_consistent:
                add(f"{prefix}-s", clip, audio, clip.label, "consistent", framing)
        if clip.id in with_audio_only:
            add(f"{clip.id}-a", clip, audio, None, "audio_only", None)
    repeated = [name for name, n in Counter(item["id"] for item in items).items() if n > 1]
    if repeated:
        raise ConflictSourceError(f"item ids collide ({', '.join(repeated[:5])}); rename the clips or framings")
    return items


def parse_split(text: str) -> dict[str, float]:
    """``"validation=0.5,test=0.5"`` -> ``{"validation": 0.5, "test": 0.5}`` (positive shares summing to 1)."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        name, _, value = part.partition("=")
        try:
            share = float(value)
        except ValueError:
            share = float("nan")
        if not re.fullmatch(r"[A-Za-z0-9][\w-]*", name.strip()) or not share > 0 or name.strip() in out:
            raise ConflictSourceError(f"--split {text!r} is not NAME=SHARE,NAME=SHARE with distinct names and "
                                      f"positive shares, e.g. validation=0.5,test=0.5")
        out[name.strip()] = share
    if len(out) < 2 or abs(sum(out.values()) - 1) > 1e-6:
        raise ConflictSourceError(f"--split {text!r} needs at least two splits whose shares sum to 1")
    return out


def split_clips(clips: Sequence[Clip], shares: dict[str, float], seed: int = 0) -> dict[str, list[Clip]]:
    """Clips divided into splits by whole groups (``clip.group``, or each clip alone): no group is in two
    splits. Groups go in seeded order, first one to each split, then each to the split furthest below its
    share of clips. Every split keeps the clips' order."""
    keys = [clip.group if clip.group is not None else clip.id for clip in clips]
    size = Counter(keys)
    groups = sorted(size)
    if len(groups) < len(shares):
        what = "groups" if any(clip.group is not None for clip in clips) else "clips"
        raise ConflictSourceError(f"{len(shares)} splits need at least {len(shares)} {what}; found {len(groups)}")
    order = [groups[i] for i in np.random.default_rng([seed, 4]).permutation(len(groups))]
    names = sorted(shares, key=lambda name: -shares[name])
    count = dict.fromkeys(shares, 0)
    where: dict[str, str] = {}
    for i, group in enumerate(order):
        if i < len(names):
            name = names[i]
        else:
            name = max(names, key=lambda n: shares[n] * len(clips) - count[n])
        where[group] = name
        count[name] += size[group]
    return {name: [clip for clip, key in zip(clips, keys, strict=True) if where[key] == name] for name in shares}


def _outputs(out: Path, shares: dict[str, float] | None) -> dict[str | None, Path]:
    if shares is None:
        return {None: out}
    return {name: out.with_name(f"{out.stem}.{name}{out.suffix or '.jsonl'}") for name in shares}


def _write_all(sets: dict[Path, list[dict[str, Any]]]) -> None:
    """Write every file to a temporary name first, then rename them all: nothing is left half-written (and
    folders made here are removed again after a failure)."""
    created = sorted({folder for path in sets for folder in (path.parent, *path.parent.parents)
                      if not folder.exists()}, key=lambda folder: len(folder.parts), reverse=True)
    temporary: dict[Path, Path] = {}
    done = False
    try:
        for path, items in sets.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            temporary[path] = tmp
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(item) + "\n" for item in items)
        for path, tmp in temporary.items():
            os.replace(tmp, path)
        done = True
    finally:
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)
        if not done:
            for folder in created:  # deepest first
                try:
                    folder.rmdir()
                except OSError:
                    pass


def build_conflict_set(
    source: str | Path,
    out: str | Path,
    question: str,
    claims: Sequence[str] | None = None,
    *,
    system_claims: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    conflicts_per_clip: int = 3,
    consistent_share: float = 1.0,
    audio_only_share: float = 1.0,
    choices: int | str | None = None,
    choices_template: str = DEFAULT_CHOICES_TEMPLATE,
    split: str | dict[str, float] | None = None,
    group_by: str | None = None,
    filename_pattern: str | None = None,
    audio_column: str | None = None,
    label_column: str | None = None,
    id_column: str | None = None,
    audio_root: str | Path | None = None,
    seed: int = 0,
    annotate: bool = True,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Read labelled audio, check it, and write a conflict set (or one per split); returns a summary.

    ``out`` is the JSONL path; with ``split`` (``"validation=0.5,test=0.5"``) each split goes to
    ``<stem>.<split>.jsonl`` beside it, split by whole ``group_by`` groups (e.g. speakers). ``claims``: claim
    templates, ``[NAME=]TEMPLATE`` each (default: :data:`DEFAULT_FRAMINGS`); ``system_claims``: the same, stated in a
    system turn (the item's ``system`` field; the user turn asks the question alone). ``choices``: options per item
    (an int or ``"all"``). ``annotate=False`` leaves out the ``label``/``framing``/``group`` keys (the organism's
    shipped sets have only the DESIGN keys). Every check runs before anything is written, and files appear
    only complete. Raises :class:`ConflictSourceError` (one sentence) for every problem with the input or options.
    """
    templates = PromptTemplates.parse(question, claims, choices_template, system_claims)
    shares = parse_split(split) if isinstance(split, str) else split
    if shares is not None:
        parse_split(",".join(f"{k}={v}" for k, v in shares.items()))  # same checks for a dict
    out = Path(out)
    if out.is_dir():
        raise ConflictSourceError(f"--out {out} is a folder; give the JSONL file to write, e.g. {out}/conflicts.jsonl")
    outputs = _outputs(out, shares)
    existing = [str(path) for path in outputs.values() if path.exists()]
    if existing and not force:
        raise ConflictSourceError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; pass "
                                  f"--force to overwrite")
    clips = read_labelled_audio(source, audio_column, label_column, id_column, audio_root, filename_pattern,
                                group_by)
    if labels is None:
        labels = sorted({clip.label for clip in clips})
    n_choices = None
    if choices is not None:
        if str(choices) == "all":
            n_choices = len(labels)
        else:
            try:
                n_choices = int(choices)
            except ValueError:
                raise ConflictSourceError(f"--choices must be a number or 'all', got {choices!r}") from None
    _check_options(clips, labels, conflicts_per_clip, consistent_share, audio_only_share, n_choices)
    check_audio(clips, progress)
    parts = {None: clips} if shares is None else split_clips(clips, shares, seed)
    sets: dict[Path, list[dict[str, Any]]] = {}
    summary: dict[str, Any] = {"source": str(source), "labels": list(labels), "n_clips": len(clips),
                               "framings": [f.name for f in templates.framings], "outputs": {}}
    for name, part in parts.items():
        items = make_conflict_items(part, templates, labels, conflicts_per_clip, consistent_share,
                                    audio_only_share, n_choices, seed, out.parent, annotate)
        sets[outputs[name]] = items
        kinds = Counter(item["kind"] for item in items)
        summary["outputs"][name or "all"] = {
            "path": str(outputs[name]), "clips": len(part), "items": len(items),
            "groups": len({clip.group for clip in part}) if group_by is not None else None,
            "labels": len({clip.label for clip in part}), **{kind: kinds[kind] for kind in
                                                             ("conflict", "consistent", "audio_only")}}
        missing = sorted(set(labels) - {clip.label for clip in part})
        if missing and name is not None:
            logger.warning("split %s has no clip of %d label(s): %s", name, len(missing), ", ".join(missing[:10]))
    _write_all(sets)
    for row in summary["outputs"].values():
        logger.info("wrote %s: %d items from %d clips", row["path"], row["items"], row["clips"])
    return summary
