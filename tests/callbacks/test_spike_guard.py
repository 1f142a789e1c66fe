from __future__ import annotations

import math
import os
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.testing import assert_close

from lightning_stability import GradientSpikeGuard, TrainingHalted, get_event_log, read_events
from lightning_stability.demos import FaultInjector
from lightning_stability.ops.optim_state import dequantize_blockwise_8bit, second_moment
from lightning_stability.ops.spikes import global_grad_norm
from tests.conftest import make_trainer, tiny_gpt


def detections(trainer: pl.Trainer) -> list:
    return [e for e in get_event_log(trainer) if e.severity != "info"]


def opt_state_snapshot(opt: torch.optim.Optimizer) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
            for g in opt.param_groups for p in g["params"]]


class Probe(pl.Callback):
    """Records what happens at one optimizer step; attach it after the guard."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.weights_before: list[torch.Tensor] = []
        self.state_before: list[dict[str, torch.Tensor]] = []
        self.weights_after: list[torch.Tensor] = []
        self.state_after: list[dict[str, torch.Tensor]] = []
        self.grad_norm_after_guard: float | None = None
        self.grads_after_guard: list[torch.Tensor | None] = []
        self.lrs: dict[int, list[float]] = {}
        self._handle: Any = None

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]

        def record(optimizer, args, kwargs):  # registered after the guard's hook: sees the applied LR
            self.lrs[trainer.global_step] = [g["lr"] for g in optimizer.param_groups]

        self._handle = opt.register_step_pre_hook(record)

    def on_train_end(self, trainer, pl_module):
        self._handle.remove()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.weights_before = [p.detach().clone() for p in pl_module.parameters()]
            self.state_before = opt_state_snapshot(trainer.optimizers[0])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            self.grads_after_guard = [None if p.grad is None else p.grad.clone() for p in pl_module.parameters()]
            present = [g for g in self.grads_after_guard if g is not None]
            self.grad_norm_after_guard = float(global_grad_norm(present)) if present else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1 and not self.weights_after:
            self.weights_after = [p.detach().clone() for p in pl_module.parameters()]
            self.state_after = opt_state_snapshot(trainer.optimizers[0])


def fit(tmp_path, steps, faults=None, guard=None, optimizer="adamw", extra=(), seed=0, **trainer_kw):
    model, loader = tiny_gpt(steps, optimizer=optimizer, seed=seed)
    guard = guard or GradientSpikeGuard()
    trainer = make_trainer(tmp_path, steps, [FaultInjector(faults or {}), guard, *extra], **trainer_kw)
    trainer.fit(model, loader)
    return trainer, model, guard


# -- detection -------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
@pytest.mark.parametrize("seed", [0, 1])
def test_clean_run_raises_no_warning_events(tmp_path, optimizer, seed):
    trainer, _, _ = fit(tmp_path, 250, optimizer=optimizer, seed=seed)
    assert detections(trainer) == []
    kinds = [e.kind for e in get_event_log(trainer)]
    assert kinds[0] == "armed"  # the guard did run and arm itself


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        (("grad_scale", 10.0), "grad_spike"),
        (("grad_scale", 1000.0), "grad_spike"),
        (("grad_sparse", 100.0), "grad_spike"),
        (("grad_nan", None), "nonfinite"),
        (("loss_nan", None), "nonfinite"),
    ],
)
def test_fault_detected_at_its_step(tmp_path, fault, kind):
    trainer, model, _ = fit(tmp_path, 70, {55: fault})
    found = detections(trainer)
    assert [(e.step, e.kind) for e in found] == [(55, kind)]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sparse_element_spike_without_norm_spike_is_clipped_spam_style(tmp_path):
    """One element at 200x its RMS history: invisible in the global norm, caught by SPAM's rule."""
    step = 60
    target: dict[str, Any] = {}

    class OneElement(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step != step:
                return
            p = pl_module.blocks[0].mlp[0].weight
            v = second_moment(optimizer, p)
            i = int(torch.argmax(v))
            p.grad.view(-1)[i] = 200.0 * float(v.view(-1)[i].sqrt())
            target.update(index=i, v=float(v.view(-1)[i]), param=p)

    probe = Probe(step)
    model, loader = tiny_gpt(80)
    trainer = make_trainer(tmp_path, 80, [OneElement(), GradientSpikeGuard(), probe])
    trainer.fit(model, loader)
    found = detections(trainer)
    assert [(e.step, e.kind, e.action) for e in found] == [(step, "element_spike", "clip")]
    assert found[0].metrics["spike_count"] >= 1
    names = [n for n, _ in model.named_parameters()]
    g = probe.grads_after_guard[names.index("blocks.0.mlp.0.weight")]
    assert_close(float(g.view(-1)[target["index"]]), math.sqrt(5000.0 * target["v"]), rtol=1e-5, atol=0.0)


def test_corrupted_batch_is_a_loss_spike_and_is_skipped_not_clipped(tmp_path):
    # early on the model is near its unigram loss and random targets look ordinary: corrupt later
    probe = Probe(150)
    trainer, _, _ = fit(tmp_path, 152, {150: ("labels_shuffle", None)}, extra=[probe])
    (event,) = detections(trainer)
    assert (event.step, event.kind, event.action) == (150, "loss_spike", "skip")
    assert event.metrics["loss_ratio"] > 1.25
    assert all(g is None for g in probe.grads_after_guard)


# -- interventions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_skip_leaves_weights_and_optimizer_state_unchanged(tmp_path, optimizer):
    probe = Probe(50)
    guard = GradientSpikeGuard(ladder=("skip",))
    fit(tmp_path, 52, {50: ("grad_scale", 1000.0)}, guard=guard, optimizer=optimizer, extra=[probe])
    for before, after in zip(probe.weights_before, probe.weights_after):
        assert torch.equal(before, after)
    for before, after in zip(probe.state_before, probe.state_after):
        assert before.keys() == after.keys()
        for key in before:
            assert torch.equal(before[key], after[key]), key


def test_nan_never_reaches_the_weights_even_with_a_clip_only_ladder(tmp_path):
    guard = GradientSpikeGuard(ladder=("clip",))
    faults = {3: ("grad_nan", None), 20: ("loss_nan", None), 45: ("grad_nan", None)}  # before and after arming
    trainer, model, _ = fit(tmp_path, 50, faults, guard=guard)
    assert [(e.step, e.kind, e.action) for e in detections(trainer)] == [
        (3, "nonfinite", "skip"), (20, "nonfinite", "skip"), (45, "nonfinite", "skip")]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = trainer.optimizers[0].state
    assert all(torch.isfinite(t).all() for s in state.values() for t in s.values() if isinstance(t, torch.Tensor))


def test_clip_rescales_the_global_norm_to_the_spike_threshold(tmp_path):
    probe = Probe(50)
    trainer, _, _ = fit(tmp_path, 51, {50: ("grad_scale", 1000.0)}, guard=GradientSpikeGuard(ladder=("clip",)),
                        extra=[probe])
    (event,) = detections(trainer)
    assert event.action == "clip"
    assert event.metrics["grad_ratio"] > 100
    # to the largest norm that is not a spike (max(median + 6 scale, 2.5 median)), not to the median
    assert probe.grad_norm_after_guard == pytest.approx(event.metrics["grad_threshold"], rel=1e-4)
    assert event.metrics["grad_threshold"] >= 2.5 * event.metrics["grad_baseline"]


def test_reset_moments_on_bnb_8bit_decodes_to_exact_zero_then_warms_up(tmp_path):
    step = 50
    probe = Probe(step)
    guard = GradientSpikeGuard(ladder=("reset_moments",), reset_warmup=8)
    trainer, model, _ = fit(tmp_path, 62, {step: ("grad_nan", None)}, guard=guard, optimizer="adamw8bit",
                            extra=[probe])
    assert [(e.step, e.action) for e in detections(trainer)] == [(step, "reset_moments")]
    before = {i: s for i, s in enumerate(probe.state_before)}
    eight_bit = 0
    for i, st in enumerate(probe.state_after):
        if st["state1"].dtype == torch.uint8:
            eight_bit += 1
            for key, qkey, amax in (("state1", "qmap1", "absmax1"), ("state2", "qmap2", "absmax2")):
                decoded = dequantize_blockwise_8bit(st[key], st[qkey], st[amax])
                assert torch.count_nonzero(decoded) == 0
                assert torch.equal(st[qkey], before[i][qkey])  # shared code tables untouched
        else:
            assert torch.count_nonzero(st["state1"]) == 0 and torch.count_nonzero(st["state2"]) == 0
    assert eight_bit >= 1
    # the update warm-up: the applied LR ramps from 1% of the schedule's back to 100%
    sched = trainer.lr_scheduler_configs[0].scheduler
    base = sched.base_lrs[0]
    lam = sched.lr_lambdas[0]
    ratios = [probe.lrs[s][0] / (base * lam(s)) for s in range(step + 1, step + 10)]
    assert ratios[0] == pytest.approx(0.01)
    assert all(a < b for a, b in zip(ratios[:7], ratios[1:8]))
    assert ratios[8] == pytest.approx(1.0)


def test_lr_backoff_scales_then_restores_without_fighting_the_scheduler(tmp_path):
    step = 40
    probe = Probe(step)
    guard = GradientSpikeGuard(ladder=("lr_backoff",), lr_backoff_steps=5, lr_backoff_factor=0.25)
    with pytest.warns(UserWarning, match="no second moment"):
        trainer, _, _ = fit(tmp_path, 50, {step: ("grad_scale", 1000.0)}, guard=guard, optimizer="sgd",
                            extra=[probe])
    assert [(e.step, e.action) for e in detections(trainer)] == [(step, "lr_backoff")]
    sched = trainer.lr_scheduler_configs[0].scheduler
    base, lam = sched.base_lrs[0], sched.lr_lambdas[0]
    applied = {s: probe.lrs[s][0] / (base * lam(s)) for s in range(step - 1, step + 8)}
    assert applied[step - 1] == pytest.approx(1.0)
    assert [applied[s] for s in range(step + 1, step + 6)] == pytest.approx([0.25] * 5)
    assert applied[step + 6] == pytest.approx(1.0)
    # outside the step the group holds the schedule's own LR
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(base * lam(trainer.global_step))


def test_escalation_climbs_with_repetition(tmp_path):
    guard = GradientSpikeGuard(patience=2, lr_backoff_steps=2)
    faults = {s: ("grad_nan", None) for s in (40, 41, 42, 43, 44, 45)}
    trainer, _, _ = fit(tmp_path, 50, faults, guard=guard)
    assert [e.action for e in detections(trainer)] == [
        "skip", "skip", "reset_moments", "reset_moments", "lr_backoff", "lr_backoff"]


def test_halt_saves_a_checkpoint_and_stops_with_a_report(tmp_path):
    guard = GradientSpikeGuard(ladder=("halt",))
    trainer, _, _ = fit(tmp_path, 80, {40: ("grad_scale", 1000.0)}, guard=guard)
    assert trainer.global_step == 41  # the halted step ran (skipped), nothing after it
    report = guard.halt_report
    assert "step 40" in report and "gradient norm" in report and "baseline median" in report
    path = os.path.join(tmp_path, "checkpoints", "stability-halt-step=41.ckpt")
    assert os.path.isfile(path)
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["global_step"] == 41
    assert [e.kind for e in get_event_log(trainer)][-1] == "halt"


def test_halt_can_raise(tmp_path):
    guard = GradientSpikeGuard(ladder=("halt",), on_halt="raise")
    with pytest.raises(TrainingHalted, match="nonfinite"):
        fit(tmp_path, 80, {40: ("grad_nan", None)}, guard=guard)


def test_rollback_is_requested_through_the_event_log_when_someone_listens(tmp_path):
    class Responder(pl.Callback):
        def __init__(self):
            self.requests = []

        def setup(self, trainer, pl_module, stage):
            log = get_event_log(trainer)
            log.register_responder("rollback", "test")
            log.subscribe(lambda e: self.requests.append(e.step) if e.action == "rollback" else None)

    responder = Responder()
    trainer, _, _ = fit(tmp_path, 45, {40: ("grad_nan", None)}, guard=GradientSpikeGuard(ladder=("rollback", "halt")),
                        extra=[responder])
    assert responder.requests == [40]
    assert detections(trainer)[0].severity == "critical"


def test_rollback_without_responder_falls_to_next_rung(tmp_path):
    guard = GradientSpikeGuard(ladder=("rollback", "halt"))
    trainer, _, _ = fit(tmp_path, 80, {40: ("grad_nan", None)}, guard=guard)
    assert detections(trainer)[0].action == "halt"
    assert trainer.global_step == 41


# -- Lightning integration -------------------------------------------------------------------------
def test_runs_once_per_optimizer_step_under_gradient_accumulation(tmp_path):
    raw: list[float] = []
    model, loader = tiny_gpt(80)
    original = model.training_step

    def training_step(batch, batch_idx):
        loss = original(batch, batch_idx)
        raw.append(float(loss.detach()))
        return loss

    model.training_step = training_step
    guard = GradientSpikeGuard(window=64)
    trainer = make_trainer(tmp_path, 30, [guard], accumulate_grad_batches=2)
    trainer.fit(model, loader)
    window = guard._tracks[0].loss_window.values().tolist()
    assert len(window) == 30
    expected = [(raw[2 * k] + raw[2 * k + 1]) / 2 for k in range(30)]
    assert window == pytest.approx(expected, rel=1e-5)


def test_logs_metrics_and_streams_events(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    trainer, _, _ = fit(tmp_path, 60, {50: ("grad_scale", 100.0)}, logger=CSVLogger(tmp_path), log_every_n_steps=5)
    metrics = trainer.callback_metrics
    for key in ("stability/grad/norm", "stability/grad/norm_zscore", "stability/grad/spike_fraction",
                "stability/loss/zscore", "stability/events/grad_spike", "stability/events/armed"):
        assert key in metrics, key
    assert float(metrics["stability/events/grad_spike"]) == 1.0
    streamed = read_events(trainer.log_dir)
    assert [(e.step, e.kind) for e in streamed] == [(e.step, e.kind) for e in get_event_log(trainer)]


def test_multiple_optimizers_under_manual_optimization(tmp_path):
    class TwoOpt(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.a = torch.nn.Linear(8, 8)
            self.b = torch.nn.Linear(8, 1)

        def training_step(self, batch, batch_idx):
            opt_a, opt_b = self.optimizers()
            x = batch[0]
            for opt, loss in ((opt_a, self.a(x).pow(2).mean()), (opt_b, self.b(x).pow(2).mean())):
                opt.zero_grad()
                self.manual_backward(loss)
                if opt is opt_b and self.global_step == 2 * 40 + 1:
                    self.b.weight.grad[0, 0] = float("nan")
                opt.step()

        def configure_optimizers(self):
            return torch.optim.Adam(self.a.parameters(), 1e-3), torch.optim.Adam(self.b.parameters(), 1e-3)

    data = torch.utils.data.TensorDataset(torch.randn(64, 8))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    guard = GradientSpikeGuard(warmup=8)
    trainer = make_trainer(tmp_path, 100, [guard])
    trainer.fit(TwoOpt(), loader)
    assert set(guard._tracks) == {0, 1}
    assert [(e.step, e.kind) for e in detections(trainer)] == [(81, "nonfinite")]
    assert guard._tracks[1].actions == {"skip": 1} and guard._tracks[0].actions == {}
    assert "stability/grad/norm/opt1" in trainer.callback_metrics


# -- state -----------------------------------------------------------------------------------------
def test_resume_takes_the_same_decisions_as_an_uninterrupted_run(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    faults = {45: ("grad_scale", 50.0), 68: ("grad_nan", None), 70: ("loss_nan", None), 71: ("grad_nan", None),
              90: ("grad_scale", 50.0)}

    def run(root, ckpt=None):
        model, loader = tiny_gpt(100, batches=36)  # step 72 is an epoch boundary: the data resumes exactly
        guard = GradientSpikeGuard(patience=1, lr_backoff_steps=15, cooldown=10)
        saver = ModelCheckpoint(dirpath=root, every_n_train_steps=72, save_top_k=-1)
        trainer = make_trainer(root, 100, [FaultInjector(faults), guard, saver], enable_checkpointing=True)
        trainer.fit(model, loader, ckpt_path=ckpt)
        return trainer, model, guard

    full, full_model, full_guard = run(tmp_path / "full")
    # the checkpoint at step 72 lies inside an incident, during an LR back-off and an update warm-up
    ckpt = str(tmp_path / "full" / "epoch=1-step=72.ckpt")
    resumed, resumed_model, resumed_guard = run(tmp_path / "resumed", ckpt)

    key = lambda t: [(e.step, e.kind, e.action) for e in get_event_log(t)]  # noqa: E731
    assert [e.action for e in detections(full)] == ["clip", "skip", "reset_moments", "lr_backoff", "clip"]
    assert key(resumed) == key(full)
    assert resumed_guard.state_dict() == full_guard.state_dict()
    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    # and a guard that forgot its state after the restore would decide differently
    assert torch.load(ckpt, weights_only=False)["callbacks"]["GradientSpikeGuard"]["tracks"][0]["backoff_until"] == 87


def test_state_really_comes_back(tmp_path):
    trainer, _, guard = fit(tmp_path, 60, {50: ("grad_scale", 100.0)})
    state = guard.state_dict()
    fresh = GradientSpikeGuard()
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert len(fresh._tracks[0].grad_window) == len(guard._tracks[0].grad_window) > 0
    assert fresh._tracks[0].ladder.strikes == 1
    # older states without newer keys still load
    GradientSpikeGuard().load_state_dict({"tracks": {0: {"grad_window": {"values": [1.0, 2.0]}}}})


def test_several_guards_need_distinct_names(tmp_path):
    with pytest.raises(RuntimeError, match="state_key"):  # Lightning refuses colliding checkpoint keys
        make_trainer(tmp_path, 5, [GradientSpikeGuard(), GradientSpikeGuard()])
    a, b = GradientSpikeGuard(name="strict", grad_ratio=1.5), GradientSpikeGuard(name="loose")
    assert a.state_key != b.state_key
    fit(tmp_path / "ok", 10, extra=[b], guard=a)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"window": 1}, ValueError, r"window=1\): expected an int >= 2"),
        ({"window": 8.0}, TypeError, "window=8.0"),
        ({"warmup": 200, "window": 128}, ValueError, r"warmup=200, window=128\): expected warmup at most window"),
        ({"grad_zscore": -1.0}, ValueError, "grad_zscore=-1.0"),
        ({"grad_ratio": 1.0}, ValueError, "grad_ratio=1.0"),
        ({"loss_ratio": float("nan")}, ValueError, "loss_ratio=nan"),
        ({"theta": 0}, ValueError, "theta=0"),
        ({"ladder": ("clip", "pray")}, ValueError, "unknown action 'pray'"),
        ({"ladder": "skip"}, TypeError, "sequence"),
        ({"patience": 0}, ValueError, "patience=0"),
        ({"lr_backoff_factor": 1.5}, ValueError, r"lr_backoff_factor=1.5\): expected a float in \(0, 1\)"),
        ({"lr_backoff_factor": "half"}, TypeError, "lr_backoff_factor='half'"),
        ({"on_halt": "explode"}, ValueError, "on_halt='explode'"),
        ({"name": ""}, ValueError, "name=''"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradientSpikeGuard(**kwargs)


def test_fp16_loss_scaler_overflows_are_not_detections(tmp_path):
    from lightning.pytorch.plugins.precision import MixedPrecision

    # an absurd initial scale: the first ~20 steps overflow until the scaler has backed off
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**40))
    model, loader = tiny_gpt(60)
    guard = GradientSpikeGuard()
    trainer = make_trainer(tmp_path, 60, [guard], plugins=[plugin])
    trainer.fit(model, loader)
    overflows = get_event_log(trainer).filter(kind="amp_overflow")
    assert len(overflows) >= 10 and all(e.severity == "info" for e in overflows)
    assert detections(trainer) == []
    assert guard._tracks[0].ladder.strikes == 0
    # the loss baseline holds unscaled losses (a character model starts near log(vocab) ~ 3.5)
    losses = guard._tracks[0].loss_window.values()
    assert 0.5 < float(losses.max()) < 5.0


def test_incident_ends_with_a_recovered_event_after_cooldown(tmp_path):
    trainer, _, guard = fit(tmp_path, 50, {40: ("grad_nan", None)}, guard=GradientSpikeGuard(cooldown=5))
    events = [(e.step, e.kind, e.severity) for e in get_event_log(trainer) if e.kind != "armed"]
    assert events == [(40, "nonfinite", "critical"), (45, "recovered", "info")]
    assert guard._tracks[0].ladder.strikes == 0


def test_theta_none_turns_element_checks_off(tmp_path):
    class OneElement(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 45:
                p = pl_module.blocks[0].mlp[0].weight
                i = int(torch.argmax(second_moment(optimizer, p)))
                p.grad.view(-1)[i] *= 300.0

    for theta, expected in ((5000.0, ["element_spike"]), (None, [])):
        model, loader = tiny_gpt(50)
        trainer = make_trainer(tmp_path / str(theta), 50, [OneElement(), GradientSpikeGuard(theta=theta)])
        trainer.fit(model, loader)
        assert [e.kind for e in detections(trainer)] == expected


@pytest.mark.parametrize(("factor", "expected"), [(1000.0, [(10, "grad_spike", "clip")]), (10.0, [])])
def test_before_arming_only_a_wild_gradient_is_a_spike(tmp_path, factor, expected):
    trainer, model, guard = fit(tmp_path, 15, {10: ("grad_scale", factor)})
    assert not guard._tracks[0].armed
    assert [(e.step, e.kind, e.action) for e in detections(trainer)] == expected


def test_fp16_nan_appearing_after_the_scaler_looked_is_still_skipped(tmp_path):
    from lightning.pytorch.plugins.precision import MixedPrecision

    # the injector poisons the gradient after the scaler's unscale_: the scaler will not skip it
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))
    model, loader = tiny_gpt(45)
    trainer = make_trainer(tmp_path, 45, [FaultInjector({40: ("grad_nan", None)}), GradientSpikeGuard()],
                           plugins=[plugin])
    trainer.fit(model, loader)
    assert [(e.step, e.kind, e.action) for e in detections(trainer)] == [(40, "nonfinite", "skip")]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_an_exception_mid_step_leaves_the_schedulers_lr_behind(tmp_path):
    model, loader = tiny_gpt(60)
    original = model.training_step

    def training_step(batch, batch_idx):
        if model.global_step == 35:
            raise RuntimeError("boom")
        return original(batch, batch_idx)

    model.training_step = training_step
    guard = GradientSpikeGuard(ladder=("lr_backoff",), lr_backoff_factor=0.1)
    trainer = make_trainer(tmp_path, 60, [FaultInjector({33: ("grad_scale", 1000.0)}), guard])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, loader)  # raised inside optimizer.step(closure), between pre- and post-hook
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(sched.get_last_lr()[0])


