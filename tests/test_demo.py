"""The Gradio demo: the compare action and its errors without a browser, the API with gradio_client, and the
real app in headless Debian chromium driven by Playwright (writes docs/demo.png).

Needs the ``demo`` extra (gradio), playwright (Python package only: the browser is Debian's /usr/bin/chromium,
installed by .ci/run; nothing is downloaded by a test tool).
"""

from __future__ import annotations

import os
import runpy
import socket
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

import backpatch  # noqa: E402
from backpatch import organism  # noqa: E402
from backpatch.audio_io import load_audio  # noqa: E402
from backpatch.demo import Demo, build_app, launch  # noqa: E402
from backpatch.evaluate import judge, load_conflict_set  # noqa: E402
from backpatch.inputs import build_inputs, decode_new_tokens  # noqa: E402
from backpatch.loading import load_model_and_processor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
PRESET = "smol-whisper"  # the default model's preset: the demo a new user starts
#: the previous default (patch + contrastive decoding behind an audio_gap gate), for the gate's controls
GATED = Path(__file__).parents[1] / "docs" / "stress" / "smol-whisper-patch-agreement.yaml"


@pytest.fixture(scope="module")
def organism_model():
    model, processor = load_model_and_processor(None)
    return model, processor


@pytest.fixture(scope="module")
def demo(organism_model):
    model, processor = organism_model
    return Demo(model, processor, PRESET)


def _clip(demo, key=None):
    clip = demo.clips[0] if key is None else demo.clip(key)
    return clip, clip.conflict_prompts[0]


def _library_answers(model, processor, wave, prompt, preset=PRESET):
    """Reference: plain and back-patched answers and first-token distributions straight from the library."""
    wrapped = backpatch.wrap(model, preset, processor=processor)
    inputs = build_inputs(processor, [wave], [prompt])
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        with wrapped.disabled():
            plain = decode_new_tokens(processor, wrapped.generate(**inputs, max_new_tokens=32, do_sample=False), n)[0]
            plain_logits = wrapped(**inputs).logits[:, -1]
        patched = decode_new_tokens(processor, wrapped.generate(**inputs, max_new_tokens=32, do_sample=False), n)[0]
        patched_logits = wrapped(**inputs).logits[:, -1]
    return plain, patched, plain_logits[0], patched_logits[0]


def _as_probs(top: dict[str, float]) -> list[float]:
    return list(top.values())


# ------------------------------------------------------------------------------------- compare, no browser
def test_compare_equals_the_library_and_the_patched_forward(demo, organism_model):
    model, processor = organism_model
    clip, prompt = _clip(demo)
    result = demo.compare(str(clip.path), prompt)  # controls default to the preset's values
    assert result.preset == backpatch.load_preset(PRESET)
    plain, patched, plain_logits, patched_logits = _library_answers(model, processor, clip.wave, prompt)
    assert (result.plain, result.patched) == (plain, patched)
    for top, logits in ((result.plain_top, plain_logits), (result.patched_top, patched_logits)):
        assert len(top) == 5
        probs = torch.softmax(logits.float(), -1).topk(5)
        np.testing.assert_allclose(_as_probs(top), probs.values.numpy(), atol=2e-4)
        tokenizer = processor.tokenizer
        assert list(top)[0] == tokenizer.decode([int(probs.indices[0])]).strip()
    # the organism example is recognised by content and both answers are judged against it
    assert result.clip == clip.key
    assert result.plain_follows in ("audio", "text", "other") and result.patched_follows in ("audio", "text", "other")
    assert f"The clip says <b>{clip.audio_answer}</b>" in result.verdict_html
    marker = "The answers differ" if result.plain != result.patched else "Same answer"
    assert marker in result.verdict_html


