"""Which positions of each row a patch acts on (DESIGN section 1: ``audio``, ``last``, ``audio+last``)."""

from __future__ import annotations

import torch


def audio_mask(input_ids: torch.Tensor, audio_token_id: int) -> torch.Tensor:
    """``[B, T]`` bool: the audio placeholder positions (the processor already expanded one per embedding)."""
    return input_ids == audio_token_id


def last_prompt_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, T]`` bool: the last real prompt token of each row, where the answer is formed.

    Generation pads on the left, so this is usually column ``T-1``; reading it off the attention mask also
    handles right padding.
    """
    batch, length = input_ids.shape
    if attention_mask is None or attention_mask.dim() != 2:
        last = torch.full((batch,), length - 1, device=input_ids.device)
    else:
        real = attention_mask.to(input_ids.device).bool()
        positions = torch.arange(length, device=input_ids.device).expand(batch, length)
        last = torch.where(real, positions, torch.full_like(positions, -1)).amax(dim=1).clamp(min=0)
    mask = torch.zeros(batch, length, dtype=torch.bool, device=input_ids.device)
    mask[torch.arange(batch, device=input_ids.device), last] = True
    return mask


def position_masks(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, audio_token_id: int, kinds: set[str]
) -> dict[str, torch.Tensor]:
    """One ``[B, T]`` mask per requested kind. Rows without audio get an all-False mask for every kind:
    no audio, no patch (DESIGN section 1), whatever ``positions`` says."""
    audio = audio_mask(input_ids, audio_token_id)
    has_audio = audio.any(dim=1, keepdim=True)
    masks: dict[str, torch.Tensor] = {}
    if "audio" in kinds:
        masks["audio"] = audio
    if kinds & {"last", "audio+last"}:
        last = last_prompt_mask(input_ids, attention_mask) & has_audio
        if "last" in kinds:
            masks["last"] = last
        if "audio+last" in kinds:
            masks["audio+last"] = audio | last
    return masks
