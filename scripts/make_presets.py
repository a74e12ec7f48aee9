"""Write the bundled presets for real checkpoints from one table and one rule.

README "Presets" > "Bundled presets": the uncalibrated `presets/*.yaml` and their table.

Uncalibrated presets for real models all follow the same documented rule (README, "Bundled presets"), so
that none of them pretends to be tuned: for a text decoder of N layers,

    source = round(0.9 N), target = round(N / 2), mode add, scale 0.05, positions audio

(``backpatch.methods.backpatching.uncalibrated_patch``; derived from both organisms' calibrations and measured to do
no harm on both test splits by scripts/uncalibrated_rule.py).

The facts (layer counts, audio token) come from each checkpoint's config as recorded in `SOURCE`; numbers we
could not check against the checkpoint's own config.json are marked "unverified" in the description, and
`wrap()` checks num_layers against the loaded model, so a wrong count fails loudly instead of patching the
wrong layers. Run: python scripts/make_presets.py  (tests/test_bundled_presets.py checks the files are current)
"""

from __future__ import annotations

from pathlib import Path

from backpatch import AudioSpan, Calibration, Match, ModelFacts, Preset
from backpatch.methods.backpatching import uncalibrated_patch

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"

# name: (title, model_type, name glob, layers path, num_layers, audio_span, source of the layer count/token)
CHECKPOINTS: dict[str, tuple[str, str, str, str, int, AudioSpan, str]] = {
    "qwen2-audio-7b-instruct": (
        "Qwen2-Audio 7B Instruct", "qwen2_audio", "*qwen2-audio-7b*", "model.language_model.layers", 32,
        AudioSpan(config="audio_token_index"),
        "its config.json sets audio_token_index 151646 and leaves text_config.num_hidden_layers at the Qwen2 "
        "default of 32"),
    "qwen2.5-omni-7b": (
        "Qwen2.5-Omni 7B (full model; text from .thinker)", "qwen2_5_omni", "*qwen2.5-omni-7b*",
        "thinker.model.language_model.layers", 28, AudioSpan(config="thinker_config.audio_token_index"),
        "28 layers of the Qwen2.5-7B thinker (Qwen2_5OmniTextConfig defaults, documented as the 7B); audio token "
        "151646"),
    "qwen2.5-omni-7b-thinker": (
        "Qwen2.5-Omni 7B, thinker class loaded alone", "qwen2_5_omni_thinker", "*qwen2.5-omni-7b*",
        "model.language_model.layers", 28, AudioSpan(config="audio_token_index"),
        "28 layers of the Qwen2.5-7B thinker (Qwen2_5OmniTextConfig defaults, documented as the 7B)"),
    "qwen2.5-omni-3b": (
        "Qwen2.5-Omni 3B (full model; text from .thinker)", "qwen2_5_omni", "*qwen2.5-omni-3b*",
        "thinker.model.language_model.layers", 36, AudioSpan(config="thinker_config.audio_token_index"),
        "36 layers of the Qwen2.5-3B backbone; unverified against the checkpoint's own config.json"),
    "qwen2.5-omni-3b-thinker": (
        "Qwen2.5-Omni 3B, thinker class loaded alone", "qwen2_5_omni_thinker", "*qwen2.5-omni-3b*",
        "model.language_model.layers", 36, AudioSpan(config="audio_token_index"),
        "36 layers of the Qwen2.5-3B backbone; unverified against the checkpoint's own config.json"),
    "qwen3-omni-30b-a3b": (
        "Qwen3-Omni 30B-A3B (full model; text from .thinker)", "qwen3_omni_moe", "*qwen3-omni-30b-a3b*",
        "thinker.model.language_model.layers", 48, AudioSpan(config="thinker_config.audio_token_id"),
        "copies of its config.json: thinker text_config.num_hidden_layers 48, audio_token_id 151675 (the "
        "transformers defaults, 28 and 151646, do not match this checkpoint)"),
    "qwen3-omni-30b-a3b-thinker": (
        "Qwen3-Omni 30B-A3B, thinker class loaded alone", "qwen3_omni_moe_thinker", "*qwen3-omni-30b-a3b*",
        "model.language_model.layers", 48, AudioSpan(config="audio_token_id"),
        "copies of its config.json: text_config.num_hidden_layers 48, audio_token_id 151675"),
    "voxtral-mini-3b": (
        "Voxtral Mini 3B (2507)", "voxtral", "*voxtral-mini-3b*", "model.language_model.layers", 30,
        AudioSpan(config="audio_token_id"),
        "30 layers (VoxtralConfig text defaults mirror Mini-3B); audio token 24 (transformers conversion script)"),
    "voxtral-small-24b": (
        "Voxtral Small 24B (2507)", "voxtral", "*voxtral-small-24b*", "model.language_model.layers", 40,
        AudioSpan(config="audio_token_id"),
        "40 layers of the Mistral-Small-24B backbone; unverified against the checkpoint's own config.json"),
    "audio-flamingo-3": (
        "Audio Flamingo 3 (HF format)", "audioflamingo3", "*audio-flamingo-3*", "model.language_model.layers", 28,
        AudioSpan(config="audio_token_id"),
        "28 layers of its Qwen2.5-7B LLM (the conversion script takes the original llm/config.json); audio token "
        "151669; the layer count is derived, not read from the HF config.json"),
    "music-flamingo": (
        "Music Flamingo (HF format)", "musicflamingo", "*music-flamingo*", "model.language_model.layers", 28,
        AudioSpan(config="audio_token_id"),
        "transformers conversion script builds Qwen2Config(num_hidden_layers=28); audio token <sound> 151669"),
    "granite-speech-3.3-8b": (
        "Granite Speech 3.3 8B", "granite_speech", "*granite-speech-3.3-8b*", "model.language_model.layers", 40,
        AudioSpan(config="audio_token_index"),
        "40 layers of granite-3.3-8b-instruct; unverified against the checkpoint's own config.json. The real "
        "checkpoint carries a LoRA adapter for audio turns (needs peft)"),
    "granite-speech-3.3-2b": (
        "Granite Speech 3.3 2B", "granite_speech", "*granite-speech-3.3-2b*", "model.language_model.layers", 40,
        AudioSpan(config="audio_token_index"),
        "40 layers of granite-3.3-2b-instruct; unverified against the checkpoint's own config.json. The real "
        "checkpoint carries a LoRA adapter for audio turns (needs peft)"),
    "phi-4-multimodal": (
        "Phi-4-multimodal-instruct", "phi4_multimodal", "*phi-4-multimodal*", "model.layers", 32,
        AudioSpan(config="audio_config.audio_token_id"),
        "Phi4MultimodalConfig defaults, documented as this checkpoint: 32 layers; audio token 200011 in "
        "audio_config"),
    "glm-asr": (
        "GLM-ASR Nano (2512)", "glmasr", "*glm-asr*", "model.language_model.layers", 28,
        AudioSpan(config="audio_token_id"),
        "GlmAsrConfig text defaults for this checkpoint: 28 layers; audio token 59260"),
    "gemma-3n-e2b": (
        "Gemma 3n E2B", "gemma3n", "*gemma-3n-e2b*", "model.language_model.layers", 30,
        AudioSpan(config="audio_token_id"),
        "transformers conversion script, gemma3n_e2b variant: 30 layers (the last 10 share K/V); audio token "
        "262273"),
    "gemma-3n-e4b": (
        "Gemma 3n E4B", "gemma3n", "*gemma-3n-e4b*", "model.language_model.layers", 35,
        AudioSpan(config="audio_token_id"),
        "transformers conversion script, gemma3n_e4b variant: 35 layers (the last 15 share K/V); audio token "
        "262273"),
}


def build(name: str) -> Preset:
    title, model_type, glob, layers, num_layers, span, source = CHECKPOINTS[name]
    patch = uncalibrated_patch(num_layers)
    description = (
        f"{title}. {num_layers} decoder layers: {source}. Uncalibrated: the gentle default rule (source "
        f"round(0.9N) = {patch.source}, target round(N/2) = {patch.target}, add, scale {patch.scale:g}, audio "
        "positions), measured to do no harm on the project's two model organisms but not tuned for this model; "
        "calibrate on your own conflict set (`backpatch calibrate`) before relying on it."
    )
    return Preset(
        name=name, description=description, match=Match(model_type=model_type, name_or_path=glob),
        model=ModelFacts(layers=layers, num_layers=num_layers), audio_span=span, patches=[patch],
        calibration=Calibration(status="uncalibrated"),
    )


def main() -> None:
    for name in CHECKPOINTS:
        build(name).to_yaml(PRESETS_DIR / f"{name}.yaml")


if __name__ == "__main__":
    main()
