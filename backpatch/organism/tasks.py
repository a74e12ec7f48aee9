"""The tasks of ``smol-audio``: what it is asked, in which framings, and the answers it may give.

Why data, not code: users and tests build conflict sets from the same vocabulary the organism was trained on, and
the demo says what the model can answer; all of them read ``smol-audio/tasks.json`` through :func:`load_tasks`.
Every task has its own answer vocabulary (the claim pool of its conflict items) and one or more claim framings in
the spirit of ALME: a claim stated in the user turn and a leading question. The ``digit`` task keeps the exact
DESIGN 4b prompts, so the digit conflict sets of the other organisms apply unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from backpatch.conflict_sets import Framing, PromptTemplates

TASKS_FILE = Path(__file__).resolve().parent / "smol-audio" / "tasks.json"


@dataclass(frozen=True)
class Task:
    """One question the organism answers: its vocabulary, the claim framings, and the words held out of training."""

    name: str
    question: str
    #: ``speech`` (espeak-ng clips) or ``sound`` (sox-made non-speech clips)
    kind: str
    framings: tuple[Framing, ...]
    labels: tuple[str, ...]
    #: labels never heard in training (the ``word`` task's held-out group); reported apart
    held_out_labels: tuple[str, ...] = ()

    @property
    def trained_labels(self) -> tuple[str, ...]:
        return tuple(label for label in self.labels if label not in self.held_out_labels)

    @property
    def user_framings(self) -> tuple[Framing, ...]:
        """The framings whose claim is in the user turn: the ones training uses (system-turn claims are for
        evaluation only, so they measure whether text dominance carries over to a turn never trained on)."""
        return tuple(f for f in self.framings if f.role == "user")

    @property
    def templates(self) -> PromptTemplates:
        """The conflict-set templates (``backpatch.conflict_sets``) of this task."""
        return PromptTemplates(self.question, self.framings)


@cache
def load_tasks(path: Path = TASKS_FILE) -> dict[str, Task]:
    """The tasks by name, in the file's order."""
    data = json.loads(Path(path).read_text())
    tasks = {}
    for name, spec in data["tasks"].items():
        tasks[name] = Task(name, spec["question"], spec["kind"],
                           tuple(_framing(f, t) for f, t in spec["framings"].items()), tuple(spec["labels"]),
                           tuple(spec.get("held_out_labels", ())))
    return tasks


def _framing(name: str, spec: str | dict) -> Framing:
    """A framing is a user-turn template, or ``{"template": ..., "role": "system"}``."""
    if isinstance(spec, str):
        return Framing(name, spec)
    return Framing(name, spec["template"], spec.get("role", "user"))
