"""The trainers' shared right-padded batches: prompts keep their single-clip positions, only answers are labels."""

from __future__ import annotations

import torch

from backpatch.organism._batching import right_padded


def test_rows_are_right_padded_and_only_the_answer_and_its_end_are_labels():
    ids, mask, labels = right_padded([[5, 6, 7, 8], [5, 9, 8]], pad=0)
    assert ids.tolist() == [[5, 6, 7, 8], [5, 9, 8, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert labels.tolist() == [[-100, -100, 7, 8], [-100, 9, 8, -100]]
    assert ids.dtype == labels.dtype == torch.long
