"""Issue 27 point 3: `backpatch eval --engine vllm` and `backpatch run --engine vllm` answer the same items as the
transformers engine with the same preset, so a user checks a preset on the engine they deploy. (Each command runs in
a process of its own, as a user runs it; this module runs before the others start an engine in this process.)"""

from __future__ import annotations

import json
import subprocess
import sys

import backpatch
from backpatch import Patch, Preset

LIMIT = "8"


def backpatch_cli(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "backpatch", *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_eval_answers_every_item_as_the_transformers_engine_does(tmp_path):
    preset = tmp_path / "late.yaml"
    # a strong patch (it changes 4 of these 8 answers on the transformers engine): the equality covers changed answers
    Preset(name="late", patches=[Patch(source=24, target=6, mode="add", positions="audio+last")]).to_yaml(preset)
    reports = {}
    for engine in ("transformers", "vllm"):
        out = tmp_path / f"{engine}.json"
        backpatch_cli("eval", "--preset", str(preset), "--limit", LIMIT, "--dtype", "float32", "--max-new-tokens",
                      "6", "--engine", engine, "--out", str(out))
        reports[engine] = json.loads(out.read_text())
    hf, vl = ([(i["plain"], i["backpatched"]) for i in reports[e]["items"]] for e in ("transformers", "vllm"))
    assert len(hf) == int(LIMIT) and vl == hf
    assert reports["vllm"]["backpatched"] == reports["transformers"]["backpatched"]
    assert any(plain != patched for plain, patched in hf)  # the preset changes some answer: the equality says much


def test_run_prints_both_answers_and_a_preset_vllm_cannot_run_is_refused_before_the_engine_starts(tmp_path):
    clip = backpatch.organism.examples_path().parent / "wav" / "te-zero-f3-0018-0.wav"
    preset = tmp_path / "late.yaml"
    Preset(name="late", patches=[Patch(source=20, target=18, positions="audio")]).to_yaml(preset)
    out = backpatch_cli("run", "--audio", str(clip), "--prompt", 'The speaker says "two". Which digit is spoken?',
                        "--preset", str(preset), "--engine", "vllm", "--max-new-tokens", "6").stdout
    assert "preset:       late" in out and "plain:" in out
    refused = subprocess.run([sys.executable, "-m", "backpatch", "run", "--audio", str(clip), "--prompt", "Which?",
                              "--engine", "vllm"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    # (the bundled default guards its patch by the answers with and without the audio, which vLLM does not compute)
    assert ("preset 'smol-whisper' sets patches[0].agreement, the patch's agreement guard, which backpatch cannot run "
            "inside vLLM") in refused.stderr
