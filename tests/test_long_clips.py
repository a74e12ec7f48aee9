"""One rule for clips longer than the model's audio window, at every entry point: refused with one sentence naming
the length and the limit (before any model work), unless truncation is asked for; then every report records it.

The tiny checkpoint uses the organism's processor: one 2 s window (``chunk_length=2``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from tiny import tiny_checkpoint, tiny_conflict_set, tiny_with_processor

import backpatch
from backpatch import Patch, Preset
from backpatch.audio_io import AudioTooLongError, fit_to_window
from backpatch.cli import main
from backpatch.evaluate import check_clip_lengths, encode_items, evaluate, load_conflict_set
from backpatch.inputs import audio_truncation, audio_window_seconds, build_inputs
from backpatch.loading import load_model_and_processor

RATE = 16000
LONG_S = 6.0
LIMIT = "at most 2 s of audio"


def _tone(seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(round(seconds * RATE))) / RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _with_long_clip(directory, n_long_items: int = 3):
    """A tiny conflict set plus ``n_long_items`` items over one 6 s clip (ids long-0, long-1, ...)."""
    path = tiny_conflict_set(directory, 2)
    sf.write(str(directory / "wav" / "long.wav"), _tone(LONG_S), RATE)
    rows = [{"id": f"long-{k}", "audio": "wav/long.wav", "prompt": 'The speaker says "three". Which digit is spoken?',
             "audio_answer": "seven", "text_answer": "three", "kind": "conflict"} for k in range(n_long_items)]
    path.write_text(path.read_text() + "".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_checkpoint_processor():
    """A tiny random model with the organism's processor (one 2 s window)."""
    return tiny_with_processor()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    tiny_checkpoint(root / "model")
    data = _with_long_clip(root / "data")
    preset = root / "p.yaml"
    Preset(patches=[Patch(source=-1, target=0, scale=3.0, positions="audio+last")], name="p").to_yaml(preset)
    sf.write(str(root / "long.wav"), _tone(LONG_S), RATE)
    return root, data, preset


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the refusal must come before any model work."""
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("backpatch.loading.load_model_and_processor", fail)


# ------------------------------------------------------------------------------------------- the rule
def test_the_window_comes_from_the_processor():
    class FE:
        sampling_rate = 16000
        n_samples = 480000

    class Whisper:
        feature_extractor = FE()

    assert audio_window_seconds(Whisper()) == 30.0

    class Flamingo(Whisper):  # splits long audio into windows, up to max_audio_len seconds
        max_audio_len = 600

    assert audio_window_seconds(Flamingo()) == 600.0

    class Voxtral(Whisper):  # its audio defaults turn truncation off: any length goes through
        audio_kwargs = {"truncation": False}

    assert audio_window_seconds(Voxtral()) is None
    _, processor = tiny_checkpoint_processor()
    assert audio_window_seconds(processor) == 2.0


def test_fit_to_window_refuses_or_cuts():
    wave = _tone(3.0)
    with pytest.raises(AudioTooLongError) as info:
        fit_to_window(wave, RATE, 2.0, what="the clip x.wav")
    message = str(info.value)
    assert message.startswith("the clip x.wav is 3.00 s long, but this model accepts at most 2 s of audio")
    assert "--truncate-audio" in message and "truncate=True" in message and "\n" not in message
    cut, truncated = fit_to_window(wave, RATE, 2.0, truncate=True)
    assert truncated and len(cut) == 2 * RATE
    same, truncated = fit_to_window(_tone(2.0), RATE, 2.0)
    assert not truncated and len(same) == 2 * RATE  # exactly the window fits
    assert fit_to_window(wave, RATE, None)[1] is False  # no known window: no rule


# --------------------------------------------------------------------------------------- Python helpers
def test_build_inputs_refuses_a_long_clip_unless_truncate():
    _, processor = tiny_checkpoint_processor()
    with pytest.raises(AudioTooLongError, match=r"the audio clip is 6\.00 s long, but this model accepts at most 2 s"):
        build_inputs(processor, [_tone(LONG_S)], ["Which digit is spoken?"])
    with pytest.raises(AudioTooLongError, match=r"audio clip 2 of 2 is 6\.00 s long"):
        build_inputs(processor, [_tone(1.0), _tone(LONG_S)], ["a", "b"])
    cut = build_inputs(processor, [_tone(LONG_S)], ["Which digit is spoken?"], truncate=True)
    first = build_inputs(processor, [_tone(2.0)], ["Which digit is spoken?"])
    assert np.array_equal(cut["input_features"].numpy(), first["input_features"].numpy())
    with audio_truncation():  # the context that calibration's sweep inherits
        inherited = build_inputs(processor, [_tone(LONG_S)], ["Which digit is spoken?"])
    assert np.array_equal(inherited["input_features"].numpy(), first["input_features"].numpy())
    with pytest.raises(AudioTooLongError):  # the context is gone again
        build_inputs(processor, [_tone(LONG_S)], ["Which digit is spoken?"])


def test_encode_items_names_the_item(setup):
    _, data, _ = setup
    _, processor = tiny_checkpoint_processor()
    items = load_conflict_set(data)
    long = [it for it in items if it.id.startswith("long")]
    with pytest.raises(AudioTooLongError, match=r"the clip of item long-0 \(long\.wav\) is 6\.00 s long.*at most 2 s"):
        encode_items(processor, long)
    assert encode_items(processor, long, truncate=True)["input_features"].shape[0] == 3


def test_check_clip_lengths_counts_and_names_every_long_item(setup):
    _, data, _ = setup
    _, processor = tiny_checkpoint_processor()
    items = load_conflict_set(data)
    with pytest.raises(AudioTooLongError) as info:
        check_clip_lengths(items, processor)
    message = str(info.value)
    assert message.startswith(f"3 of {len(items)} items have clips longer than the 2 s of audio this model accepts")
    assert all(f"long-{k} (6.00 s)" in message for k in range(3))
    assert check_clip_lengths(items, processor, truncate=True) == {"n": 3, "ids": ["long-0", "long-1", "long-2"],
                                                                   "limit_s": 2.0}
    short = [it for it in items if not it.id.startswith("long")]
    assert check_clip_lengths(short, processor) is None


def test_evaluate_refuses_before_any_model_work_and_records_truncation(setup):
    root, data, preset = setup
    model, processor = load_model_and_processor(str(root / "model"))
    with pytest.raises(AudioTooLongError, match="3 of 11 items"):
        evaluate(object(), processor, data)  # not a model: it is never touched
    report = evaluate(backpatch.wrap(model, str(preset)), processor, data, batch_size=4, max_new_tokens=1,
                      progress=False, truncate=True)
    assert report["truncated_audio"] == {"n": 3, "ids": ["long-0", "long-1", "long-2"], "limit_s": 2.0}
    assert report["settings"]["truncate_audio"] is True


# --------------------------------------------------------------------------------------------- the CLI
def test_cli_run_refuses_a_long_clip_before_loading_the_model(setup, capsys, no_model):
    root, _, preset = setup
    assert main(["run", "--model", str(root / "model"), "--preset", str(preset), "--audio", str(root / "long.wav"),
                 "--prompt", "Which digit is spoken?"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"backpatch: error: the clip {root / 'long.wav'} is 6.00 s long, but this model accepts at most "
                   "2 s of audio (its processor's audio window); trim it, or pass --truncate-audio (truncate=True in "
                   "Python) to use only the first 2 s")


def test_cli_run_with_truncate_audio_says_so(setup, capsys):
    root, _, preset = setup
    assert main(["run", "--model", str(root / "model"), "--preset", str(preset), "--audio", str(root / "long.wav"),
                 "--prompt", "Which digit is spoken?", "--max-new-tokens", "1", "--truncate-audio"]) == 0
    assert "audio:        6.00 s clip, cut to its first 2 s (--truncate-audio)" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["eval", "calibrate", "diagnose"])
def test_cli_refuses_long_clips_naming_all_items_before_loading_the_model(setup, tmp_path, capsys, no_model,
                                                                          command):
    root, data, _ = setup
    extra = {"eval": [], "calibrate": ["--out", str(tmp_path / "c.yaml")], "diagnose": ["--out", str(tmp_path)]}
    assert main([command, "--model", str(root / "model"), "--data", str(data), *extra[command]]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("backpatch: error: 3 of 11 items have clips longer than the 2 s of audio this model accepts")
    assert "long-0 (6.00 s), long-1 (6.00 s), long-2 (6.00 s)" in err and "--truncate-audio" in err


def test_cli_eval_truncate_audio_is_recorded_in_json_and_table(setup, tmp_path, capsys):
    root, data, preset = setup
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(root / "model"), "--preset", str(preset), "--data", str(data), "--out",
                 str(out), "--max-new-tokens", "1", "--truncate-audio"]) == 0
    assert json.loads(out.read_text())["truncated_audio"] == {"n": 3, "ids": ["long-0", "long-1", "long-2"],
                                                              "limit_s": 2.0}
    assert "truncated audio: 3 items cut to their first 2 s (--truncate-audio): long-0, long-1, long-2" in \
        capsys.readouterr().out


def test_cli_calibrate_truncate_audio_is_recorded(setup, tmp_path, capsys):
    root, data, _ = setup
    out = tmp_path / "cal.yaml"
    assert main(["calibrate", "--model", str(root / "model"), "--data", str(data), "--out", str(out),
                 "--sources", "5", "--targets", "0", "--scales", "1", "--modes", "add", "--positions", "audio",
                 "--alphas", "", "--verify-top", "1", "--max-new-tokens", "1", "--truncate-audio"]) == 0
    sweep = json.loads(out.with_suffix(".sweep.json").read_text())
    assert sweep["truncated_audio"] == {"n": 3, "ids": ["long-0", "long-1", "long-2"], "limit_s": 2.0}
    assert "3 items' clips were cut to their first 2 s (--truncate-audio)" in Preset.from_yaml(out).description
    assert "truncated audio: 3 items cut to their first 2 s" in capsys.readouterr().out


def test_cli_diagnose_truncate_audio_is_recorded(setup, tmp_path, capsys):
    root, data, preset = setup
    out = tmp_path / "diag"
    assert main(["diagnose", "--model", str(root / "model"), "--preset", str(preset), "--data", str(data),
                 "--out", str(out), "--no-sweep", "--truncate-audio"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["truncated_audio"] == {"n": 3, "ids": ["long-0", "long-1", "long-2"], "limit_s": 2.0}
    assert "Truncated audio: 3 items cut to their first 2 s" in (out / "report.md").read_text()
    assert "truncated audio: 3 items" in capsys.readouterr().out
