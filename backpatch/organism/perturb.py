"""Perturbed (stress) splits of the organisms' espeak-ng speech: how a mitigation behaves where hearing is hard.

Why: the organisms are trained on espeak-ng only, and a mitigation calibrated on clean held-out espeak voices
looked harmless there, yet on natural-sounding or unfamiliar speech it turned correct answers into audio guesses
(issue 18). Other synthesizers are kept for measuring generalization, so the stress data comes from the same
validation and test voices, degraded with sox and numpy: pitch shifts (+-200/400 cents), tempo, white noise at
several SNRs, reverb, band-limiting, and gain. Every clip gets one perturbation level, cycling through
:data:`LEVELS` in a seeded order, so each level covers every digit and voice about equally; the conflict items of a
clip carry its level in a ``perturbation`` field (``backpatch eval`` reports by it). Everything is a pure function
of (seed, split, clip id): noise comes from ``SeedSequence`` streams and sox runs with ``-R -D``.

Subcommands::

    build   {validation,test}/conflicts.jsonl (+ wav/) of perturbed clips under --out (--every-family: each clip
            once under every family)
    curve   the plain model's audio-only accuracy per perturbation level (JSON + figure), every clip x every level
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import subprocess
import sys
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from backpatch.organism.corpus import MAX_SECONDS, load_manifest, trim
from backpatch.organism.processor import SAMPLING_RATE

logger = logging.getLogger(__name__)

SPLITS = ("validation", "test")
SPLIT_CODE = {"validation": 1, "test": 2}


@dataclass(frozen=True)
class Level:
    """One perturbation at one strength: a name for reports, a family for the curve, and how to apply it."""

    name: str
    family: str
    strength: float
    #: sox effect arguments (applied first), or ()
    sox: tuple[str, ...] = ()
    #: white-noise SNR in dB (applied after sox), or None
    snr_db: float | None = None


#: the levels, mild to strong within each family (strength: the number the curve plots against)
LEVELS: tuple[Level, ...] = (
    Level("pitch-400", "pitch", -400, ("pitch", "-400")),
    Level("pitch-200", "pitch", -200, ("pitch", "-200")),
    Level("pitch+200", "pitch", 200, ("pitch", "200")),
    Level("pitch+400", "pitch", 400, ("pitch", "400")),
    Level("tempo0.8", "tempo", 0.8, ("tempo", "-s", "0.8")),
    Level("tempo1.25", "tempo", 1.25, ("tempo", "-s", "1.25")),
    Level("snr20", "noise", 20, snr_db=20),
    Level("snr10", "noise", 10, snr_db=10),
    Level("snr5", "noise", 5, snr_db=5),
    Level("snr0", "noise", 0, snr_db=0),
    Level("snr-5", "noise", -5, snr_db=-5),
    Level("reverb50", "reverb", 50, ("reverb", "50")),
    Level("reverb90", "reverb", 90, ("reverb", "90", "50", "100")),
    Level("telephone", "band", 3400, ("sinc", "300-3400")),
    Level("lowpass1k", "band", 1000, ("sinc", "-1000")),
    Level("lowpass700", "band", 700, ("sinc", "-700")),
    Level("gain-20dB", "gain", -20, ("gain", "-20")),
    Level("gain+12dB-clipped", "gain", 12, ("gain", "12")),
    # several at once: a far voice in a noisy room
    Level("pitch+400+reverb90+snr5", "combined", 1, ("pitch", "400", "reverb", "90", "50", "100"), snr_db=5),
)
LEVELS_BY_NAME = {level.name: level for level in LEVELS}
#: the families, in :data:`LEVELS` order
FAMILIES = tuple(dict.fromkeys(level.family for level in LEVELS))


def _sox(audio: np.ndarray, effects: Sequence[str]) -> np.ndarray:
    """Run sox effects on float samples (16 kHz mono in, 16 kHz mono out, 32-bit float: no clipping inside)."""
    buffer = io.BytesIO()
    sf.write(buffer, audio, SAMPLING_RATE, format="WAV", subtype="FLOAT")
    out = subprocess.run(
        ["sox", "-R", "-D", "-t", "wav", "-", "-t", "wav", "-e", "floating-point", "-b", "32", "-r",
         str(SAMPLING_RATE), "-c", "1", "-", *effects],
        input=buffer.getvalue(), check=True, capture_output=True)
    samples, rate = sf.read(io.BytesIO(out.stdout), dtype="float32")
    assert rate == SAMPLING_RATE
    return samples.reshape(-1)


def add_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """White Gaussian noise at ``snr_db`` relative to the clip's speech power (samples above 2% of the peak)."""
    loud = audio[np.abs(audio) > 0.02 * (np.abs(audio).max() + 1e-9)]
    power = float(np.mean(loud**2)) if loud.size else float(np.mean(audio**2))
    sigma = np.sqrt(power / 10 ** (snr_db / 10))
    return (audio + rng.normal(0.0, sigma, audio.shape)).astype(np.float32)