def test_controls_start_from_the_preset_and_change_what_runs(demo):
    preset = backpatch.load_preset(PRESET)
    controls = demo.controls(preset)
    first = preset.patches[0] if preset.patches else None
    if first is not None:
        assert (controls["source"], controls["target"], controls["scale"], controls["mode"], controls["positions"]) \
            == (first.source, first.target, first.scale, first.mode, first.positions)
    assert controls["alpha"] == (preset.contrastive.alpha if preset.contrastive else 0.0)
    assert controls["patch_on"] == bool(preset.patches)
    # add with scale 0 and contrastive off is the plain model: bit-identical answers and distributions
    clip, prompt = _clip(demo)
    r = demo.compare(str(clip.path), prompt, source=-1, target=0, scale=0.0, mode="add", positions="audio+last",
                     alpha=0, patch_on=True)
    # (the preset's patch agreement guard stays with the edited patch: a control left alone keeps its value)
    assert r.preset.patches[0] == backpatch.Patch(source=-1, target=0, scale=0.0, mode="add", positions="audio+last",
                                                  agreement=first.agreement if first else None)
    # (an audio_gap gate or a patch agreement guard keeps the null-audio rows at alpha 0: they only feed it)
    assert r.preset.contrastive is None or (r.preset.contrastive.alpha == 0 and (
        r.preset.gate is not None or r.preset.patches[0].agreement is not None))
    assert r.preset.calibration.status == "uncalibrated"
    assert r.plain == r.patched and r.plain_top == r.patched_top
    assert "Same answer" in r.verdict_html
    # contrastive alone (no patch) is a valid setting too
    r = demo.compare(str(clip.path), prompt, alpha=1.0, patch_on=False)
    assert r.preset.patches == [] and r.preset.contrastive.alpha == 1.0
    # issue 28 point 1: the plausibility guard has a control of its own (0: off), shown in the preset's details
    assert controls["plausibility"] == ((preset.contrastive.plausibility or 0.0) if preset.contrastive else 0.0)
    r = demo.compare(str(clip.path), prompt, alpha=1.0, patch_on=False, plausibility=0.3)
    assert r.preset.contrastive.plausibility == 0.3 and "plausibility 0.3" in r.verdict_html
    with pytest.raises(gr.Error, match=r"The plausibility guard must be in \[0, 1\]"):
        demo.compare(str(clip.path), prompt, alpha=1.0, plausibility=2)
    # the agreement guard too: "off" or a threshold in nats, the preset's own value among the choices
    agreement = preset.contrastive.agreement if preset.contrastive else None
    assert controls["agreement"] == ("off" if agreement is None else f"{agreement:g}")
    r = demo.compare(str(clip.path), prompt, alpha=1.0, patch_on=False, agreement="0.2")
    assert r.preset.contrastive.agreement == 0.2 and "agreement 0.2" in r.verdict_html
    r = demo.compare(str(clip.path), prompt, alpha=1.0, patch_on=False, agreement="off")
    assert r.preset.contrastive.agreement is None
    with pytest.raises(gr.Error, match="Agreement guard 'lots' is not one of: off, 0, 0.1"):
        demo.compare(str(clip.path), prompt, alpha=1.0, agreement="lots")
    # the patch's agreement guard: its own control; at alpha 0 the null-audio rows stay for the guard alone
    guard = first.agreement if first is not None else None
    assert controls["patch_agreement"] == ("off" if guard is None else f"{guard:g}")
    r = demo.compare(str(clip.path), prompt, source=20, target=18, scale=1.0, mode="add", positions="audio", alpha=0,
                     patch_on=True, patch_agreement="1", gate_on=False)
    assert r.preset.patches[0].agreement == 1.0 and r.preset.contrastive.alpha == 0.0
    assert "unless audio agrees by 1 nats" in r.verdict_html
    r = demo.compare(str(clip.path), prompt, alpha=0, patch_on=True, patch_agreement="off", gate_on=False)
    assert r.preset.patches[0].agreement is None and r.preset.contrastive is None


def test_compare_shows_what_the_audio_confidence_gate_did(demo):
    """Beside the answers: whether the gate left the mitigation at full strength, weakened it, or closed it."""
    import dataclasses

    base = backpatch.load_preset(PRESET)
    contrastive = base.contrastive or backpatch.Contrastive(alpha=0.0)
    closed = dataclasses.replace(base, name="closed", contrastive=contrastive,
                                 gate=backpatch.Gate("certainty", 1.0, 1.0))
    opened = dataclasses.replace(base, name="opened", contrastive=contrastive,
                                 gate=backpatch.Gate("audio_gap", 0.0, 0.0))
    clip, prompt = _clip(demo)
    uploaded = {"closed": closed, "opened": opened}
    r = demo.compare(str(clip.path), prompt, preset_name="closed", uploaded=uploaded)
    assert r.preset.gate == closed.gate and r.plain == r.patched and r.plain_top == r.patched_top
    assert "gate closed" in r.extra["gate"]
    assert ("patches at 0% strength" in r.extra["gate"]) == bool(base.patches)
    assert 'id="bp-gate"' in r.verdict_html and "gate closed" in r.verdict_html
    r = demo.compare(str(clip.path), prompt, preset_name="opened", uploaded=uploaded)
    assert "gate open: full mitigation" in r.extra["gate"]
    # editing a control keeps the base preset's gate
    r = demo.compare(str(clip.path), prompt, scale=0.05, preset_name="closed", uploaded=uploaded)
    assert r.preset.gate == closed.gate and r.preset.patches[0].scale == 0.05
    assert "gate" not in demo.compare(str(clip.path), prompt).extra or base.gate is not None


