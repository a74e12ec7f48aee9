"""The README's vLLM snippet (marked ``<!-- runs in tests_vllm/test_vllm_readme.py -->``) runs as written, and its
plain answer is what vLLM answers without the plugin's patch (the plain engine)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
MARK = "<!-- runs in tests_vllm/test_vllm_readme.py -->"
BLOCKS = re.findall(re.escape(MARK) + r"\s*```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_the_offline_snippet_runs_as_written():
    """In a process of its own, as a user runs it (vLLM sizes its KV cache from the memory its process finds)."""
    assert len(BLOCKS) == 1, f"README.md marks {len(BLOCKS)} blocks {MARK!r}"
    done = subprocess.run([sys.executable, "-c", BLOCKS[0]], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if " -> " in line and "INFO" not in line]  # vLLM logs too
    assert [line.split(" -> ")[0] for line in lines] == ["plain", "late-to-early"]
    assert all(line.split(" -> ")[1].strip() for line in lines)  # both engines answered something
