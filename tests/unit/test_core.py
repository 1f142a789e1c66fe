"""The shared layer's pieces on tiny inputs with known answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_stability.core.agreement import agree, combine
from lightning_stability.core.escalation import Budget, Hysteresis
from lightning_stability.core.lr_backoff import lr_owner
from lightning_stability.core.modules import find_output_head, is_output_head, output_heads
from lightning_stability.core.schedule import RoundRobin, Schedule
from lightning_stability.core.step_loss import StepLoss


# -- the step's loss --------------------------------------------------------------------------------
def test_step_loss_sums_micro_batches_once_each_and_starts_over_on_a_new_step():
    sl = StepLoss()
    a, b = torch.tensor(1.5), torch.tensor(2.5)
    sl.add(a, step=3)
    sl.add(a, step=3)  # a second consumer of the same micro-batch's loss
    sl.add(b, step=3)
    assert float(sl.value(3)) == 4.0
    assert float(sl.value(3, scale=8.0)) == 0.5  # fp16 AMP: the scale divided out
    assert sl.value(4) is None  # nothing back-propagated for step 4 yet
    sl.add(torch.tensor([1.0, 3.0]), step=4)  # a per-sample loss: its mean
    assert float(sl.value(4)) == 2.0
    assert sl.value(3) is None


# -- schedules --------------------------------------------------------------------------------------
def test_schedule_is_its_own_cadence_and_every_step_while_active():
    s = Schedule(25)
    assert [step for step in range(80) if s.due(step)] == [0, 25, 50, 75]
    assert s.due(26, active=True)
    with pytest.raises(ValueError, match="every_n=0"):
        Schedule(0)


def test_round_robin_visits_every_item_in_turn_and_resumes():
    rr = RoundRobin(5, 2)
    assert [rr.take() for _ in range(3)] == [[0, 1], [2, 3], [4, 0]]
    other = RoundRobin(5, 2)
    other.load_state_dict(rr.state_dict())
    assert other.take() == [1, 2]


# -- escalation -------------------------------------------------------------------------------------
def test_hysteresis_sets_after_patience_and_clears_cooldown_steps_after_the_last_bad_one():
    h = Hysteresis(patience=2, cooldown=10)
    assert h.observe("a", True, 0) is None  # one bad observation: not yet
    assert h.observe("a", True, 5) == "set"
    assert h.observe("a", True, 8) is None and h.is_set("a")
    assert h.observe("a", False, 17) is None  # 9 steps since the last bad one
    assert h.observe("a", False, 18) == "clear"
    assert not h.any_set
    assert h.observe("a", True, 20) is None  # patience counts afresh after a clear


def test_hysteresis_expires_keys_nobody_observes_and_round_trips():
    h = Hysteresis(patience=1, cooldown=100)
    assert h.observe("fc1", True, 10) == "set"
    restored = Hysteresis(patience=1, cooldown=100)
    restored.load_state_dict(h.state_dict())
    assert restored.expire(109) == [] and restored.expire(110) == ["fc1"]
    assert not restored.is_set("fc1")


def test_budget_counts_uses_in_a_sliding_window_of_steps():
    b = Budget(limit=2, window=100)
    assert b.spend(10) and b.spend(50)
    assert not b.spend(60)  # the third within 100 steps
    assert b.used(150) == 1  # only the use at 60 is within the window ending at 150
    assert b.spend(200)


# -- rank agreement ---------------------------------------------------------------------------------
def test_agree_combines_every_value_from_one_gather():
    calls = []

    def gather(t):  # two ranks: this one and one whose values are shifted
        calls.append(t.shape)
        return torch.stack([t, t + torch.tensor([1.0, -1.0, 2.0, 0.0])])

    out = agree({"a_max": 1.0, "b_min": torch.tensor(5.0), "c_mean": 2.0, "d_any": 0.0},
                {"a_max": "max", "b_min": "min", "c_mean": "mean", "d_any": "any"}, gather)
    assert out == {"a_max": 2.0, "b_min": 4.0, "c_mean": 3.0, "d_any": 0.0}
    assert calls == [torch.Size([4])]  # one collective for all four
    assert agree({"x": 3.0}, {"x": "max"}, None) == {"x": 3.0}  # a single process: as measured
    assert torch.isnan(combine("max", torch.tensor([1.0, float("nan")])))  # a NaN on any rank stays


# -- LR back-off ------------------------------------------------------------------------------------
def test_lr_requests_compose_by_the_smallest_factor_and_restore_exactly():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2}])
    seen = []
    owner = lr_owner(opt)
    owner.register("guard", lambda o: [0.5, 1.0])
    owner.register("rollback", lambda o: [0.1, 0.5])
    owner.register("quiet", lambda o: None)
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append([g["lr"] for g in o.param_groups]))
    opt.step()
    assert seen == [pytest.approx([0.01, 0.1])]  # the smallest per group, not the product (0.005)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]
    owner.register("bad", lambda o: [0.5])
    with pytest.raises(ValueError, match="1 factors for 2 param groups"):
        opt.step()
    for key in ("guard", "rollback", "quiet", "bad"):
        owner.unregister(key)
    assert lr_owner(opt) is not owner  # the last provider gone, its hooks went with it
    opt.step()
    assert seen[-1] == [0.1, 0.2]


# -- module discovery -------------------------------------------------------------------------------
class _Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.ModuleDict({"body": nn.Linear(4, 4), "decoder": nn.Linear(4, 8)})
        self.extra = nn.Linear(8, 8)


def test_one_head_rule_for_every_part():
    model = _Wrapped()
    modules = dict(model.named_modules())
    assert find_output_head(modules) == ("model.decoder", model.model["decoder"])  # by its leaf name
    assert output_heads(model.named_modules()) == ["model.decoder"]
    assert not is_output_head("model.decoder", nn.LayerNorm(4))  # a block named decoder is a decoder stack
    seq = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    assert output_heads(nn.ModuleDict({"body": nn.Linear(2, 4), "head": seq}).named_modules()) == ["head"]
    assert is_output_head("_orig_mod.lm_head", nn.Linear(2, 2))  # wrapper segments left out
    fc = nn.Linear(2, 2)
    assert find_output_head({"": nn.Module(), "fc": fc, "norm": nn.LayerNorm(2)}) == ("fc", fc)  # else the last linear
    with pytest.raises(ValueError, match=r"head='nope': no such module"):
        find_output_head(modules, "nope")


def test_hysteresis_trip_sets_at_once_and_clears_like_any_other():
    from lightning_stability.core.escalation import Hysteresis

    h = Hysteresis(patience=3, cooldown=5)
    assert h.trip("layer", 10) and h.is_set("layer") and not h.trip("layer", 11)
    assert h.expire(15) == [] and h.expire(16) == ["layer"]  # five steps after the last trip
    assert h.observe("layer", True, 17) is None and h.observe("layer", True, 18) is None
    assert h.observe("layer", True, 19) == "set"  # patience counts again after it cleared