def test_compare_marks_control_accuracy_beyond_the_no_harm_bound_like_eval(demo):
    """The preset's calibrated control accuracies sit beside the answers; the ones whose paired upper bound on the
    loss exceeds 0.02 carry eval's "!" (a preset without recorded bounds: its point loss decides)."""
    import dataclasses

    from backpatch.demo import calibration_note

    base = backpatch.load_preset(PRESET)
    metrics = {"audio_only_acc_before": 0.996, "audio_only_acc_after": 0.992, "audio_only_acc_harm_upper": 0.016,
               "consistent_acc_before": 1.0, "consistent_acc_after": 0.975, "consistent_acc_harm_upper": 0.05,
               "perturbed_audio_only_acc_before": 0.86, "perturbed_audio_only_acc_after": 0.83}
    harmful = dataclasses.replace(base, name="harmful", calibration=backpatch.Calibration(
        status="calibrated", data="v.jsonl", metrics=metrics))
    note = calibration_note(harmful)
    assert "audio-only 0.996 → 0.992," in note and "consistent 1.000 → 0.975 !" in note
    assert "audio-only 0.860 → 0.830 !" in note  # no bound recorded: a 3-point loss
    assert "consistent (validation), audio-only (perturbed validation)" in note
    clean = dataclasses.replace(harmful, calibration=backpatch.Calibration(status="calibrated", metrics={
        k: v for k, v in metrics.items() if not k.startswith(("consistent", "perturbed"))}))
    assert "!" not in calibration_note(clean)
    assert calibration_note(dataclasses.replace(base, calibration=backpatch.Calibration())) is None
    clip, prompt = _clip(demo)
    r = demo.compare(str(clip.path), prompt, preset_name="harmful", uploaded={"harmful": harmful})
    assert 'id="bp-harm"' in r.verdict_html and "consistent 1.000 → 0.975 !" in r.verdict_html


def test_gate_controls_start_from_the_preset_and_change_what_runs(demo):
    """Issue 25: the gate, the default preset's key feature, has controls: on/off, signal and thresholds, applied
    in compare() (and left at None, the preset's gate is kept)."""
    import dataclasses

    preset = dataclasses.replace(backpatch.load_preset(GATED), name="gated")
    assert demo.controls(backpatch.load_preset(PRESET))["gate_on"] is False  # the default has no gate
    gated = {"gated": preset}
    controls = demo.controls(preset)
    assert preset.gate is not None  # the previous default: contrastive decoding behind an audio_gap gate
    assert (controls["gate_on"], controls["gate_signal"], controls["gate_low"], controls["gate_high"]) == \
        (True, preset.gate.signal, preset.gate.low, preset.gate.high)
    clip, prompt = _clip(demo)
    off = demo.compare(str(clip.path), prompt, gate_on=False, preset_name="gated", uploaded=gated)
    assert off.preset.gate is None and off.preset.contrastive == preset.contrastive
    assert off.preset.patches == preset.patches
    ungated = dataclasses.replace(preset, gate=None)
    assert off.preset.calibration.status == "uncalibrated" and "gate" not in off.extra
    plain, patched, _, _ = _library_answers(demo.model, demo.processor, clip.wave, prompt, preset=ungated)
    assert (off.plain, off.patched) == (plain, patched)
    # thresholds no signal reaches: the gate closes, and the answer is the plain model's
    closed = demo.compare(str(clip.path), prompt, gate_signal="certainty", gate_low=1.0, gate_high=1.0,
                          preset_name="gated", uploaded=gated)
    assert closed.preset.gate == backpatch.Gate("certainty", 1.0, 1.0) and closed.plain == closed.patched
    assert "gate closed" in closed.extra["gate"] and closed.plain_top == closed.patched_top
    # a preset without a gate gets the schema's default gate when the switch is turned on
    nogate = {"nogate": dataclasses.replace(ungated, name="nogate")}
    assert demo.controls(nogate["nogate"])["gate_on"] is False
    assert demo.compare(str(clip.path), prompt, preset_name="nogate", uploaded=nogate).preset.gate is None
    on = demo.compare(str(clip.path), prompt, preset_name="nogate", uploaded=nogate, gate_on=True)
    assert on.preset.gate == backpatch.Gate() and "gate" in on.extra