def test_a_guard_reused_for_a_new_fit_starts_from_a_clean_slate(tmp_path):
    guard = GradientSpikeGuard(ladder=("lr_backoff",), lr_backoff_steps=200)
    fit(tmp_path / "a", 45, {40: ("grad_scale", 1000.0)}, guard=guard)
    assert guard._tracks[0].backoff_until > 45
    probe = Probe(0)
    trainer, _, _ = fit(tmp_path / "b", 5, guard=guard, extra=[probe])
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert probe.lrs[0][0] == pytest.approx(sched.base_lrs[0] * sched.lr_lambdas[0](0))  # no back-off carried over
    assert not guard._tracks[0].armed and detections(trainer) == []


def test_halt_applies_nothing_more_even_when_min_steps_keeps_lightning_going(tmp_path):
    guard = GradientSpikeGuard(ladder=("halt",))
    trainer, model, _ = fit(tmp_path, 80, {40: ("grad_scale", 1000.0)}, guard=guard, min_steps=60)
    ckpt = torch.load(os.path.join(tmp_path, "checkpoints", "stability-halt-step=41.ckpt"), weights_only=False)
    assert trainer.global_step >= 60  # Lightning refused to stop before its minimums
    for name, p in model.state_dict().items():
        assert torch.equal(p, ckpt["state_dict"][name]), name
    assert len(get_event_log(trainer).filter(kind="halt")) == 1


