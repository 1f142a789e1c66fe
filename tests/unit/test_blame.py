from __future__ import annotations

import math

import pytest
import torch

from lightning_stability.ops.blame import rank_layers


def test_layers_rank_by_their_norm_against_their_own_last_healthy_one():
    # "big" has the largest norm but moved x2; "small" moved x1000: small is the spike's layer
    before = torch.tensor([10.0, 0.001, 1.0, 2.0])
    now = torch.tensor([20.0, 1.0, 1.0, 2.2])
    ranked = rank_layers(now, before, ["big", "small", "same", "bit"], top=3)
    assert [b.name for b in ranked] == ["small", "big", "bit"]
    assert ranked[0].ratio == pytest.approx(1000.0) and ranked[0].norm == pytest.approx(1.0)
    assert ranked[1].ratio == pytest.approx(2.0)


def test_a_non_finite_norm_ranks_first_and_without_a_reference_the_norm_decides():
    ranked = rank_layers(torch.tensor([5.0, float("nan"), 50.0]), torch.ones(3), ["a", "b", "c"], top=2)
    assert [b.name for b in ranked] == ["b", "c"] and math.isnan(ranked[0].norm)
    ranked = rank_layers(torch.tensor([5.0, 1.0, 50.0]), None, ["a", "b", "c"], top=5)
    assert [b.name for b in ranked] == ["c", "a", "b"] and all(math.isnan(b.ratio) for b in ranked)
    # a layer whose gradient was zero before and is not now: an infinite ratio, first
    ranked = rank_layers(torch.tensor([5.0, 1.0]), torch.tensor([5.0, 0.0]), ["a", "b"])
    assert ranked[0].name == "b" and ranked[0].ratio == math.inf


def test_the_names_must_match_the_norms():
    with pytest.raises(ValueError, match="3 norms for 2 names"):
        rank_layers(torch.ones(3), None, ["a", "b"])