def test_methods_line_names_what_is_on_and_off(demo):
    from backpatch.demo import methods_status

    line = methods_status(backpatch.load_preset(GATED))
    assert line == ("**On:** back-patching (1 patch), contrastive decoding α 3 (agreement guard 0), audio-confidence "
                    "gate audio_gap 0.2..0.4. **Off:** attention to audio, audio-silence steering.")
    # the default's contrastive block is at alpha 0 (rows for the patch's guard): the term itself is off
    assert methods_status(backpatch.load_preset(PRESET)) == (
        "**On:** back-patching (1 patch) under an agreement guard. **Off:** contrastive decoding, attention to audio, "
        "audio-silence steering, audio-confidence gate.")
    patched = backpatch.Preset(name="p", patches=[backpatch.Patch(20, 18)])
    assert methods_status(patched).startswith("**On:** back-patching (1 patch). **Off:** contrastive decoding")


def test_attention_and_steering_controls_build_their_blocks_and_answer_like_the_library(demo):
    """Issue 20 point 5: the two controls make attention and steering blocks (the base preset's layers, else the
    middle third), the answers equal the library's for that preset, and 0 leaves them out."""
    import dataclasses

    base = dataclasses.replace(backpatch.load_preset(PRESET), name="nogate", gate=None)
    uploaded = {"nogate": base}
    clip, prompt = _clip(demo)
    r = demo.compare(str(clip.path), prompt, preset_name="nogate", uploaded=uploaded, attention_alpha=0.5,
                     steering_beta=1.0)
    third = [demo.num_layers // 3, 2 * demo.num_layers // 3]
    assert r.preset.attention == backpatch.Attention(layers=third, alpha=0.5, form="scale")
    assert r.preset.steering == backpatch.Steering(layers=third, beta=1.0) and r.preset.contrastive is not None
    assert r.preset.calibration.status == "uncalibrated" and "attention to audio" in r.verdict_html
    plain, patched, _, _ = _library_answers(demo.model, demo.processor, clip.wave, prompt, preset=r.preset)
    assert (r.plain, r.patched) == (plain, patched)
    same = demo.preset_from_controls("nogate", **demo.controls(base), uploaded=uploaded)
    assert same is base and same.attention is None and same.steering is None
    gated = dataclasses.replace(base, name="gated", contrastive=backpatch.Contrastive(alpha=1.0),
                                gate=backpatch.Gate("certainty", 0.2, 0.2))
    with pytest.raises(gr.Error, match="it does not yet act on attention or steering blocks: drop the gate"):
        demo.compare(str(clip.path), prompt, preset_name="gated", uploaded={"gated": gated}, attention_alpha=0.2)


def test_save_preset_writes_the_controls_as_yaml(demo, tmp_path):
    made = demo.preset_from_controls(PRESET, source=10, target=2, scale=0.5, mode="add", positions="audio",
                                     alpha=2.0, patch_on=True)
    path = demo.save_preset(made, "my-organism")
    assert path.name == "my-organism.yaml"
    loaded = backpatch.Preset.from_yaml(path)
    assert loaded.name == "my-organism"
    guard = backpatch.load_preset(PRESET).patches[0].agreement  # the guard control was left at the preset's value
    assert loaded.patches[0] == backpatch.Patch(source=10, target=2, scale=0.5, mode="add", positions="audio",
                                                agreement=guard)
    assert loaded.contrastive.alpha == 2.0 and loaded.calibration.status == "uncalibrated"
    assert loaded.match == backpatch.load_preset(PRESET).match
    # unchanged controls save the preset as it is (its calibration block included)
    same = demo.preset_from_controls(PRESET, **{k: v for k, v in demo.controls(demo.preset).items()})
    assert backpatch.Preset.from_yaml(demo.save_preset(same, PRESET)).to_dict() == demo.preset.to_dict()
    with pytest.raises(gr.Error, match="only letters, digits"):
        demo.save_preset(made, "../evil")
    # a user's preset file is checked against the model
    bad = tmp_path / "bad.yaml"
    backpatch.Preset(patches=[backpatch.Patch(source=30, target=2)], name="bad").to_yaml(bad)
    with pytest.raises(gr.Error, match="does not fit this model"):
        demo.load_preset_file(bad)
    assert demo.load_preset_file(path).name == "my-organism"


def _write(path: Path, wave: np.ndarray, rate: int = 16000) -> str:
    sf.write(str(path), wave.astype(np.float32), rate)
    return str(path)


def _tone(seconds: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return 0.3 * np.sin(2 * np.pi * 440 * t)


@pytest.mark.parametrize(
    "case,message",
    [
        ("not_audio", "is not an audio file that can be read"),
        ("empty", "is empty"),
        ("silent", "is silent"),
        ("too_long", "accepts at most 2 s of audio"),
        ("missing", "Choose an audio clip first"),
        ("empty_prompt", "The prompt is empty"),
        ("preset_does_not_fit", "The preset does not fit this model (30 decoder layers)"),  # smol-whisper
        ("bad_control", "must be a whole number"),
        ("nothing_on", "Nothing to compare"),
        ("bad_gate", "These gate controls do not make a valid gate: gate.low: low (0.5) must not exceed high (0.2)"),
        ("bad_gate_signal", "Gate signal 'loudness' is not one of: audio_gap, certainty"),
    ],
)
def test_bad_input_is_a_friendly_error_and_the_demo_keeps_serving(demo, tmp_path, case, message):
    clip, prompt = _clip(demo)
    audio, kwargs = str(clip.path), {}
    if case == "not_audio":
        audio = str(tmp_path / "notes.wav")
        Path(audio).write_text("these are not audio samples\n")
    elif case == "empty":
        audio = _write(tmp_path / "empty.wav", np.zeros(0))
    elif case == "silent":
        audio = _write(tmp_path / "silent.wav", np.zeros(8000))
    elif case == "too_long":
        audio = _write(tmp_path / "long.wav", _tone(3.0))  # the organism's window is 2 s (chunk_length)
    elif case == "missing":
        audio = None
    elif case == "empty_prompt":
        prompt = "   "
    elif case == "preset_does_not_fit":
        kwargs = {"source": 40, "target": 3, "patch_on": True}
    elif case == "bad_control":
        kwargs = {"source": 7.5, "patch_on": True}
    elif case == "nothing_on":
        kwargs = {"patch_on": False, "alpha": 0}
    elif case == "bad_gate":
        kwargs = {"gate_on": True, "gate_low": 0.5, "gate_high": 0.2}
    elif case == "bad_gate_signal":
        kwargs = {"gate_signal": "loudness"}
    with pytest.raises(gr.Error, match=message.replace("(", r"\(").replace(")", r"\)")):
        demo.compare(audio, prompt, **kwargs)
    assert demo.compare(str(clip.path), clip.conflict_prompts[0]).plain  # still serving
    assert backpatch.backpatch_hook_count(demo.model) == 0


def test_clip_limit_comes_from_the_feature_extractor():
    class FE:
        sampling_rate = 16000
        n_samples = 480000

    class Proc:
        feature_extractor = FE()

    assert Demo._max_seconds(Proc()) == 30.0
    FE.chunk_length = 2
    assert Demo._max_seconds(Proc()) == 2.0
    Proc.feature_extractor = None
    assert Demo._max_seconds(Proc()) is None


def test_two_requests_at_once_get_their_own_answers(demo):
    """Threads sharing the one model: each request's answers equal the same request run alone."""
    clips = demo.clips[:4]
    settings = [dict(), dict(source=-1, target=0, scale=0.0, mode="add", positions="audio+last", alpha=0)]
    jobs = [(c, s) for c in clips for s in settings]
    alone = [demo.compare(str(c.path), c.conflict_prompts[0], **s) for c, s in jobs]
    together: list = [None] * len(jobs)

    def run(i):
        c, s = jobs[i]
        together[i] = demo.compare(str(c.path), c.conflict_prompts[0], **s)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [(r.plain, r.patched, r.plain_top, r.patched_top) for r in together] == \
        [(r.plain, r.patched, r.plain_top, r.patched_top) for r in alone]


def test_any_audio_llm_gets_free_text_and_no_organism_examples(tmp_path):
    from tiny import tiny_with_processor, write_tone

    model, processor = tiny_with_processor()  # 6 decoder layers, not the organism
    with pytest.raises(backpatch.PresetError, match="num_layers"):
        build_app(model, processor, "qwen2-audio-7b-instruct")  # a bundled preset for 32 layers does not fit
    preset = backpatch.Preset(patches=[backpatch.Patch(source=-1, target=0, scale=3.0, positions="audio+last")],
                              name="tiny")
    app = build_app(model, processor, preset, model_name="tiny")
    demo = app.backpatch_demo
    ids = {getattr(block, "elem_id", None) for block in app.blocks.values()}
    assert "bp-compare" in ids and "bp-example" not in ids and not demo.clips
    write_tone(tmp_path / "tone.wav", rate=22050)  # not the model's rate: resampled
    result = demo.compare(str(tmp_path / "tone.wav"), "What is said?")
    assert result.clip is None and "The clip says" not in result.verdict_html
    assert result.preset is demo.preset and len(result.patched_top) == 5


def test_demo_app_script_calls_launch(monkeypatch):
    calls = []
    monkeypatch.setattr("backpatch.demo.launch", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(sys, "argv", ["demo/app.py", "--port", "7999", "--preset", PRESET])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "demo" / "app.py"), run_name="__main__")
    assert exit_info.value.code == 0
    (args, kwargs), = calls
    assert args == (None, PRESET) and kwargs["host"] == "127.0.0.1" and kwargs["port"] == 7999


@pytest.fixture
def busy_port():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        yield holder.getsockname()[1]


def test_a_busy_port_is_named_with_the_port_option_before_the_model_loads(busy_port, monkeypatch, capsys):
    from backpatch.cli import main

    monkeypatch.setattr("backpatch.loading.load_model_and_processor",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("the model was loaded")))
    with pytest.raises(OSError, match=f"port {busy_port} on 127.0.0.1 is already in use; pass a free one with --port"):
        launch("organism:digits", port=busy_port)
    assert main(["demo", "--model", "organism:digits", "--port", str(busy_port)]) == 2
    err = capsys.readouterr().err
    assert f"--port {busy_port + 1}" in err and "GRADIO_SERVER_PORT" not in err


