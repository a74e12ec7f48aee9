"""`backpatch conflicts`: conflict sets from labelled audio (folders and manifests), the organism's sets through
the same generator, group-disjoint splits, clear errors with nothing written, and the README walk-through."""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
from collections import Counter
from pathlib import Path

import pytest
from tiny import write_tone

import backpatch
from backpatch.cli import main
from backpatch.conflict_sets import (
    ConflictSourceError,
    PromptTemplates,
    build_conflict_set,
    make_conflict_items,
    parse_split,
    split_clips,
)
from backpatch.evaluate import load_conflict_set
from backpatch.labelled_audio import Clip, read_labelled_audio
from backpatch.organism import AUDIO_ONLY_TEMPLATE, CLAIM_TEMPLATE, DIGITS
from backpatch.organism.conflicts import make_items

EXAMPLES = backpatch.organism.examples_path()
README = Path(__file__).resolve().parents[1] / "README.md"
QUESTION = "Which word is spoken?"
FRAMINGS = ['transcript=The speaker says "{claim}".', "belief=I think it is {claim}."]


def example_clips() -> list[tuple[str, str]]:
    """(clip id, digit word) of the shipped examples, in file order."""
    clips: dict[str, str] = {}
    for line in EXAMPLES.read_text().splitlines():
        item = json.loads(line)
        clips.setdefault(Path(item["audio"]).stem, item["audio_answer"])
    return list(clips.items())


def digits_folder(root: Path) -> Path:
    """The shipped example clips laid out LABEL/SPEAKER_N.wav (Speech Commands style)."""
    folder = root / "my-digits"
    for clip_id, word in example_clips():
        voice, number = re.fullmatch(r"te-[a-z]+-([A-Za-z0-9]+)-(\d+)-0", clip_id).groups()
        (folder / word).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(EXAMPLES.parent / "wav" / f"{clip_id}.wav", folder / word / f"{voice}_{number}.wav")
    return folder


@pytest.fixture
def tones(tmp_path) -> Path:
    """A LABEL/SPEAKER_N.wav folder of short tones: 3 labels x 3 speakers x 2 clips, and a skipped folder."""
    folder = tmp_path / "clips"
    for i, label in enumerate(("yes", "no", "turn_left")):
        for j, speaker in enumerate(("alice", "bob", "carol")):
            for n in range(2):
                (folder / label).mkdir(parents=True, exist_ok=True)
                write_tone(folder / label / f"{speaker}_{n}.wav", seconds=0.3, freq=200 + 40 * i + 10 * j + n)
    (folder / "_background_noise_").mkdir()
    write_tone(folder / "_background_noise_" / "noise.wav", seconds=0.3)
    (folder / "yes" / "README.txt").write_text("not audio, ignored")
    return folder


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_organism_make_items_is_the_shared_generator_and_byte_identical():
    rows = [{"id": clip_id, "word": word} for clip_id, word in example_clips()]
    assert len(rows) == 30
    text = "".join(json.dumps(item) + "\n" for item in make_items(rows, seed=0))
    assert text == EXAMPLES.read_text()
    # the DESIGN 4b prompt is exactly what the templates compose
    items = make_items(rows[:1], seed=0)
    assert items[0]["prompt"] == CLAIM_TEMPLATE.format(claim=items[0]["text_answer"])
    assert items[-1]["prompt"] == AUDIO_ONLY_TEMPLATE
    assert make_items(rows[:3], seed=1) != make_items(rows[:3], seed=0)


