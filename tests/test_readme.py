"""The README's Python blocks that claim to run (marked ``<!-- runs in tests/test_readme.py -->``) run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARK = "<!-- runs in tests/test_readme.py -->"
BLOCKS = re.findall(re.escape(MARK) + r"\s*```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_the_readme_marks_its_runnable_blocks():
    assert BLOCKS, f"no block in README.md is marked {MARK!r}"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs_as_written(index, capsys):
    scope: dict = {"__name__": "__readme__"}
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), scope)
    if "print(" in BLOCKS[index]:
        assert capsys.readouterr().out.strip()


def test_quickstart_answers_are_what_the_text_says(capsys):
    """The Quickstart's clip says "seven"; the plain model follows the misleading prompt or the audio, and the
    answer with the preset is a digit word (the README claims no more than that). The print labels that answer with
    what the default preset does (its methods label), not a fixed word (issue 25)."""
    scope: dict = {"__name__": "__readme__"}
    exec(compile(BLOCKS[0], "README.md quickstart", "exec"), scope)
    n = scope["n"]
    plain = scope["decode_new_tokens"](scope["processor"], scope["base"], n)[0]
    patched = scope["decode_new_tokens"](scope["processor"], scope["out"], n)[0]
    assert plain in ("seven", "three") and patched in scope["backpatch"].organism.DIGITS
    assert scope["backpatch"].backpatch_hook_count(scope["model"]) == 0
    printed = capsys.readouterr().out
    assert f"{scope['backpatch'].methods_label(scope['backpatch'].load_preset('smol-whisper'))}:" in printed


def test_no_runnable_block_labels_an_answer_back_patched():
    """The README's snippets label the second answer with what the preset does, never a fixed "back-patched:"."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    printed = [line for block in blocks for line in block.splitlines() if "print(" in line]
    assert printed and not [line for line in printed if re.search(r"back-?patched:", line)]