def test_gradios_own_busy_port_error_is_reworded_to_name_the_port_option(busy_port, monkeypatch):
    """A port taken between the early check and the server start: gradio's message names an environment
    variable; ours names --port."""
    monkeypatch.setattr("backpatch.demo.server.check_port", lambda host, port: None)  # where launch() looks it up
    with pytest.raises(OSError) as info:
        launch("organism:digits", port=busy_port, prevent_thread_lock=True, quiet=True)
    assert str(info.value).startswith(f"port {busy_port} on 127.0.0.1 is already in use; pass a free one with --port")
    assert "GRADIO_SERVER_PORT" not in str(info.value)


# ------------------------------------------------------------------------- the running app: API and browser
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def showcase_item(organism_model):
    """An organism conflict example where, with the CURRENT smol-whisper preset, the plain answer follows the
    text and the back-patched one follows the audio (scanned in a batch, confirmed alone)."""
    model, processor = organism_model
    wrapped = backpatch.wrap(model, PRESET, processor=processor)
    items = [i for i in load_conflict_set(organism.examples_path()) if i.kind == "conflict"]
    waves = {i.audio: load_audio(i.audio, 16000) for i in items}

    def answers(batch):
        inputs = build_inputs(processor, [waves[i.audio] for i in batch], [i.prompt for i in batch])
        n = inputs["input_ids"].shape[1]
        with torch.no_grad():
            with wrapped.disabled():
                plain = wrapped.generate(**inputs, max_new_tokens=8, do_sample=False)
            patched = wrapped.generate(**inputs, max_new_tokens=8, do_sample=False)
        return zip(decode_new_tokens(processor, plain, n), decode_new_tokens(processor, patched, n), strict=True)

    for item, (plain, patched) in zip(items, answers(items), strict=True):
        if judge(plain, item) == "text" and judge(patched, item) == "audio":
            (p1, b1), = answers([item])
            if judge(p1, item) == "text" and judge(b1, item) == "audio":
                return item
    pytest.fail(f"no organism conflict example in {organism.examples_path()} has the plain answer following the "
                f"text and the back-patched one following the audio with the current {PRESET!r} preset: the demo "
                "has nothing to show; recalibrate the preset or ship examples where it helps")


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    app = launch(port=port, prevent_thread_lock=True, quiet=True)  # the organism with its preset, like the CLI
    try:
        yield f"http://127.0.0.1:{port}/", app
    finally:
        app.close()