def test_cli_rebuilds_the_shipped_examples_byte_for_byte(tmp_path, capsys):
    (tmp_path / "wav").mkdir()
    with open(tmp_path / "clips.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "audio", "label"])
        for clip_id, word in example_clips():
            shutil.copyfile(EXAMPLES.parent / "wav" / f"{clip_id}.wav", tmp_path / "wav" / f"{clip_id}.wav")
            writer.writerow([clip_id, f"wav/{clip_id}.wav", word])
    out = tmp_path / "examples.jsonl"
    assert main(["conflicts", "--from", str(tmp_path / "clips.csv"), "--out", str(out), "--question",
                 AUDIO_ONLY_TEMPLATE, "--claim", 'The speaker says "{claim}".', "--labels", ",".join(DIGITS),
                 "--no-annotations"]) == 0
    assert out.read_bytes() == EXAMPLES.read_bytes()
    assert "150 items (90 conflict, 30 consistent, 30 audio-only) from 30 clips" in capsys.readouterr().out


def test_folder_items_framings_and_relative_paths(tones, tmp_path):
    out = tmp_path / "sets" / "conflicts.jsonl"
    summary = build_conflict_set(tones, out, QUESTION, FRAMINGS, conflicts_per_clip=2, progress=False)
    items = read(out)
    clips = read_labelled_audio(tones)
    assert len(clips) == 18 and {c.label for c in clips} == {"yes", "no", "turn left"}  # _ reads as a space
    assert summary["outputs"]["all"]["items"] == len(items) == 18 * (2 * (2 + 1) + 1)
    by_clip: dict[str, list[dict]] = {}
    for item in items:
        by_clip.setdefault(item["audio"], []).append(item)
    for audio, rows in by_clip.items():
        label = rows[0]["audio_answer"]
        assert (out.parent / audio).resolve().is_file() and audio.startswith("../clips/")
        assert all(r["label"] == label for r in rows)
        claims = {}
        for framing in ("transcript", "belief"):
            mine = [r for r in rows if r.get("framing") == framing]
            conflicts = [r["text_answer"] for r in mine if r["kind"] == "conflict"]
            assert len(conflicts) == len(set(conflicts)) == 2 and label not in conflicts
            assert [r["text_answer"] for r in mine if r["kind"] == "consistent"] == [label]
            claims[framing] = conflicts
        assert claims["transcript"] == claims["belief"]  # matched across framings
        transcript = next(r for r in rows if r.get("framing") == "transcript" and r["kind"] == "conflict")
        assert transcript["prompt"] == f'The speaker says "{transcript["text_answer"]}". {QUESTION}'
        belief = next(r for r in rows if r.get("framing") == "belief")
        assert belief["prompt"] == f"I think it is {belief['text_answer']}. {QUESTION}"
        audio_only = [r for r in rows if r["kind"] == "audio_only"]
        assert len(audio_only) == 1 and audio_only[0]["prompt"] == QUESTION and "framing" not in audio_only[0]
    loaded = load_conflict_set(out)  # the evaluation loader accepts the set and keeps the annotations
    assert len(loaded) == len(items) and Counter(it.framing for it in loaded)["belief"] == 18 * 3
    assert {it.label for it in loaded} == {"yes", "no", "turn left"}
    # seeded: the same seed gives the same file, another seed other claims
    again = tmp_path / "again.jsonl"
    build_conflict_set(tones, again, QUESTION, FRAMINGS, conflicts_per_clip=2, progress=False)
    assert [r["text_answer"] for r in read(again)] == [r["text_answer"] for r in items]
    other = make_conflict_items(clips, PromptTemplates.parse(QUESTION, FRAMINGS), conflicts_per_clip=1, seed=5)
    first = make_conflict_items(clips, PromptTemplates.parse(QUESTION, FRAMINGS), conflicts_per_clip=1, seed=0)
    assert [r["text_answer"] for r in other] != [r["text_answer"] for r in first]


def test_default_framings_and_control_shares(tones):
    clips = read_labelled_audio(tones)
    items = make_conflict_items(clips, PromptTemplates.parse(QUESTION), conflicts_per_clip=1, consistent_share=0.5,
                                audio_only_share=0.0, seed=3)
    assert {r["framing"] for r in items if r["kind"] != "audio_only"} == {"transcript", "caption", "belief"}
    kinds = Counter(r["kind"] for r in items)
    assert kinds == {"conflict": 18 * 3, "consistent": 9 * 3}  # exactly half the clips, no audio-only
    with_consistent = {r["audio"] for r in items if r["kind"] == "consistent"}
    assert len(with_consistent) == 9
    many = make_conflict_items(clips, PromptTemplates.parse(QUESTION), conflicts_per_clip=5)
    assert Counter(r["kind"] for r in many)["conflict"] == 18 * 3 * 2  # capped at the two other labels


def test_multiple_choice_is_shuffled_and_holds_answer_and_claim(tones):
    clips = read_labelled_audio(tones)
    templates = PromptTemplates.parse(QUESTION, ['The speaker says "{claim}".'], choices="Options: {choices}.")
    items = make_conflict_items(clips, templates, conflicts_per_clip=1, choices=2, seed=0)
    positions = Counter()
    for item in items:
        assert len(item["choices"]) == 2 and item["audio_answer"] in item["choices"]
        if item["kind"] == "conflict":
            assert set(item["choices"]) == {item["audio_answer"], item["text_answer"]}
            positions[item["choices"].index(item["audio_answer"])] += 1
        assert item["prompt"].endswith(f"{QUESTION} Options: {', '.join(item['choices'])}.")
    assert positions[0] > 0 and positions[1] > 0  # shuffled, not always first
    assert make_conflict_items(clips, templates, conflicts_per_clip=1, choices=2, seed=0) == items
    full = make_conflict_items(clips, templates, conflicts_per_clip=1, choices=3)
    assert all(sorted(r["choices"]) == ["no", "turn left", "yes"] for r in full)
    path = tones / "mc.jsonl"  # audio paths as given (absolute) still load
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    assert [it.choices for it in load_conflict_set(path)] == [tuple(r["choices"]) for r in items]


def test_splits_never_share_a_group(tones, tmp_path, capsys):
    out = tmp_path / "conflicts.jsonl"
    assert main(["conflicts", "--from", str(tones), "--out", str(out), "--question", QUESTION,
                 "--filename-pattern", r"(?P<speaker>[^_]+)_\d", "--group-by", "speaker",
                 "--split", "validation=0.34,test=0.66", "--claim", 'The speaker says "{claim}".']) == 0
    validation, test = read(tmp_path / "conflicts.validation.jsonl"), read(tmp_path / "conflicts.test.jsonl")
    assert not out.exists()
    groups = {name: {r["group"] for r in rows} for name, rows in (("validation", validation), ("test", test))}
    assert groups["validation"].isdisjoint(groups["test"])
    assert groups["validation"] | groups["test"] == {"alice", "bob", "carol"}
    assert len(groups["validation"]) == 1 and len(groups["test"]) == 2  # 6 of 18 clips vs 12 of 18
    for rows in (validation, test):
        assert all(r["group"] == Path(r["audio"]).stem.split("_")[0] for r in rows)
    printed = capsys.readouterr().out
    assert "[validation]" in printed and "[test]" in printed and "1 groups" in printed
    # without a group, whole clips are split: no clip's items in two splits
    clips = read_labelled_audio(tones)
    shares = parse_split("a=0.5,b=0.25,c=0.25")
    parts = split_clips(clips, shares, seed=1)
    assert all(abs(len(parts[name]) - share * 18) <= 1 for name, share in shares.items())
    ids = [c.id for part in parts.values() for c in part]
    assert sorted(ids) == sorted(c.id for c in clips)
    with pytest.raises(ConflictSourceError, match="3 splits need at least 3 groups; found 2"):
        split_clips([Clip(str(i), Path("x"), "a", group=str(i % 2)) for i in range(4)],
                    parse_split("a=0.4,b=0.3,c=0.3"))


def test_manifests_csv_and_jsonl(tones, tmp_path):
    with open(tmp_path / "meta.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "category", "speaker"])
        for path in sorted(tones.glob("*/*.wav")):
            if not path.parent.name.startswith("_"):
                writer.writerow([path.relative_to(tones).as_posix(), path.parent.name, path.stem.split("_")[0]])
    out = tmp_path / "out" / "c.jsonl"
    summary = build_conflict_set(tmp_path / "meta.csv", out, QUESTION, ["{claim}."], conflicts_per_clip=1,
                                 audio_root=tones, group_by="speaker", split="v=0.5,t=0.5", progress=False)
    assert summary["n_clips"] == 18 and set(summary["labels"]) == {"yes", "no", "turn_left"}  # verbatim
    rows = read(out.parent / "c.v.jsonl") + read(out.parent / "c.t.jsonl")
    assert all((out.parent / r["audio"]).resolve().is_file() for r in rows)
    assert {r["group"] for r in rows} == {"alice", "bob", "carol"} and "framing" not in rows[0]
    assert rows[0]["id"].startswith(rows[0]["audio_answer"] + "-")  # id from the audio path
    lines = [json.dumps({"id": f"u{i}", "path": str(p), "transcript": f"phrase {i % 3}"})
             for i, p in enumerate(sorted(tones.glob("[ny]*/*.wav")))]
    (tmp_path / "meta.jsonl").write_text("\n".join(lines) + "\n")
    build_conflict_set(tmp_path / "meta.jsonl", tmp_path / "asr.jsonl", "What is said?", ["Transcript: {claim}."],
                       progress=False)
    asr = load_conflict_set(tmp_path / "asr.jsonl")
    assert {it.id for it in asr if it.kind == "audio_only"} == {f"u{i}-a" for i in range(12)}
    assert {it.audio_answer for it in asr} == {"phrase 0", "phrase 1", "phrase 2"}


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.mark.parametrize(
    "setup,args,message",
    [
        ("missing", [], r"6 of 8 audio file\(s\) are missing or unreadable: .*m0\.wav \(not found\), .* and 1 more$"),
        ("unreadable", [], r"1 of 3 audio file\(s\) are missing or unreadable: .*bad\.wav \(not readable as audio\)"),
        ("one-label", [], r"needs at least two labels; found 1 \(yes\)"),
        ("duplicate", [], r"1 duplicate clip id\(s\): 'same' \(2 times\); ids must be unique"),
        ("tones", ["--claim", "The speaker says it."], r"has no \{claim\}"),
        ("tones", ["--claim", "a={claim}", "--claim", "b {claim}"], r"name every framing"),
        ("tones", ["--split", "validation=0.7,test=0.2"], r"shares sum to 1"),
        ("tones", ["--group-by", "speaker"], r"18 clip\(s\) have no 'speaker' to group by .*--filename-pattern"),
        ("tones", ["--choices", "7"], r"choices must be between 2 and the number of labels \(3\)"),
        ("tones", ["--labels", "yes,no"], r"1 label\(s\) of the clips are not in the label list: 'turn left'"),
        ("exists", [], r"already exists; pass --force to overwrite"),
        ("nowhere", [], r"labelled audio not found"),
    ],
)
def test_bad_input_is_one_sentence_exit_2_and_nothing_written(tones, tmp_path, capsys, setup, args, message):
    source = tones
    out_dir = tmp_path / "out"
    if setup in ("missing", "unreadable", "duplicate", "one-label"):
        source = tmp_path / "manifest.csv"
        good = sorted(tones.glob("yes/*.wav"))[:2] + sorted(tones.glob("no/*.wav"))[:1]
        rows = [(p.stem + p.parent.name, str(p), p.parent.name) for p in good]
        if setup == "missing":  # 2 good clips and 6 missing ones: 5 named, "and 1 more"
            rows = rows[:2] + [(f"m{i}", str(tmp_path / f"m{i}.wav"), "no") for i in range(6)]
        if setup == "unreadable":
            (tmp_path / "bad.wav").write_text("this is not audio")
            rows[-1] = ("bad", str(tmp_path / "bad.wav"), "no")
        if setup == "duplicate":
            rows[1] = ("same", rows[1][1], rows[1][2])
            rows[2] = ("same", rows[2][1], rows[2][2])
        if setup == "one-label":
            rows = rows[:2]
        with open(source, "w", newline="") as f:
            csv.writer(f).writerows([("id", "audio", "label"), *rows])
    if setup == "nowhere":
        source = tmp_path / "no-such-folder"
    if setup == "exists":
        out_dir.mkdir()
        (out_dir / "conflicts.jsonl").write_text("keep me\n")
    before = _files(out_dir)
    code = main(["conflicts", "--from", str(source), "--out", str(out_dir / "conflicts.jsonl"), "--question",
                 QUESTION, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("backpatch: error: ") and re.search(message, err[-1]), err[-1]
    assert _files(out_dir) == before  # nothing written, not even a folder or a temporary file
    if setup == "exists":
        assert (out_dir / "conflicts.jsonl").read_text() == "keep me\n"
        assert main(["conflicts", "--from", str(source), "--out", str(out_dir / "conflicts.jsonl"), "--question",
                     QUESTION, "--force"]) == 0
        assert len(read(out_dir / "conflicts.jsonl")) == 18 * (3 * (2 + 1) + 1)  # 2 other labels to claim


def test_a_failure_while_writing_leaves_no_file(tones, tmp_path, monkeypatch):
    import backpatch.conflict_sets as cs

    calls = []
    real = cs.json.dumps

    def failing(obj, *a, **k):
        calls.append(1)
        if len(calls) == 40:  # in the second split's file
            raise OSError("disk full")
        return real(obj, *a, **k)

    monkeypatch.setattr(cs.json, "dumps", failing)
    with pytest.raises(OSError, match="disk full"):
        build_conflict_set(tones, tmp_path / "new" / "sets" / "c.jsonl", QUESTION, ["{claim}."],
                           split="a=0.5,b=0.5", progress=False)
    assert len(calls) == 40 and not (tmp_path / "new").exists()  # neither split, no temporary file, no folder
    (tmp_path / "kept").mkdir()
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        build_conflict_set(tones, tmp_path / "kept" / "c.jsonl", QUESTION, ["{claim}."], split="a=0.5,b=0.5",
                           progress=False)
    assert _files(tmp_path / "kept") == []


def _readme_section() -> tuple[list[list[str]], str, str]:
    text = README.read_text()
    section = text[text.index("## Calibrate on your own data"):]
    section = section[: section.index("\n## ", 5)]
    bash = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1).replace("\\\n", " ")
    commands = [shlex.split(line, comments=True) for line in bash.splitlines()]
    python = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    return [c for c in commands if c], python, section


def test_readme_calibrate_on_your_own_data(tmp_path, monkeypatch, capsys):
    """The README section, run as written: labelled folder -> conflicts -> calibrate -> preset YAML -> wrap."""
    commands, python, section = _readme_section()
    assert [c[:2] for c in commands] == [["backpatch", "conflicts"], ["backpatch", "calibrate"],
                                         ["backpatch", "eval"]]
    digits_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    for command in commands:
        assert main(command[1:]) == 0, capsys.readouterr().err[-2000:]
    validation = read(tmp_path / "my-data" / "conflicts.validation.jsonl")
    test = read(tmp_path / "my-data" / "conflicts.test.jsonl")
    assert {r["group"] for r in validation}.isdisjoint({r["group"] for r in test})
    preset = backpatch.Preset.from_yaml(tmp_path / "my-model.yaml")
    assert preset.calibration.status == "calibrated" and len(preset.patches) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["by_framing"]) == {"quote", "bare"} and len(report["by_label"]) == 10
    plain, patched = report["plain"], report["backpatched"]
    assert sum(v["plain"]["n_conflict"] for v in report["by_framing"].values()) == plain["n_conflict"]
    assert patched["tdr"] < plain["tdr"]
    assert patched["consistent_acc"] >= plain["consistent_acc"] - 0.02
    assert patched["audio_only_acc"] >= plain["audio_only_acc"] - 0.02
    printed = capsys.readouterr().out
    assert "framing" in printed and "quote" in printed and "bare" in printed
    # the numbers the README quotes are the ones measured here
    words = " ".join(section.split())
    p = preset.patches[0]
    assert f"calibration chose {p.source} -> {p.target} {p.mode} at the last prompt token" in words
    assert f"TDR went from {plain['tdr']:.3f} to {patched['tdr']:.3f} ({plain['n_conflict']} conflicts)" in words
    for name in ("quote", "bare"):
        m = report["by_framing"][name]
        assert f"`{name}` {m['plain']['tdr']:.3f} -> {m['backpatched']['tdr']:.3f}" in words
    scope: dict = {}
    exec(compile(python, "README.md", "exec"), scope)
    model_bp = scope["model_bp"]
    assert isinstance(model_bp, backpatch.BackpatchedModel) and model_bp.preset.patches == preset.patches


def test_cli_system_claims_put_the_claim_in_a_system_turn_and_load_back(tones, tmp_path, capsys):
    out = tmp_path / "conflicts.jsonl"
    system = "sys=The user has told you that the speaker says {claim}."
    assert main(["conflicts", "--from", str(tones), "--out", str(out), "--question", QUESTION,
                 "--claim", 'transcript=The speaker says "{claim}".', "--system-claim", system]) == 0
    rows = read(out)
    by_framing = Counter(r.get("framing") for r in rows if r["kind"] == "conflict")
    assert by_framing["sys"] == by_framing["transcript"] > 0
    for r in rows:
        if r.get("framing") == "sys":
            assert r["prompt"] == QUESTION and r["system"].endswith(f"says {r['text_answer']}.")
        else:
            assert "system" not in r
    assert {it.system for it in load_conflict_set(out) if it.kind == "conflict"} >= {
        r["system"] for r in rows if "system" in r}
    # only system claims: no default user-turn framings are added
    only = tmp_path / "only.jsonl"
    assert main(["conflicts", "--from", str(tones), "--out", str(only), "--question", QUESTION,
                 "--system-claim", system]) == 0
    assert {r.get("framing") for r in read(only) if r["kind"] != "audio_only"} == {"sys"}
    # a system claim holding the question is refused in one sentence
    assert main(["conflicts", "--from", str(tones), "--out", str(tmp_path / "bad.jsonl"), "--question", QUESTION,
                 "--system-claim", "s={claim}? {question}"]) == 2
    assert "cannot hold {question}" in capsys.readouterr().err