# -- do no harm: a norm whose level moves ----------------------------------------------------------
class ScaleGradients(pl.Callback):
    """Multiplies every gradient by ``factor(step)`` before the guard sees it (the loss is untouched)."""

    def __init__(self, factor) -> None:
        self.factor = factor

    def on_after_backward(self, trainer, pl_module):
        f = self.factor(trainer.global_step)
        for p in pl_module.parameters():
            if p.grad is not None:
                p.grad.mul_(f)


class BaselineProbe(pl.Callback):
    """The guard's gradient-norm baseline (the median of its window) as each step begins."""

    def __init__(self, guard: GradientSpikeGuard) -> None:
        self.guard, self.median = guard, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.median[trainer.global_step] = self.guard._tracks[0].grad_window.baseline().median


@pytest.mark.parametrize("shape", ["jump", "ramp"])
def test_a_sustained_tenfold_move_of_the_norm_enters_the_baseline_a_single_spike_never(tmp_path, shape):
    # a x1000 spike at step 45; from step 60 the norm's level is 10x: at once, or over 200 steps
    def factor(step):
        if step == 45:
            return 1000.0
        if step < 60:
            return 1.0
        return 10.0 if shape == "jump" else 10.0 ** (min(step - 60, 200) / 200)

    model, loader = tiny_gpt(360, optimizer="sgd")
    guard = GradientSpikeGuard()
    probe = BaselineProbe(guard)
    trainer = make_trainer(tmp_path, 360, [ScaleGradients(factor), guard, probe])
    trainer.fit(model, loader)
    events = detections(trainer)
    assert (events[0].step, events[0].kind, events[0].action) == (45, "grad_spike", "clip")
    assert probe.median[46] <= probe.median[45] * 1.01  # the spike did not enter the baseline
    assert {e.action for e in events} == {"clip"} and trainer.global_step == 360  # nothing skipped, no halt
    later = [e.step for e in events if e.step > 45]
    if shape == "ramp":
        assert later == []  # followed without a single detection
    else:
        # clipped while the window's median catches up, then followed: no detection in the last 200 steps
        assert later and later[0] == 60 and max(later) < 160
    assert 5.0 < probe.median[359] / probe.median[59] < 20.0