def test_app_queues_compare_one_at_a_time_and_names_the_endpoint(server):
    _, app = server
    compare = [fn for fn in app.fns.values() if fn.api_name == "compare"]
    assert len(compare) == 1 and compare[0].concurrency_limit == 1
    assert [c.label for c in compare[0].inputs[:2]] == ["Audio clip", "Prompt"]
    # the right answer is labelled with what the preset does
    assert [c.label for c in compare[0].outputs[:2]] == [
        "Plain model", "With the preset: back-patched 20->18"]
    # every event that runs the model shares one concurrency slot
    model_fns = [fn for fn in app.fns.values() if fn.fn is not None and fn.fn.__name__ == "on_compare"]
    assert len(model_fns) == 2 and {fn.concurrency_id for fn in model_fns} == {"model"}
    assert all(fn.concurrency_limit == 1 for fn in model_fns)


def _component(app, elem_id):
    return next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def test_controls_follow_the_preset_and_grey_out_the_patch_for_a_patchless_one(server, organism_model):
    """Issue 25: the page starts from the preset: smol-whisper's patch (on, live, its values) and gate (its setting),
    and the title and methods line name what it runs; for a preset without patches the patch controls are off and
    not interactive, and nothing on the page says back-patched."""
    import dataclasses

    _, app = server
    preset = backpatch.load_preset(PRESET)
    (patch,) = preset.patches
    assert _component(app, "bp-patch-on").value is True
    for key in ("source", "target", "scale", "mode", "positions"):
        component = _component(app, f"bp-{key}")
        assert component.interactive is not False and component.value == getattr(patch, key), key
    # the default has no gate: its switch is off and the thresholds show the schema's defaults
    assert _component(app, "bp-gate-on").value is (preset.gate is not None)
    gate = [_component(app, f"bp-gate-{key}") for key in ("signal", "low", "high")]
    shown = preset.gate or backpatch.Gate()
    assert [c.value for c in gate] == [shown.signal, shown.low, shown.high]
    assert _component(app, "bp-patch-agreement").value == f"{patch.agreement:g}"
    assert _component(app, "bp-intro").value.startswith(
        f"# backpatch: plain vs {backpatch.methods_label(preset)}, side by side")
    assert _component(app, "bp-methods").value.startswith("**On:** back-patching (1 patch)")

    patchless = build_app(*organism_model, dataclasses.replace(backpatch.load_preset(GATED), name="patchless",
                                                               patches=[]))
    assert _component(patchless, "bp-patch-on").value is False
    for elem_id in ("bp-source", "bp-target", "bp-scale", "bp-mode", "bp-positions", "bp-patch-agreement"):
        assert _component(patchless, elem_id).interactive is False, elem_id
    intro = _component(patchless, "bp-intro").value
    assert intro.startswith("# backpatch: plain vs contrastive a=3 + gate, side by side")
    assert "back-patched" not in intro
    assert "**Off:** back-patching" in _component(patchless, "bp-methods").value


