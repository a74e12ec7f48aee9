"""The model organism: its corpus is deterministic and split by voice; the shipped checkpoint loads offline."""

from __future__ import annotations

import hashlib

import pytest
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

import backpatch
from backpatch.organism import corpus


def _digest(directory):
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != "corpus.json":  # corpus.json records the synthesis time
            h.update(str(path.relative_to(directory)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_corpus_is_deterministic_and_split_by_voice(tmp_path):
    """Needs espeak-ng and sox (installed by .ci/run)."""
    info = corpus.build(tmp_path / "a", seed=3, train_per_word=2, eval_per_word=1, copies=2, workers=2)
    corpus.build(tmp_path / "b", seed=3, train_per_word=2, eval_per_word=1, copies=2, workers=2)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert info["counts"]["train"]["wavs"] == 10 * 2 * 2 and info["counts"]["test"]["wavs"] == 10
    voices = {split: {row["variant"] for row in corpus.load_manifest(tmp_path / "a", split)}
              for split in ("train", "validation", "test")}
    assert voices["train"] and voices["validation"] and voices["test"]
    assert not voices["train"] & voices["test"] and not voices["train"] & voices["validation"]
    assert not voices["validation"] & voices["test"]
    import soundfile as sf

    row = corpus.load_manifest(tmp_path / "a", "test")[0]
    data, rate = sf.read(tmp_path / "a" / "test" / row["path"])
    assert rate == 16000 and data.ndim == 1 and 0.1 < len(data) / rate < 2.0
    corpus.build(tmp_path / "c", seed=4, train_per_word=2, eval_per_word=1, copies=2, workers=2)
    assert _digest(tmp_path / "c") != _digest(tmp_path / "a")


def test_shipped_checkpoint_loads_like_a_hub_checkpoint():
    directory = backpatch.organism.path("digits")
    size = sum(p.stat().st_size for p in directory.iterdir())
    assert size <= 10 * 1024 * 1024
    assert (directory / "model.safetensors").is_file()
    processor = AutoProcessor.from_pretrained(directory)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(directory)
    assert model.config.text_config.num_hidden_layers == 12
    assert processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>") == model.config.audio_token_index
    assert backpatch.wrap(model, "organism-digits", processor=processor).resolved.num_layers == 12
    # its preset is found from the config, so a copy of the folder anywhere still gets it
    assert backpatch.wrap(model, processor=processor).preset.name == "organism-digits"


def test_a_copied_organism_still_finds_its_preset(tmp_path):
    import shutil

    copy = tmp_path / "my-copy"
    shutil.copytree(backpatch.organism.path("digits"), copy)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(copy)
    processor = AutoProcessor.from_pretrained(copy)
    assert backpatch.wrap(model, processor=processor).preset.name == "organism-digits"


def test_organism_names_and_import():
    assert backpatch.organism.NAMES == ("smol-whisper", "digits") and backpatch.organism.DEFAULT == "smol-whisper"
    import subprocess
    import sys

    code = "import backpatch; print(backpatch.organism.path('digits').name, backpatch.organism.DEFAULT)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["digits", "smol-whisper"]
    import pytest

    with pytest.raises(ValueError, match="unknown organism 'digit'; organisms: smol-whisper, digits"):
        backpatch.organism.path("digit")


def test_conflicts_build_with_empty_examples_skips_them(monkeypatch, tmp_path):
    """`--examples ''` means: no examples. It once became Path('') == '.', and build() replaced the working
    directory with the examples."""
    from backpatch.organism import conflicts

    seen = {}
    monkeypatch.setattr(conflicts, "build", lambda corpus, out, seed, n, examples: seen.setdefault("examples", examples)
                        or {})
    monkeypatch.chdir(tmp_path)
    conflicts.main(["build", "--corpus", str(tmp_path), "--out", str(tmp_path / "out"), "--examples", ""])
    assert seen["examples"] is None


def test_conflicts_build_refuses_to_replace_a_folder_that_is_not_examples(tmp_path):
    from backpatch.organism import conflicts

    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files"):
        conflicts._check_replaceable(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"
    examples = tmp_path / "examples"
    (examples / "wav").mkdir(parents=True)
    (examples / "examples.jsonl").write_text("")
    conflicts._check_replaceable(examples)  # an examples folder may be replaced
