"""Synthesize the spoken-digit corpus (espeak-ng + sox) that the model organism is trained and tested on.

Why synthetic: the organism must be reproducible offline in minutes, so its data comes from a speech
synthesizer, not a download. Voices are split by *voice variant* (timbre): validation and test voices are
never heard in training and are disjoint from each other, so audio accuracy measures generalization to a
new speaker, not memorized clips. Every clip draws an accent, speed and pitch; training clips get four
augmented copies each (silence trim, shift, gain, Gaussian noise). Everything is a pure function of the
seed: per-clip random streams come from ``SeedSequence((seed, split, index))`` and sox runs with
``-R -D`` (repeatable, no dither), so the same seed gives byte-identical wavs whatever the thread order.

Layout written under ``--out`` (default ``/work/data/organism/corpus``)::

    {train,validation,test}/wav/<id>.wav      16 kHz mono 16-bit
    {train,validation,test}/manifest.jsonl   one line per wav: id, path, word, accent, variant, ...
    corpus.json                             seed, counts, synthesis time
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from backpatch.organism.processor import DIGITS, SAMPLING_RATE

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("/work/data/organism/corpus")
ACCENTS = (
    "en",
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-029",
    "en-us-nyc",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
)
VARIANTS = {
    "train": (
        "m1",
        "m2",
        "m4",
        "m6",
        "m7",
        "m8",
        "f1",
        "f2",
        "f4",
        "klatt",
        "klatt3",
        "klatt5",
        "Alex",
        "Alicia",
        "Annie",
        "adam",
        "anika",
        "aunty",
        "benjamin",
        "john",
        "linda",
        "max",
        "robert",
        "paul",
    ),
    "validation": ("m3", "f5", "klatt4", "Mike", "belinda", "edward"),
    "test": ("f3", "m5", "klatt2", "Andy", "steph", "david"),
}
SPLIT_CODE = {"train": 0, "validation": 1, "test": 2}
MAX_SECONDS = 1.9  # the feature extractor window is 2 s; keep every clip inside it


@dataclass
class Clip:
    """One synthesized (and possibly augmented) wav, as recorded in the split manifest."""

    id: str
    path: str
    word: str
    accent: str
    variant: str
    speed: int
    pitch: int
    shift_s: float
    gain: float
    noise: float
    seconds: float = 0.0


def synthesize(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng (22050 Hz) piped through sox to 16 kHz mono 16-bit; returns float32 samples in [-1, 1]."""
    espeak = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
        check=True,
        capture_output=True,
    )
    sox = subprocess.run(
        ["sox", "-R", "-D", "-t", "wav", "-", "-t", "wav", "-r", str(SAMPLING_RATE), "-c", "1", "-b", "16", "-"],
        input=espeak.stdout,
        check=True,
        capture_output=True,
    )
    audio, sr = sf.read(io.BytesIO(sox.stdout), dtype="float32")
    assert sr == SAMPLING_RATE
    return audio


def trim(audio: np.ndarray, rel_threshold: float = 0.02) -> np.ndarray:
    """Cut leading/trailing silence (samples below 2% of the peak), keeping 20 ms margins."""
    loud = np.flatnonzero(np.abs(audio) > rel_threshold * (np.abs(audio).max() + 1e-9))
    if loud.size == 0:
        return audio
    margin = SAMPLING_RATE // 50
    return audio[max(0, loud[0] - margin) : loud[-1] + margin]


def augment(audio: np.ndarray, rng: np.random.Generator, max_seconds: float = MAX_SECONDS,
            max_noise: float = 0.02) -> tuple[np.ndarray, float, float, float]:
    """Random shift (up to 0.3 s leading silence, within the window), gain 0.3-1.5, noise sigma <= ``max_noise``."""
    room = max(0.0, max_seconds - len(audio) / SAMPLING_RATE)
    shift = float(rng.uniform(0.0, min(0.3, room)))
    gain = float(rng.uniform(0.3, 1.5))
    noise = float(rng.uniform(0.0, max_noise))
    out = np.concatenate([np.zeros(int(shift * SAMPLING_RATE), np.float32), audio * gain])
    out = out + rng.normal(0.0, noise, out.shape).astype(np.float32)
    return np.clip(out, -1.0, 1.0).astype(np.float32), shift, gain, noise


