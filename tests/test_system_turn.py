"""A claim in a system turn (ALME's system-prompt framing, issue 29 point 2): from the framing to the conflict item's
optional ``system`` field, and from the item to the model's input on every path that answers items."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_checkpoint, tiny_conflict_set

import backpatch
from backpatch import Patch, Preset
from backpatch.audio_io import load_audio
from backpatch.conflict_sets import ConflictSourceError, Framing, PromptTemplates, make_conflict_items
from backpatch.evaluate import evaluate
from backpatch.inputs import build_inputs, chat_texts, decode_new_tokens, framed
from backpatch.items import ConflictSetError, load_conflict_set
from backpatch.labelled_audio import Clip
from backpatch.loading import load_model_and_processor

SYSTEM_CLAIM = Framing("system", "The user has told you that the speaker says {claim}.", role="system")


def test_a_system_framing_puts_the_claim_in_the_items_system_field(tmp_path):
    clips = [Clip(f"c{i}", tmp_path / f"c{i}.wav", label) for i, label in enumerate(["yes", "no", "stop"])]
    templates = PromptTemplates("Which word is spoken?", (Framing("claim", "The speaker says {claim}."), SYSTEM_CLAIM))
    items = make_conflict_items(clips, templates, conflicts_per_clip=1, annotate=True)
    system = [it for it in items if it.get("framing") == "system"]
    user = [it for it in items if it.get("framing") == "claim"]
    assert system and user and len(system) == len(user)
    for it in system:
        assert it["prompt"] == "Which word is spoken?"
        assert it["system"] == f"The user has told you that the speaker says {it['text_answer']}."
    assert all("system" not in it for it in user)
    assert all("system" not in it for it in items if it["kind"] == "audio_only")


@pytest.mark.parametrize("framing, message", [
    (Framing("s", "{claim} {question}", role="system"), "cannot hold"),
    (Framing("s", "It is {claim}.", role="assistant"), "use 'user' or 'system'"),
])
def test_bad_system_framings_are_refused(framing, message):
    with pytest.raises(ConflictSourceError, match=message):
        PromptTemplates("Which word?", (framing,))


def test_chat_texts_takes_one_system_turn_per_prompt():
    class Template:
        def apply_chat_template(self, turns, add_generation_prompt, tokenize):
            return " | ".join(f"{t['role']}:{t['content'][-1]['text']}" for t in turns)

    texts = chat_texts(Template(), ["a?", "b?"], ["S1", None])
    assert texts == ["system:S1 | user:a?", "user:b?"]
    assert chat_texts(Template(), ["a?", "b?"], "S") == ["system:S | user:a?", "system:S | user:b?"]
    with pytest.raises(ValueError, match="1 system turns for 2 prompts"):
        chat_texts(Template(), ["a?", "b?"], ["S1"])


def test_an_instruction_keeps_the_items_system_claim():
    assert framed("Q?", None, "user", "Claim.") == ("Q?", "Claim.")
    assert framed("Q?", "Listen.", "user", "Claim.") == ("Listen. Q?", "Claim.")
    assert framed("Q?", "Listen.", "system", "Claim.") == ("Q?", "Listen. Claim.")
    assert framed("Q?", "Listen.", "system") == ("Q?", "Listen.")


@pytest.mark.parametrize("value", ["", 3, ["a"]])
def test_a_bad_system_field_names_the_line(tmp_path, value):
    data = tiny_conflict_set(tmp_path, 1)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[0]["system"] = value
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConflictSetError, match=r"conflicts.jsonl:1: system must be a non-empty string"):
        load_conflict_set(data)


@pytest.fixture(scope="module")
def system_set(tmp_path_factory):
    """The tiny model and a conflict set whose conflict items state the claim in a system turn."""
    root = tmp_path_factory.mktemp("system")
    tiny_checkpoint(root / "model")
    data = tiny_conflict_set(root / "data", 3)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for r in rows:
        if r["kind"] == "conflict":
            r["system"] = f"The user has told you that the digit is {r['text_answer']}."
            r["prompt"] = "Which digit is spoken?"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, data


def test_eval_sends_each_items_system_turn_to_the_model(system_set):
    """Both columns of ``backpatch eval`` answer the item with its system turn: each answer equals greedy generate
    on that item's own input, which differs from the input without the system turn."""
    root, data = system_set
    model, processor = load_model_and_processor(str(root / "model"))
    preset = Preset(patches=[Patch(source=-1, target=0, scale=3.0, positions="audio+last")], name="p")
    wrapped = backpatch.wrap(model, preset)
    report = evaluate(wrapped, processor, data, batch_size=4, max_new_tokens=3, progress=False)
    items = load_conflict_set(data)
    assert sum(it.system is not None for it in items) == 6
    for it, row in zip(items, report["items"], strict=True):
        inputs = build_inputs(processor, [load_audio(it.audio, 16000)], [it.prompt], system=it.system)
        if it.system:
            bare = build_inputs(processor, [load_audio(it.audio, 16000)], [it.prompt])
            assert inputs["input_ids"].shape[1] > bare["input_ids"].shape[1]
        with torch.no_grad(), wrapped.disabled():
            plain = wrapped.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert decode_new_tokens(processor, plain, inputs["input_ids"].shape[1])[0] == row["plain"]
        with torch.no_grad():
            patched = wrapped.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert decode_new_tokens(processor, patched, inputs["input_ids"].shape[1])[0] == row["backpatched"]


def test_every_command_refuses_system_items_on_a_template_that_drops_system_turns(system_set, monkeypatch,
                                                                                  tmp_path):
    """eval, calibrate, diagnose and the pre-load data check: each would otherwise answer without the claim."""
    from backpatch import preflight
    from backpatch.calibrate import calibrate
    from backpatch.diagnose import diagnose

    root, data = system_set
    model, processor = load_model_and_processor(str(root / "model"))
    template = processor.apply_chat_template

    def drop_system(turns, **kwargs):
        return template([t for t in turns if t["role"] != "system"], **kwargs)

    monkeypatch.setattr(processor, "apply_chat_template", drop_system)
    refused = r"drops system turns, so the system turn of item c0-x0 would do nothing"
    wrapped = backpatch.wrap(model, Preset(patches=[Patch(source=-1, target=0)], name="p"))
    with pytest.raises(ValueError, match=refused):
        evaluate(wrapped, processor, data, progress=False)
    with pytest.raises(ValueError, match=refused):
        calibrate(model, processor, data, tmp_path / "cal.yaml", progress=False)
    with pytest.raises(ValueError, match=refused):
        diagnose(model, processor, data, tmp_path / "diag", progress=False)
    monkeypatch.setattr(preflight, "processor_alone", lambda *args, **kwargs: processor)
    with pytest.raises(ValueError, match=refused):
        preflight.check_data(data, str(root / "model"))
    assert not (tmp_path / "cal.yaml").exists() and not (tmp_path / "diag").exists()


def test_smol_audio_tasks_have_a_system_framing_that_training_never_uses():
    from backpatch.organism.tasks import load_tasks

    tasks = load_tasks()
    for name, task in tasks.items():
        roles = [f.role for f in task.framings]
        assert "system" not in [f.role for f in task.user_framings]
        # digit keeps DESIGN 4b's exact single prompt, so existing digit sets apply unchanged
        assert roles == (["user"] if name == "digit" else ["user", "user", "system"]), name