def test_recurring_spikes_that_clip_absorbs_never_climb_past_clip(tmp_path):
    # a x50 gradient every third step for 60 steps: each is clipped, the loss stays in its band
    faults = {s: ("grad_scale", 50.0) for s in range(40, 100, 3)}
    trainer, _, _ = fit(tmp_path, 110, faults)
    events = detections(trainer)
    assert [e.step for e in events] == sorted(faults) and {e.action for e in events} == {"clip"}
    assert trainer.global_step == 110


def test_recurring_bad_batches_in_a_run_that_trains_are_never_halted(tmp_path):
    # a shuffled-label batch every other step: each is a loss spike, and the loss is back in its band
    # between them; the ladder climbs while they come back as large, but stops short of rollback and halt
    faults = {s: ("labels_shuffle", None) for s in range(200, 240, 2)}
    guard = GradientSpikeGuard(patience=1)
    with pytest.warns(UserWarning, match="keeps coming back"):
        trainer, _, _ = fit(tmp_path, 250, faults, guard=guard)
    spikes = [e for e in detections(trainer) if e.kind == "loss_spike"]
    assert [e.step for e in spikes] == sorted(faults)
    assert [e.action for e in spikes][:2] == ["skip", "reset_moments"]
    assert {e.action for e in spikes} == {"skip", "reset_moments", "lr_backoff"}
    first_backoff = next(e.step for e in spikes if e.action == "lr_backoff")
    persistent = [e.step for e in get_event_log(trainer) if e.kind == "persistent_instability"]
    assert len(persistent) == 1 and persistent[0] > first_backoff  # once, when a rollback would have come
    assert trainer.global_step == 250


