from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from lightning_stability.ops.spikes import (
    clip_element_spikes_,
    count_element_spikes,
    element_spike_mask,
    global_grad_norm,
    scale_grads_,
)


def test_global_norm_known_answer():
    grads = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]]), torch.tensor([12.0], dtype=torch.bfloat16)]
    assert float(global_grad_norm(grads)) == 13.0


def test_global_norm_propagates_nonfinite():
    assert math.isnan(float(global_grad_norm([torch.ones(3), torch.tensor([float("nan")])])))
    assert math.isinf(float(global_grad_norm([torch.tensor([float("inf"), 1.0])])))


def test_spam_mask_rule_and_empty_history():
    g = torch.tensor([1.0, 100.0, -100.0, 5.0, 3.0])
    v = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.001])
    # theta = 5000: |g| > sqrt(5000 v) -> 70.7 for v = 1, 2.24 for v = 0.001; v == 0 is never a spike
    assert element_spike_mask(g, v, 5000.0).tolist() == [False, True, True, False, True]


def test_count_and_clip_keep_sign_and_magnitude():
    g = [torch.tensor([1.0, 100.0, -100.0]), torch.tensor([0.5, 0.5])]
    v = [torch.tensor([1.0, 1.0, 1.5]), None]
    count, checked = count_element_spikes(g, v, 5000.0)
    assert int(count) == 2 and checked == 3
    clip_element_spikes_(g, v, 5000.0)
    assert_close(g[0], torch.tensor([1.0, math.sqrt(5000.0), -math.sqrt(7500.0)]))
    assert_close(g[1], torch.tensor([0.5, 0.5]))  # no moment: untouched


def test_clip_is_idempotent_below_threshold():
    g = [torch.randn(100)]
    v = [g[0].square() * 2]  # every element far below theta * v
    before = g[0].clone()
    clip_element_spikes_(g, v, 5000.0)
    assert torch.equal(g[0], before)


def test_scale_grads_by_float_and_by_device_scalar():
    g = [torch.ones(2), torch.full((3,), 2.0)]
    scale_grads_(g, 0.5)
    assert g[0].tolist() == [0.5, 0.5] and g[1].tolist() == [1.0, 1.0, 1.0]
    scale_grads_(g, torch.tensor(4.0))
    assert g[0].tolist() == [2.0, 2.0] and g[1].tolist() == [4.0, 4.0, 4.0]


def test_foreach_count_matches_the_elementwise_rule():
    from lightning_stability.ops.spikes import chunk_by_numel

    torch.manual_seed(0)
    grads = [torch.randn(40, 30), torch.randn(7), torch.randn(3, 3, 3).to(torch.bfloat16)]
    moments = [g.float().square() * torch.rand(g.shape).pow(8) for g in grads]  # some tiny v: spikes
    moments[1][:3] = 0.0  # no history: never a spike
    grads[1][:3] = 5.0
    expected = sum(int(element_spike_mask(g, v, 50.0).sum()) for g, v in zip(grads, moments))
    count, checked = count_element_spikes(grads, moments, 50.0)
    assert expected > 0
    assert int(count) == expected and checked == 1200 + 7 + 27
    chunks = chunk_by_numel(grads, 1000)
    assert chunks == [[0], [1, 2]]
    total = sum(int(count_element_spikes([grads[i] for i in c], [moments[i] for i in c], 50.0)[0]) for c in chunks)
    assert total == expected


def test_max_spike_excess_screens_exactly_where_spikes_can_be():
    from lightning_stability.ops.spikes import max_spike_excess

    g = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
    v = [torch.tensor([1.0, 1.0]), None]
    assert float(max_spike_excess(g, v, 2.0)) == 4.0 - 2.0  # element 2: 4 - 2 * 1
    assert float(max_spike_excess(g, v, 10.0)) == 4.0 - 10.0
    assert float(max_spike_excess(g, [None, None], 10.0)) == -math.inf
    g[0][0] = float("nan")
    assert math.isnan(float(max_spike_excess(g, v, 2.0)))