def plan(split: str, clips_per_word: int, seed: int) -> list[tuple[int, str, str, str, int, int]]:
    """Deterministic synthesis plan: (index, word, accent, variant, speed, pitch) per base clip.

    Variants cycle so that every voice says every word about equally often.
    """
    variants = VARIANTS[split]
    rows = []
    for w, word in enumerate(DIGITS):
        for k in range(clips_per_word):
            idx = w * clips_per_word + k
            rng = np.random.default_rng(np.random.SeedSequence((seed, SPLIT_CODE[split], idx)))
            variant = variants[(k + w) % len(variants)]
            rows.append(
                (idx, word, str(rng.choice(ACCENTS)), variant, int(rng.integers(120, 221)), int(rng.integers(20, 81)))
            )
    return rows


def make_split(split: str, out: Path, clips_per_word: int, copies: int, seed: int, workers: int) -> list[Clip]:
    """Synthesize one split, write its wavs and manifest; returns the manifest rows."""
    wav_dir = out / split / "wav"
    wav_dir.mkdir(parents=True, exist_ok=True)
    rows = plan(split, clips_per_word, seed)

    def one(row: tuple[int, str, str, str, int, int]) -> list[Clip]:
        idx, word, accent, variant, speed, pitch = row
        base = trim(synthesize(word, f"{accent}+{variant}", speed, pitch))[: int(MAX_SECONDS * SAMPLING_RATE)]
        rng = np.random.default_rng(np.random.SeedSequence((seed, SPLIT_CODE[split], idx, 1)))
        clips = []
        for c in range(copies):
            audio, shift, gain, noise = augment(base, rng)
            cid = f"{split[:2]}-{word}-{variant}-{idx:04d}-{c}"
            sf.write(wav_dir / f"{cid}.wav", audio, SAMPLING_RATE, subtype="PCM_16")
            clips.append(
                Clip(
                    cid,
                    f"wav/{cid}.wav",
                    word,
                    accent,
                    variant,
                    speed,
                    pitch,
                    round(shift, 4),
                    round(gain, 4),
                    round(noise, 5),
                    round(len(audio) / SAMPLING_RATE, 3),
                )
            )
        return clips

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(tqdm(pool.map(one, rows), total=len(rows), desc=f"synth {split}"))
    clips = [c for group in results for c in group]
    with open(out / split / "manifest.jsonl", "w") as f:
        for c in clips:
            f.write(json.dumps(asdict(c)) + "\n")
    return clips


def load_manifest(corpus: Path, split: str) -> list[dict]:
    """Read a split manifest; each row's ``path`` is relative to ``corpus/split``."""
    with open(Path(corpus) / split / "manifest.jsonl") as f:
        return [json.loads(line) for line in f]


def build(out: Path, seed: int, train_per_word: int, eval_per_word: int, copies: int, workers: int) -> dict:
    """Build all three splits from scratch (an existing ``out`` is replaced) and write ``corpus.json``."""
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    counts = {}
    for split, per_word, n_copies in (
        ("train", train_per_word, copies),
        ("validation", eval_per_word, 1),
        ("test", eval_per_word, 1),
    ):
        clips = make_split(split, out, per_word, n_copies, seed, workers)
        counts[split] = {
            "wavs": len(clips),
            "seconds": round(sum(c.seconds for c in clips), 1),
            "variants": list(VARIANTS[split]),
        }
    info = {"seed": seed, "copies": copies, "counts": counts, "synthesis_s": round(time.perf_counter() - start, 1)}
    (out / "corpus.json").write_text(json.dumps(info, indent=2))
    return info


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description="Synthesize the organism's spoken-digit corpus.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (replaced)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-word", type=int, default=80, help="base clips per digit in train")
    parser.add_argument("--eval-per-word", type=int, default=24, help="clips per digit in validation and test")
    parser.add_argument("--copies", type=int, default=4, help="augmented copies per training clip")
    parser.add_argument("--workers", type=int, default=2, help="parallel espeak/sox pipelines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    info = build(args.out, args.seed, args.train_per_word, args.eval_per_word, args.copies, args.workers)
    sys.stdout.write(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
