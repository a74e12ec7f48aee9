"""What the trainers share: right-padded batches (prompts keep their single-clip positions, only answers are labels)
and one optimizer step."""

from __future__ import annotations

import torch

from backpatch.organism._training import right_padded


def test_rows_are_right_padded_and_only_the_answer_and_its_end_are_labels():
    ids, mask, labels = right_padded([[5, 6, 7, 8], [5, 9, 8]], pad=0)
    assert ids.tolist() == [[5, 6, 7, 8], [5, 9, 8, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert labels.tolist() == [[-100, -100, 7, 8], [-100, 9, 8, -100]]
    assert ids.dtype == labels.dtype == torch.long


def test_a_multi_token_answer_is_labelled_whole():
    """smol-audio's answers are words of several tokens ('kit', 'chen'): every answer token and the end are labels."""
    ids, _mask, labels = right_padded([[5, 6, 7, 8, 9], [5, 9, 8]], pad=0, answer_lengths=[3, 2])
    assert labels.tolist() == [[-100, -100, 7, 8, 9], [-100, 9, 8, -100, -100]]


def test_optimizer_step_clips_the_gradient_norm_then_steps_optimizer_and_schedule():
    from backpatch.organism._training import optimizer_step

    weight = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([weight], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    loss = (torch.tensor([30.0, 40.0]) * weight).sum()  # gradient (30, 40), norm 50
    optimizer_step(loss, opt, sched, [weight], max_norm=1.0)
    torch.testing.assert_close(weight.detach(), torch.tensor([-0.6, -0.8]))  # clipped to norm 1, lr 1
    assert sched.last_epoch == 1 and opt.param_groups[0]["lr"] == 0.5
