"""Tiny random-init models built from configs (no hub), and inputs with audio spans, for the tests."""

from __future__ import annotations

import torch
from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

AUDIO_TOKEN = 7
AUDIO_BOS, AUDIO_EOS, PAD, EOS = 5, 6, 0, 1
VOCAB = 64
MEL_FRAMES = 40  # 2 * max_source_positions
NUM_LAYERS = 6


def tiny_qwen2_audio(seed: int = 0, num_layers: int = NUM_LAYERS) -> Qwen2AudioForConditionalGeneration:
    torch.manual_seed(seed)
    config = Qwen2AudioConfig(
        audio_config=dict(
            d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
            num_mel_bins=16, max_source_positions=MEL_FRAMES // 2,
        ),
        text_config=dict(
            model_type="qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS,
        ),
        audio_token_index=AUDIO_TOKEN,
    )
    model = Qwen2AudioForConditionalGeneration(config).eval()
    # Random init gives near-flat logits; sharpen them so that greedy tokens differ when states differ.
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None  # generate the full max_new_tokens in tests
    return model


def audio_tokens_for_frames(frames: int) -> int:
    """Qwen2-Audio: conv stride 2 then avg-pool 2 (Qwen2AudioEncoder._get_feat_extract_output_lengths)."""
    after_conv = (frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def make_row(seed: int, frames: int | None, text_len: int = 5) -> dict:
    """One prompt: [audio_bos, AUDIO x n, audio_eos, text...]; frames=None gives a text-only row."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(10, VOCAB, (text_len,), generator=g).tolist()
    if frames is None:
        return {"ids": [AUDIO_BOS + 20] + text, "features": None, "frames": 0}
    n = audio_tokens_for_frames(frames)
    features = torch.randn(16, MEL_FRAMES, generator=g)
    return {"ids": [AUDIO_BOS] + [AUDIO_TOKEN] * n + [AUDIO_EOS] + text, "features": features, "frames": frames}


def collate(rows: list[dict]) -> dict:
    """Left-padded batch in the layout the Qwen2-Audio processor produces."""
    length = max(len(r["ids"]) for r in rows)
    input_ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, length - len(r["ids"]):] = torch.tensor(r["ids"])
        attention_mask[i, length - len(r["ids"]):] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    audio_rows = [r for r in rows if r["features"] is not None]
    if audio_rows:
        batch["input_features"] = torch.stack([r["features"] for r in audio_rows])
        fam = torch.zeros((len(audio_rows), MEL_FRAMES), dtype=torch.long)
        for i, r in enumerate(audio_rows):
            fam[i, : r["frames"]] = 1
        batch["feature_attention_mask"] = fam
    return batch


def tiny_checkpoint(directory, seed: int = 0, num_layers: int = NUM_LAYERS):
    """Save a tiny random Qwen2-Audio with a real, locally built processor, like a hub checkpoint."""
    model, processor = tiny_with_processor(seed, num_layers)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor


def tiny_with_processor(seed: int = 0, num_layers: int = NUM_LAYERS):
    """A tiny random Qwen2-Audio whose vocabulary and audio token match the organism's processor."""
    from backpatch.organism.processor import build_processor

    processor = build_processor()
    tokenizer = processor.tokenizer
    torch.manual_seed(seed)
    config = Qwen2AudioConfig(
        audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                          num_mel_bins=80, max_source_positions=100),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id),
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )
    model = Qwen2AudioForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def write_tone(path, seconds: float = 0.8, rate: int = 16000, freq: float = 440.0) -> None:
    import numpy as np
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * freq * t)).astype("float32"), rate)


def tiny_conflict_set(directory, n_clips: int = 4):
    """A small conflict set in DESIGN section 4 format: per clip 2 conflicts, 1 consistent, 1 audio-only."""
    import json
    from pathlib import Path

    from backpatch.organism import AUDIO_ONLY_TEMPLATE, CLAIM_TEMPLATE, DIGITS

    directory = Path(directory)
    (directory / "wav").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_clips):
        word = DIGITS[i % 10]
        write_tone(directory / "wav" / f"c{i}.wav", seconds=0.5 + 0.1 * i, freq=300 + 50 * i)
        wrong = [DIGITS[(i + 3) % 10], DIGITS[(i + 6) % 10]]
        for k, claim in enumerate(wrong):
            rows.append({"id": f"c{i}-x{k}", "audio": f"wav/c{i}.wav", "prompt": CLAIM_TEMPLATE.format(claim=claim),
                         "audio_answer": word, "text_answer": claim, "kind": "conflict"})
        rows.append({"id": f"c{i}-s", "audio": f"wav/c{i}.wav", "prompt": CLAIM_TEMPLATE.format(claim=word),
                     "audio_answer": word, "text_answer": word, "kind": "consistent"})
        rows.append({"id": f"c{i}-a", "audio": f"wav/c{i}.wav", "prompt": AUDIO_ONLY_TEMPLATE,
                     "audio_answer": word, "text_answer": None, "kind": "audio_only"})
    path = directory / "conflicts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