def perturb(audio: np.ndarray, level: Level, rng: np.random.Generator) -> np.ndarray:
    """``audio`` (float32, 16 kHz) under one perturbation level, clipped to [-1, 1] and cut to the 1.9-s window
    (after trimming silence, so a slowed-down word keeps its start)."""
    out = _sox(audio, level.sox) if level.sox else audio.astype(np.float32)
    if level.snr_db is not None:
        out = add_noise(out, level.snr_db, rng)
    if level.family == "tempo":
        out = trim(out)
    return np.clip(out, -1.0, 1.0)[: int(MAX_SECONDS * SAMPLING_RATE)].astype(np.float32)


def _rng(seed: int, split: str, clip_id: str, level: Level) -> np.random.Generator:
    key = zlib.crc32(f"{clip_id}/{level.name}".encode())
    return np.random.default_rng(np.random.SeedSequence((seed, SPLIT_CODE[split], key)))


def assign_levels(rows: Sequence[dict], seed: int, split: str) -> list[Level]:
    """One level per clip, the levels cycling over the clips in a seeded order (about len(rows)/len(LEVELS) each)."""
    order = np.random.default_rng(np.random.SeedSequence((seed, SPLIT_CODE[split], 99))).permutation(len(rows))
    levels: list[Level] = [LEVELS[0]] * len(rows)
    for rank, index in enumerate(order):
        levels[index] = LEVELS[rank % len(LEVELS)]
    return levels


def assign_family_levels(rows: Sequence[dict], seed: int, split: str, family: str) -> list[Level]:
    """Every clip under one family: the family's levels cycling over the clips in a seeded order of its own."""
    if family not in FAMILIES:
        raise ValueError(f"unknown perturbation family {family!r}; families: {', '.join(FAMILIES)}")
    levels = [level for level in LEVELS if level.family == family]
    salt = 100 + FAMILIES.index(family)
    order = np.random.default_rng(np.random.SeedSequence((seed, SPLIT_CODE[split], salt))).permutation(len(rows))
    out: list[Level] = [levels[0]] * len(rows)
    for rank, index in enumerate(order):
        out[index] = levels[rank % len(levels)]
    return out


def build_split(corpus: Path, out: Path, split: str, seed: int, n_conflict: int = 3,
                every_family: bool = False) -> Path:
    """Write ``out/split/conflicts.jsonl`` and its perturbed wavs; every item carries ``perturbation``.

    ``every_family``: every clip once under each family (one of its levels) instead of once in all: a no-harm
    bound per family then rests on every clip, not on the 1/7 of them that one level per clip gives a family."""
    from backpatch.organism.conflicts import make_items

    rows = load_manifest(corpus, split)
    if every_family:
        pairs = [(row, level) for family in FAMILIES
                 for row, level in zip(rows, assign_family_levels(rows, seed, split, family), strict=True)]
    else:
        pairs = list(zip(rows, assign_levels(rows, seed, split), strict=True))
    wav_dir = out / split / "wav"
    wav_dir.mkdir(parents=True, exist_ok=True)
    perturbed_rows, level_of = [], {}
    for row, level in tqdm(pairs, desc=f"perturb {split}", unit="clip"):
        audio, rate = sf.read(corpus / split / row["path"], dtype="float32")
        assert rate == SAMPLING_RATE
        clip_id = f"{row['id']}-{level.name}"
        sf.write(wav_dir / f"{clip_id}.wav", perturb(audio, level, _rng(seed, split, row["id"], level)),
                 SAMPLING_RATE, subtype="PCM_16")
        perturbed_rows.append({**row, "id": clip_id})
        level_of[f"wav/{clip_id}.wav"] = level.name
    items = make_items(perturbed_rows, seed, n_conflict)
    path = out / split / "conflicts.jsonl"
    with open(path, "w") as f:
        for item in items:
            f.write(json.dumps({**item, "perturbation": level_of[item["audio"]]}) + "\n")
    logger.info("%s: %d perturbed items from %d clips -> %s", split, len(items), len(pairs), path)
    return path


def build(corpus: Path, out: Path, seed: int, n_conflict: int = 3, every_family: bool = False) -> dict[str, Path]:
    """Both perturbed splits (validation for choices, test never used for them) and a ``perturbations.json``."""
    paths = {split: build_split(corpus, out, split, seed, n_conflict, every_family) for split in SPLITS}
    (out / "perturbations.json").write_text(json.dumps(
        {"seed": seed, "corpus": str(corpus), "every_family": every_family,
         "levels": [level.__dict__ for level in LEVELS]}, indent=1))
    return paths