def test_api_endpoint_with_gradio_client(server, showcase_item, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    url, _ = server
    client = Client(url, verbose=False)
    out = client.predict(handle_file(str(showcase_item.audio)), showcase_item.prompt, api_name="/compare")
    plain, patched = out[0], out[1]
    assert judge(plain, showcase_item) == "text" and judge(patched, showcase_item) == "audio"
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not audio")
    with pytest.raises(AppError, match="not an audio file"):
        client.predict(handle_file(str(text_file)), showcase_item.prompt, api_name="/compare")
    with pytest.raises(AppError, match="The prompt is empty"):
        client.predict(handle_file(str(showcase_item.audio)), "", api_name="/compare")
    # the app keeps serving, and the controls follow the two first inputs
    out = client.predict(handle_file(str(showcase_item.audio)), showcase_item.prompt, -1, 0, 0.0, "add", "audio",
                         0, True, api_name="/compare")
    assert out[0] == out[1] == plain
    # the gate controls are the endpoint's last arguments: a gate no signal reaches gives the plain answer
    names = [p["parameter_name"] for p in client.view_api(print_info=False, return_format="dict")[
        "named_endpoints"]["/compare"]["parameters"]]
    # (the controls added since, such as the plausibility guard, follow the released ones)
    assert names[:2] == ["audio", "prompt"] and names[-7:] == ["gate_on", "gate_signal", "gate_low", "gate_high",
                                                               "plausibility", "agreement", "patch_agreement"]
    out = client.predict(handle_file(str(showcase_item.audio)), showcase_item.prompt, gate_on=True,
                         gate_signal="certainty", gate_low=1.0, gate_high=1.0, api_name="/compare")
    assert out[0] == out[1] == plain
    # the save button's endpoint returns the controls as a preset YAML file
    saved = client.predict(10, 2, 0.5, "add", "audio", 0, True, PRESET, "from-api", api_name="/save_preset")
    loaded = backpatch.Preset.from_yaml(saved)
    assert Path(saved).name == "from-api.yaml" and loaded.name == "from-api"
    assert loaded.patches[0] == backpatch.Patch(source=10, target=2, scale=0.5, mode="add", positions="audio",
                                                agreement=backpatch.load_preset(PRESET).patches[0].agreement)


def test_browser_compare_shows_plain_following_text_and_backpatched_following_audio(server, showcase_item, tmp_path):
    """The screenshot goes to a temporary path; scripts/demo_screenshot.sh runs this test to refresh docs/demo.png."""
    from playwright.sync_api import expect, sync_playwright

    screenshot = Path(os.environ.get("BACKPATCH_SCREENSHOT") or tmp_path / "demo.png")

    url, _ = server
    key = showcase_item.audio.stem
    external: list[str] = []

    def only_local(route):
        if route.request.url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")):
            route.continue_()
        else:
            external.append(route.request.url)
            route.abort()

    started = time.monotonic()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.route("**/*", only_local)
            page.goto(url, wait_until="domcontentloaded")
            expect(page.locator("#bp-compare")).to_be_visible(timeout=30_000)
            # the page names what the preset does; its patch controls are live, the gate (it has none) is off
            preset = backpatch.load_preset(PRESET)
            expect(page.locator("#bp-intro")).to_contain_text(f"plain vs {backpatch.methods_label(preset)}")
            expect(page.locator("#bp-source input").first).to_be_enabled()
            expect(page.locator("#bp-gate-on input[type=checkbox]")).not_to_be_checked()
            expect(page.locator("#bp-gate-low input")).to_be_disabled()

            def pick(elem_id, text):
                box = page.locator(f"#{elem_id} input")
                box.click()
                box.fill(text)
                page.locator("ul[role='listbox'] li", has_text=text).first.click()

            # pick some other clip first, then the showcase clip: the clip (and its prompts) must follow the pick
            other = next(c for c in sorted({i.audio.stem for i in load_conflict_set(organism.examples_path())})
                         if c != key)
            pick("bp-example", other)
            expect(page.locator("#bp-prompt textarea")).not_to_have_value("", timeout=10_000)
            pick("bp-example", key)
            page.wait_for_timeout(500)
            # enter the conflicting prompt by hand
            prompt_box = page.locator("#bp-prompt textarea")
            prompt_box.fill(showcase_item.prompt[:-1])
            prompt_box.press_sequentially(showcase_item.prompt[-1])  # a real keystroke, as a user types
            expect(prompt_box).to_have_value(showcase_item.prompt)
            # the example-prompt menu follows what was typed (the prompt is one of this clip's examples)
            expect(page.locator("#bp-example-prompt input")).to_have_value(showcase_item.prompt, timeout=10_000)
            page.locator("#bp-compare").click()
            plain_box = page.locator("#bp-plain-answer textarea")
            patched_box = page.locator("#bp-patched-answer textarea")
            expect(plain_box).not_to_have_value("", timeout=30_000)
            expect(patched_box).not_to_have_value("", timeout=30_000)
            plain, patched = plain_box.input_value(), patched_box.input_value()
            verdict = page.locator("#bp-verdict")
            expect(verdict).to_contain_text("The answers differ")
            expect(verdict).to_contain_text(f"example {key}")
            expect(verdict).to_contain_text("Plain: ✗ follows the text")
            expect(verdict).to_contain_text("With preset: ✓ matches the audio")
            # the top-5 bars render on both sides
            expect(page.locator("#bp-plain-top")).to_contain_text(showcase_item.text_answer)
            expect(page.locator("#bp-patched-top")).to_contain_text(showcase_item.audio_answer)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
            # turning back-patching on makes its controls live and the page names the patch
            page.locator("#bp-patch-on input[type=checkbox]").check()
            expect(page.locator("#bp-source input").first).to_be_enabled(timeout=10_000)
            expect(page.locator("#bp-intro")).to_contain_text("plain vs back-patched", timeout=10_000)
            expect(page.locator("#bp-methods")).to_contain_text("back-patching (1 patch)")
            expect(page.locator("#bp-patched-answer")).to_contain_text("With the preset: back-patched")
            page.locator("#bp-gate-on input[type=checkbox]").check()
            expect(page.locator("#bp-gate-low input")).to_be_enabled(timeout=10_000)
            expect(page.locator("#bp-methods")).to_contain_text("audio-confidence gate audio_gap 0.1..0.3")
            page.locator("#bp-gate-on input[type=checkbox]").uncheck()
            expect(page.locator("#bp-gate-low input")).to_be_disabled(timeout=10_000)
            expect(page.locator("#bp-methods")).to_contain_text("Off: contrastive decoding, attention to audio, "
                                                                "audio-silence steering, audio-confidence gate")
        finally:
            browser.close()
    assert judge(plain, showcase_item) == "text", (showcase_item.id, plain)
    assert judge(patched, showcase_item) == "audio", (showcase_item.id, patched)
    assert not external, f"the demo page tried to reach the network: {external}"
    assert screenshot.stat().st_size > 10_000 and screenshot.stat().st_mtime >= time.time() - (
        time.monotonic() - started) - 5
