"""What the organisms' trainers share: right-padded batches (the answer tokens are the only labels) and one
optimizer step."""

from __future__ import annotations

import torch


def right_padded(seqs: list[list[int]], pad: int, answer_lengths: list[int] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` for token lists that each end in ``<answer> <eos>``.

    Right padding keeps every prompt at the positions it has at inference for a single clip; labels are -100
    except on the last ``answer_lengths[b]`` real tokens of row ``b`` (default 2: a one-token answer and its end), so
    the loss teaches the answer and its end, never the prompt.
    """
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), pad)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    labels = torch.full((len(seqs), n), -100)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
        k = answer_lengths[b] if answer_lengths is not None else 2
        labels[b, len(s) - k : len(s)] = ids[b, len(s) - k : len(s)]
    return ids, mask, labels


@torch.no_grad()
def row_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's mean next-token loss over its labelled tokens (the batch loss is their token-weighted mean): which
    task is still being learned is invisible in the batch mean."""
    shifted = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted.flatten(),
                                            ignore_index=-100, reduction="none").view(shifted.shape)
    counted = (shifted != -100).sum(1).clamp(min=1)
    return nll.sum(1) / counted


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched, params, max_norm: float = 1.0) -> None:
    """Backward, clip the gradient norm of ``params`` to ``max_norm``, step the optimizer and the schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()
    sched.step()
