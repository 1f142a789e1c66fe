"""The spectral monitor's pieces without a Trainer: the detection rules and their verdicts, the
full-spectrum cadence, the interval loss, and the check's agreement between ranks."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_stability.callbacks._spectral_act import IntervalLoss
from lightning_stability.callbacks._spectral_full import FullSpectra
from lightning_stability.callbacks._spectral_policy import RECOVERED, LayerPolicy, Rules, agreed_inputs

RULES = Rules(window=8, warmup=0, growth_zscore=6.0, min_growth=5e-3, rank_collapse=0.5, alignment_threshold=0.8,
              ladder=("cap", "pss"), patience=2, cooldown=2)


def _stats(sigma: float, rank: float = 10.0, align: float = 0.1) -> dict[str, float]:
    return {"sigma_max": sigma, "stable_rank": rank, "alignment_max": align, "update_ratio": 0.01}


def _armed(embedding: bool = False) -> LayerPolicy:
    policy = LayerPolicy(embedding, RULES)
    for i, sigma in enumerate((1.0, 1.001, 1.002, 1.003)):  # slow, steady growth: healthy
        assert policy.verdict("w", _stats(sigma), 10 * i, None, False) is None
    return policy


def test_a_jump_of_sigma_max_is_sigma_growth_and_climbs_the_ladder_every_patience_detections():
    policy = _armed()
    actions = [policy.verdict("w", _stats(2.0 * 2**i), 40 + 10 * i, None, False) for i in range(3)]
    assert [(v.kind, v.action) for v in actions] == [("sigma_growth", "cap"), ("sigma_growth", "cap"),
                                                     ("sigma_growth", "pss")]
    assert actions[0].metrics["growth"] == pytest.approx(math.log(2.0 / 1.003) / 10)
    # two healthy checks (cooldown) end the incident: one recovered verdict, then nothing
    sigma = 8.0
    verdicts = [policy.verdict("w", _stats(sigma), 70 + 10 * i, None, False) for i in range(3)]
    assert [v.kind if v else None for v in verdicts] == [None, RECOVERED, None]


def test_rank_collapse_nonfinite_and_the_warning_only_rise_of_an_embedding():
    policy = _armed()
    assert policy.verdict("w", _stats(1.004, rank=4.0), 40, None, False).kind == "rank_collapse"
    assert policy.verdict("w", _stats(math.nan), 50, None, False).kind == "nonfinite_weight"
    emb = _armed(embedding=True)
    first = emb.verdict("e", _stats(1.004, rank=20.0), 40, 1.5, False)
    assert (first.kind, first.action) == ("embedding_rank_rise", None)
    assert emb.verdict("e", _stats(1.005, rank=20.0), 50, 1.5, False) is None  # once until a healthy check
    assert emb.detection == "embedding_rank_rise"
    assert _armed(embedding=True).verdict("e", _stats(1.004, rank=20.0), 40, None, False) is None  # off: no rise


def test_the_policy_state_round_trips():
    policy = _armed()
    policy.verdict("w", _stats(3.0), 40, None, False)
    again = LayerPolicy(False, RULES)
    again.load_state_dict(policy.state_dict())
    assert again.state_dict() == policy.state_dict()
    assert again.verdict("w", _stats(9.0), 50, None, False).action == policy.verdict("w", _stats(9.0), 50, None, False).action


def test_full_spectra_visit_each_layer_once_a_period_spread_over_its_steps():
    full = FullSpectra(10)
    names = [f"l{i}" for i in range(4)]
    due = {step: full.due(names, step) for step in range(20)}
    assert [n for s in range(10) for n in due[s]] == names
    assert {s for s in range(10) if due[s]} == {0, 2, 5, 7}
    assert due[12] == due[2] and FullSpectra(None).due(names, 0) == []


def test_the_interval_loss_is_the_mean_per_optimizer_step_and_round_trips():
    loss = IntervalLoss()
    for value in (1.0, 2.0, 6.0):
        loss.step_value = torch.tensor(value)
        loss.end_step()
        loss.end_step()  # a second micro-batch end of the same step adds nothing
    saved = loss.state_dict()
    assert saved == {"loss_sum": 9.0, "loss_count": 3}
    assert float(loss.take(torch.device("cpu"))) == 3.0
    assert math.isnan(float(loss.take(torch.device("cpu"))))  # the next interval is empty
    again = IntervalLoss()
    again.load_state_dict(saved)
    assert float(again.take(torch.device("cpu"))) == 3.0


def test_row_shards_agree_only_the_loss():
    stats = {"a": {"sigma_max": 2.0, "stable_rank": 3.0}}
    out, loss = agreed_inputs(stats, torch.tensor(1.5), None, torch.device("cpu"), sharded=True)
    assert out == stats and loss == 1.5