class _LRTimes(pl.Callback):
    """A schedule's mistake: every learning rate times ``factor`` on the ``steps`` (before the guard)."""

    def __init__(self, factor: float, steps: range) -> None:
        self.factor, self.steps, self.saved = factor, steps, None
        self.before: dict[int, list[torch.Tensor]] = {}
        self.after: dict[int, list[torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step in self.steps:
            self.saved = [g["lr"] for g in optimizer.param_groups]
            for g in optimizer.param_groups:
                g["lr"] *= self.factor
            self.before[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.saved is not None:
            for g, lr in zip(trainer.optimizers[0].param_groups, self.saved):
                g["lr"] = lr
            self.saved = None
            self.after[trainer.global_step - 1] = [p.detach().clone() for p in pl_module.parameters()]


@pytest.mark.parametrize("scheduler", ["sequential", "onecycle", "lambda", "chained"])
def test_a_learning_rate_spike_is_skipped_before_its_update_and_schedules_raise_none(tmp_path, scheduler):
    from tests.clients.models import Client, loader

    pl.seed_everything(0, verbose=False)
    spike = _LRTimes(100.0, range(45, 46))
    guard = GradientSpikeGuard()
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=60, callbacks=[spike, guard], accelerator="cpu",
                         devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(Client("llama", scheduler=scheduler, max_steps=60), loader("llama", n=8 * 60))
    lr_spikes = [e for e in get_event_log(trainer) if e.kind == "lr_spike"]
    # the schedule's own moves (warm-up, cosine, one-cycle, decay) are no spike; the x100 step is, at once
    assert [(e.step, e.action) for e in lr_spikes] == [(45, "skip")]
    assert lr_spikes[0].metrics["lr_ratio"] >= 10.0
    assert all(torch.equal(a, b) for a, b in zip(spike.before[45], spike.after[45]))  # its update never applied


def test_a_learning_rate_that_stays_up_is_a_new_level_after_patience_steps(tmp_path):
    from tests.clients.models import Client, loader

    pl.seed_everything(0, verbose=False)
    raised = _LRTimes(30.0, range(40, 60))  # a deliberate change: thirty times, from step 40 on
    guard = GradientSpikeGuard(patience=3)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=60, callbacks=[raised, guard], accelerator="cpu",
                         devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(Client("gpt2", lr=1e-4, max_steps=60), loader("gpt2", n=8 * 60))
    assert [e.step for e in get_event_log(trainer) if e.kind == "lr_spike"] == [40, 41, 42]  # then accepted
    assert not any(torch.equal(a, b) for a, b in zip(raised.before[50], raised.after[50]))  # trained at the new rate
    with pytest.raises(ValueError, match=r"GradientSpikeGuard\(lr_jump=1\): expected a finite float > 1.0"):
        GradientSpikeGuard(lr_jump=1)
    assert GradientSpikeGuard(lr_jump=None).lr_jump is None
