"""Right-padded training batches that the organisms' trainers share (the answer tokens are the only labels)."""

from __future__ import annotations

import torch


def right_padded(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` for token lists that each end in ``<answer> <eos>``.

    Right padding keeps every prompt at the positions it has at inference for a single clip; labels are -100
    except on the last two real tokens of each row, so the loss teaches the answer and its end, never the prompt.
    """
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), pad)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    labels = torch.full((len(seqs), n), -100)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
        labels[b, len(s) - 2 : len(s)] = ids[b, len(s) - 2 : len(s)]
    return ids, mask, labels
