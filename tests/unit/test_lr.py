from __future__ import annotations

import pytest
import torch

from lightning_stability.ops.lr import restore_lr, scale_lr_for_step


def _opt():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    return torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2}])


def test_two_components_scaling_one_step_compose_and_restore_exactly():
    opt = _opt()
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: scale_lr_for_step(o, [0.5, 1.0]))
    opt.register_step_pre_hook(lambda o, a, k: scale_lr_for_step(o, [0.1, 0.5]))
    opt.register_step_pre_hook(lambda o, a, k: seen.append([g["lr"] for g in o.param_groups]))
    opt.register_step_post_hook(lambda o, a, k: restore_lr(o))
    opt.register_step_post_hook(lambda o, a, k: restore_lr(o))
    opt.step()
    assert seen == [pytest.approx([0.005, 0.1])]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]


def test_restore_without_scale_is_a_no_op_and_factor_count_is_checked():
    opt = _opt()
    restore_lr(opt)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]
    with pytest.raises(ValueError, match="one factor per param group"):
        scale_lr_for_step(opt, [0.5])