# ------------------------------------------------------------------------------------------------- curve
def curve(model_dir: Path, corpus: Path, split: str, seed: int, batch_size: int = 48,
          answer: Callable | None = None) -> dict:
    """Plain audio-only accuracy (greedy first answer word) of every clip of ``split`` under every level, and on
    the clean clips: ``{"clean": acc, "levels": [{name, family, strength, acc, n}, ...]}``."""
    import torch
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    from backpatch.organism import AUDIO_ONLY_TEMPLATE
    from backpatch.organism.processor import encode, first_word

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(model_dir).eval()
    rows = load_manifest(corpus, split)
    clean = [sf.read(corpus / split / r["path"], dtype="float32")[0] for r in rows]

    @torch.no_grad()
    def accuracy(waves: list[np.ndarray]) -> float:
        hits = 0
        for i in range(0, len(waves), batch_size):
            chunk = waves[i : i + batch_size]
            inputs = encode(processor, chunk, [AUDIO_ONLY_TEMPLATE] * len(chunk))
            gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            texts = processor.batch_decode(gen[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            hits += sum(first_word(t) == r["word"] for t, r in zip(texts, rows[i : i + batch_size], strict=True))
        return round(hits / len(waves), 4)

    result = {"model": str(model_dir), "split": split, "n_clips": len(rows), "clean": accuracy(clean), "levels": []}
    for level in tqdm(LEVELS, desc=f"curve {split}", unit="level"):
        waves = [perturb(w, level, _rng(seed, split, r["id"], level)) for w, r in zip(clean, rows, strict=True)]
        result["levels"].append({"name": level.name, "family": level.family, "strength": level.strength,
                                 "audio_only_acc": accuracy(waves), "n": len(rows)})
        logger.info("%s: %s", level.name, result["levels"][-1]["audio_only_acc"])
    return result


def plot_curve(result: dict, path: Path) -> None:
    """One panel per perturbation family: audio-only accuracy against strength, the clean accuracy as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(level["family"] for level in result["levels"]))
    columns = 4
    rows = -(-len(families) // columns)
    fig, grid = plt.subplots(rows, columns, figsize=(3.0 * columns, 2.6 * rows), sharey=True, squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(families) :]:
        ax.axis("off")
    units = {"pitch": "cents", "tempo": "tempo factor", "noise": "SNR (dB)", "reverb": "reverberance (%)",
             "band": "upper cut-off (Hz)", "gain": "gain (dB)"}
    for ax, family in zip(axes, families, strict=False):
        points = sorted((r for r in result["levels"] if r["family"] == family), key=lambda r: r["strength"])
        ax.plot([r["strength"] for r in points], [r["audio_only_acc"] for r in points], "o-")
        if len(points) == 1:  # one level of its family: name it instead of a meaningless axis
            ax.set_xticks([points[0]["strength"]], [points[0]["name"]], fontsize=7)
        ax.axhline(result["clean"], color="grey", linestyle="--", linewidth=1, label="clean")
        ax.axhline(0.1, color="red", linestyle=":", linewidth=1, label="chance")
        ax.set_title(family)
        ax.set_xlabel(units.get(family, ""))
        ax.set_ylim(0, 1.02)
    for row in grid:
        row[0].set_ylabel("audio-only accuracy (plain)")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{Path(result['model']).name}: plain audio-only accuracy under perturbation "
                 f"({result['split']}, {result['n_clips']} clips per point)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    from backpatch.organism.corpus import DEFAULT_OUT as DEFAULT_CORPUS

    parser = argparse.ArgumentParser(description="Perturbed (stress) splits of the organism corpus.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write perturbed validation/test conflict sets")
    b.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--n-conflict", type=int, default=3, help="wrong claims per clip")
    b.add_argument("--every-family", action="store_true",
                   help="every clip once under each family (7x the clips): per-family no-harm bounds on every clip")
    c = sub.add_parser("curve", help="plain audio-only accuracy per perturbation level (JSON + PNG)")
    c.add_argument("--model", type=Path, required=True, help="checkpoint folder (e.g. backpatch.organism.path())")
    c.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    c.add_argument("--split", default="validation", choices=SPLITS)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", type=Path, required=True, help="JSON path; the figure goes beside it (.png)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "build":
        paths = build(args.corpus, args.out, args.seed, args.n_conflict, args.every_family)
        sys.stdout.write(json.dumps({k: str(v) for k, v in paths.items()}, indent=2) + "\n")
    else:
        import torch

        torch.set_num_threads(2)
        result = curve(args.model, args.corpus, args.split, args.seed)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        plot_curve(result, args.out.with_suffix(".png"))
        sys.stdout.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
