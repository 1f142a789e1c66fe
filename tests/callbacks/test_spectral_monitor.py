from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from lightning_stability import InMemoryRollback, SpectralMonitor, get_event_log
from lightning_stability.ops.spectral import as_matrix, smooth_values
from tests.conftest import MemoryLogger, make_trainer, tiny_gpt

MLP = "blocks.0.mlp.0"  # a (128, 32) weight of the tiny GPT


def _weight(pl_module: pl.LightningModule, name: str) -> torch.Tensor:
    return dict(pl_module.named_modules())[name].weight


class Tamper(pl.Callback):
    """At the end of optimizer step ``step``, changes a weight with ``fn`` (before the monitor sees it)."""

    def __init__(self, name: str, step: int, fn) -> None:
        self.name, self.step, self.fn = name, step, fn
        self.after: torch.Tensor | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step - 1 == self.step:
            w = _weight(pl_module, self.name)
            with torch.no_grad():
                w.copy_(self.fn(w.detach().clone()))
            self.after = w.detach().clone()


def _events(trainer, kind=None):
    return [e for e in get_event_log(trainer) if kind is None or e.kind == kind]


@pytest.mark.parametrize(
    ("block", "check_every"),
    [(1, 10), (4, None)],
    ids=["one-vector+residual-check", "block-no-check"],
)
def test_estimates_match_the_true_spectral_norm_and_stable_rank_after_20_steps(tmp_path, block, check_every):
    # Early in training the top singular values of square layers cross (attn.proj here at step ~10):
    # one vector per step lags behind until the residual check at step 19 adds iterations; a block
    # of 4 follows the crossing with no check at all (the first is after step 49).
    model, loader = tiny_gpt(20)
    monitor = SpectralMonitor(block=block, check_every_n_steps=check_every, full_every_n_steps=None)
    trainer = make_trainer(tmp_path, 20, [monitor], log_every_n_steps=1000)
    trainer.fit(model, loader)
    est = monitor.estimates()
    assert set(est) == {"tok_emb", "pos_emb", "blocks.0.attn.qkv", "blocks.0.attn.proj", MLP, "blocks.0.mlp.2", "lm_head"}
    for name, s in est.items():
        sv = torch.linalg.svdvals(as_matrix(_weight(model, name)).detach().double())
        assert s["sigma_max"] == pytest.approx(float(sv[0]), rel=1e-2), name
        assert s["sigma_max"] <= float(sv[0]) * (1 + 1e-5)  # a lower bound
        assert s["stable_rank"] == pytest.approx(float((sv**2).sum() / sv[0] ** 2), rel=2e-2), name
        assert 0.0 <= s["alignment"] <= 1.0
        assert 0.0 < s["update_ratio"] < 0.5


def test_update_ratio_is_the_spectral_norm_of_the_step_relative_to_the_weight(tmp_path):
    # plain SGD with a constant LR on a fixed batch: consecutive updates are alike, so the power
    # iteration on the update converges; compare with the last step's true update
    model, loader = tiny_gpt(40, optimizer="sgd", lr=0.5, batches=1)
    monitor = SpectralMonitor(full_every_n_steps=None)

    class Before(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.w = _weight(pl_module, MLP).detach().clone()

    before = Before()
    trainer = make_trainer(tmp_path, 40, [before, monitor], log_every_n_steps=1000)
    trainer.fit(model, loader)
    w = _weight(model, MLP).detach()
    true = torch.linalg.matrix_norm(w - before.w, 2) / torch.linalg.matrix_norm(w, 2)
    assert monitor.estimates()[MLP]["update_ratio"] == pytest.approx(float(true), rel=0.05)


def test_logged_metric_names(tmp_path):
    model, loader = tiny_gpt(10)
    monitor = SpectralMonitor(full_every_n_steps=None)
    logger = MemoryLogger()
    trainer = make_trainer(tmp_path, 10, [monitor], log_every_n_steps=5, logger=logger)
    trainer.fit(model, loader)
    # logging steps only, at the step Lightning logs the batch's own metrics at
    steps = {step for step, metrics in logger.records if any(k.startswith("stability/spectral/") for k in metrics)}
    assert steps == {4, 9}
    logged = logger.metrics_at(9)
    assert "train/loss" in logged  # the model's own metric, beside ours at the same step
    for stat in ("sigma_max", "stable_rank", "update_ratio", "alignment"):
        assert f"stability/spectral/{MLP}/{stat}" in logged
        assert f"stability/spectral/lm_head/{stat}" in logged
    sigma = logged[f"stability/spectral/{MLP}/sigma_max"]
    assert sigma == pytest.approx(float(torch.linalg.matrix_norm(_weight(model, MLP).detach(), 2)), rel=1e-2)


def test_include_and_exclude_select_layers(tmp_path):
    model, loader = tiny_gpt(3)
    monitor = SpectralMonitor(include=["blocks.*"], exclude=["*.attn.proj"], full_every_n_steps=None)
    make_trainer(tmp_path, 3, [monitor]).fit(model, loader)
    assert monitor.layer_names == ["blocks.0.attn.qkv", MLP, "blocks.0.mlp.2"]


def test_no_host_reads_outside_checks_and_logging_steps(tmp_path, monkeypatch):
    """Between checks and logging steps the monitor keeps everything on the device: no .item(),
    .tolist(), float() or bool() of a tensor in its per-step hooks (on a GPU each would be a host sync)."""
    reads = []
    model, loader = tiny_gpt(30)
    monitor = SpectralMonitor(check_every_n_steps=15, full_every_n_steps=None)
    checks = []
    original_check = monitor._check

    def counting_check(trainer, step):
        checks.append(step)
        return original_check(trainer, step)

    monkeypatch.setattr(monitor, "_check", counting_check)

    def wrap(hook_name):
        hook = getattr(monitor, hook_name)

        def wrapped(trainer, *args):
            before = len(checks)
            with _counting_host_reads(reads) as n:
                hook(trainer, *args)
            logging = hook_name == "on_train_batch_end" and trainer.global_step % 10 == 0  # after steps 9, 19, 29
            if len(checks) == before and not logging:  # neither a check nor a logging step
                assert n[0] == 0, f"{hook_name} read the device at step {trainer.global_step}"

        monkeypatch.setattr(monitor, hook_name, wrapped)

    for hook_name in ("on_before_backward", "on_before_optimizer_step", "on_train_batch_end"):
        wrap(hook_name)
    trainer = make_trainer(tmp_path, 30, [monitor], log_every_n_steps=10)
    trainer.fit(model, loader)
    assert checks == [14, 29]  # its own cadence, not the logger's


class _counting_host_reads:
    def __init__(self, reads):
        self.reads = reads
        self.n = [0]

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__float__", "__bool__", "cpu")}
        n = self.n

        def counter(original):
            def f(self_tensor, *args, **kwargs):
                n[0] += 1
                return original(self_tensor, *args, **kwargs)

            return f

        for name, original in self.saved.items():
            setattr(torch.Tensor, name, counter(original))
        return self.n

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)


def _mlp_bump(scale: float = 3.0, seed: int = 1) -> Tamper:
    """At step 120, a rank-one bump of the MLP weight along a fixed direction, ``scale`` times its
    spectral norm: sigma_max of that layer jumps."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(128, generator=g), torch.randn(32, generator=g)
    return Tamper(MLP, 120, lambda w: w + scale * torch.outer(a / a.norm(), b / b.norm()) * torch.linalg.matrix_norm(w, 2))


def test_cap_sets_the_top_singular_value_and_leaves_the_rest(tmp_path):
    model, loader = tiny_gpt(130)
    bump = _mlp_bump()
    monitor = SpectralMonitor(check_every_n_steps=1, warmup=100, ladder=("cap",), full_every_n_steps=None)
    trainer = make_trainer(tmp_path, 121, [bump, monitor])
    trainer.fit(model, loader)
    caps = _events(trainer, "sigma_growth")
    assert [(e.step, e.action, e.target) for e in caps] == [(121, "cap", MLP)]  # nothing before: no false alarm
    after = _weight(model, MLP).detach()
    sv_before = torch.linalg.svdvals(bump.after.double())
    sv_after = torch.linalg.svdvals(after.double())
    cap = caps[0].metrics["sigma_after"]
    assert caps[0].metrics["sigma_before"] == pytest.approx(float(sv_before[0]), rel=1e-3)
    assert cap < float(sv_before[0]) / 2
    # the top value became the cap, every other one stayed where it was
    expected = torch.sort(torch.cat([torch.tensor([cap], dtype=torch.float64), sv_before[1:]]), descending=True).values
    torch.testing.assert_close(sv_after, expected, rtol=1e-4, atol=1e-4)


def test_pss_smooths_the_top_values_and_leaves_the_lower_spectrum(tmp_path):
    model, loader = tiny_gpt(130)
    bump = _mlp_bump(scale=5.0, seed=2)
    monitor = SpectralMonitor(check_every_n_steps=1, warmup=100, ladder=("pss",), pss_max_k=2, full_every_n_steps=None)
    trainer = make_trainer(tmp_path, 121, [bump, monitor])
    trainer.fit(model, loader)
    (event,) = _events(trainer, "sigma_growth")
    assert event.action == "pss" and event.target == MLP
    k = int(event.metrics["k"])
    assert 1 <= k <= 2
    sv_before = torch.linalg.svdvals(bump.after.double())
    sv_after = torch.linalg.svdvals(_weight(model, MLP).detach().double())
    torch.testing.assert_close(sv_after[k:], sv_before[k:], rtol=1e-3, atol=1e-4)
    expected_top = smooth_values(sv_before[:k], sv_before[k], "log")
    torch.testing.assert_close(sv_after[:k], expected_top, rtol=1e-3, atol=1e-4)
    assert event.metrics["sigma_after"] == pytest.approx(float(expected_top[0]), rel=1e-3)


def test_clip_updates_bounds_the_layer_updates_until_the_incident_ends(tmp_path):
    model, loader = tiny_gpt(140)
    bump = Tamper(MLP, 120, lambda w: 4.0 * w)
    monitor = SpectralMonitor(check_every_n_steps=1, warmup=100, ladder=("clip_updates",), update_clip=1.0,
                              cooldown=100, full_every_n_steps=None)

    class Step(pl.Callback):
        def __init__(self):
            self.ratios = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.w = _weight(pl_module, MLP).detach().clone()
            self.lr = optimizer.param_groups[0]["lr"]  # the scheduler steps before on_train_batch_end

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            d = (_weight(pl_module, MLP).detach() - self.w) / self.lr
            self.ratios[trainer.global_step - 1] = float(torch.linalg.matrix_norm(d, 2))

    probe = Step()
    trainer = make_trainer(tmp_path, 130, [probe, bump, monitor])
    trainer.fit(model, loader)
    (event,) = _events(trainer, "sigma_growth")
    assert event.action == "clip_updates" and event.step == 121
    assert MLP in monitor._act.clip_on
    # soft clip: every singular value s -> s / sqrt(1 + s^2/c^2) < c
    assert max(probe.ratios[s] for s in range(122, 130)) < 1.0
    assert min(probe.ratios[s] for s in range(105, 120)) > 1.0  # the clip bites: unclipped updates are larger
    # the fit is over: the optimizer's hooks are gone, the state still says the clip is on
    assert MLP not in monitor._act.clippers
    assert not trainer.optimizers[0]._optimizer_step_pre_hooks
    assert monitor.state_dict()["layers"][MLP]["clip_updates"]


def test_a_failed_intervention_asks_for_a_rollback(tmp_path):
    model, loader = tiny_gpt(140)
    bump = _mlp_bump()
    ruin = Tamper("lm_head", 125, lambda w: 40.0 * torch.randn_like(w))  # the loss gets much worse after the cap
    monitor = SpectralMonitor(check_every_n_steps=5, warmup=100, ladder=("cap",), full_every_n_steps=None)
    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=5)
    trainer = make_trainer(tmp_path, 130, [bump, ruin, monitor, rollback])
    trainer.fit(model, loader)
    (cap,) = [e for e in _events(trainer, "sigma_growth") if e.target == MLP]
    assert cap.action == "cap" and cap.step == 125  # the check of steps 120..124
    (failed,) = _events(trainer, "intervention_failed")
    assert failed.step == 130 and failed.action == "rollback" and failed.severity == "critical"
    assert failed.metrics["loss_after"] > failed.metrics["loss_before"] * 1.1
    (rolled,) = _events(trainer, "rollback")
    assert rolled.step == 130
    # restored to the snapshot of step 30, before the bump and the ruin
    assert torch.linalg.matrix_norm(_weight(model, "lm_head").detach(), 2) < 20


def test_embedding_rank_rise_warns_under_low_precision_only(tmp_path):
    flatten = Tamper("tok_emb", 120, lambda w: torch.randn_like(w) * w.std())
    for precision, expected in (("bf16-mixed", ["embedding_rank_rise"]), ("32-true", [])):
        model, loader = tiny_gpt(130)
        # a trained embedding has a few strong directions; random rows flatten its spectrum
        with torch.no_grad():
            model.tok_emb.weight.copy_(torch.randn(26, 1) @ torch.randn(1, 32) * 3 + 0.1 * torch.randn(26, 32))
        monitor = SpectralMonitor(check_every_n_steps=1, warmup=100, include=["tok_emb"], full_every_n_steps=None)
        trainer = make_trainer(tmp_path / precision, 122, [flatten, monitor], precision=precision)
        trainer.fit(model, loader)
        kinds = [e.kind for e in _events(trainer) if e.kind == "embedding_rank_rise"]
        assert kinds == expected, precision
        for e in _events(trainer, "embedding_rank_rise"):
            assert e.action is None and e.severity == "warning"


def test_full_spectrum_round_robin(tmp_path, monkeypatch):
    from lightning_stability.callbacks._spectral_full import FullSpectra

    model, loader = tiny_gpt(20)
    monitor = SpectralMonitor(full_every_n_steps=10)
    per_step: dict[int, list[str]] = {}
    original = FullSpectra.run

    def spy(full, trainer, tracker, step):
        before = {n: full.results.get(n) for n in monitor.layer_names}
        original(full, trainer, tracker, step)
        per_step[step] = [n for n in monitor.layer_names if full.results.get(n) != before[n]]

    monkeypatch.setattr(FullSpectra, "run", spy)
    trainer = make_trainer(tmp_path, 10, [monitor], logger=pl.loggers.TensorBoardLogger(tmp_path, name="tb"))
    trainer.fit(model, loader)
    analysed = [n for step in sorted(per_step) for n in per_step[step]]
    assert sorted(analysed) == sorted(monitor.layer_names)  # every layer once in the period
    assert max(len(v) for v in per_step.values()) == 1  # 7 layers over 10 steps: one at a time
    from lightning_stability.ops.spectral import analyze_spectrum

    last = monitor._full.results["lm_head"]  # the last layer analysed, at step 8; weights moved once since
    assert last["alpha"] > 1 and last["n"] == 26
    ref = analyze_spectrum(_weight(model, "lm_head").detach())
    assert last["sigma_max"] == pytest.approx(ref.sigma_max, rel=0.05)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    assert "stability/spectral/lm_head/singular_values" in acc.Tags()["histograms"]
    assert "stability/spectral/lm_head/alpha" in acc.Tags()["scalars"]


def test_state_round_trips_and_resume_continues_exactly(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(root, ckpt=None):
        model, loader = tiny_gpt(40, batches=20)  # step 20 is an epoch boundary: the data resumes exactly
        monitor = SpectralMonitor(check_every_n_steps=5, warmup=0, full_every_n_steps=None)
        saver = ModelCheckpoint(dirpath=root, every_n_train_steps=20, save_top_k=-1)
        trainer = make_trainer(root, 40, [monitor, saver], enable_checkpointing=True)
        trainer.fit(model, loader, ckpt_path=ckpt)
        return monitor, model

    straight, straight_model = run(tmp_path / "full")
    resumed, resumed_model = run(tmp_path / "resumed", str(tmp_path / "full" / "epoch=0-step=20.ckpt"))
    for p, q in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a["layers"].keys() == b["layers"].keys()
    for name in a["layers"]:
        for key in ("basis", "u", "v", "du", "dv"):
            assert torch.equal(a["layers"][name][key], b["layers"][name][key]), f"{name} {key}"
        assert a["layers"][name]["rank"]["values"] == b["layers"][name]["rank"]["values"]
        assert len(a["layers"][name]["rank"]["values"]) == 8  # the checks of both halves
    assert straight.estimates() == resumed.estimates()  # the update estimate went on, too

    fresh = SpectralMonitor()
    fresh.load_state_dict(a)
    assert fresh.state_dict()["layers"].keys() == a["layers"].keys()
    assert not math.isnan(fresh.state_dict()["last_loss"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, r"every_n_steps=0\): expected an int >= 1"),
        ({"tol": -1.0}, r"tol=-1.0\): expected a finite float > 0"),
        ({"ladder": ("cap", "skip")}, r"unknown action 'skip'"),
        ({"rank_collapse": 1.5}, r"rank_collapse=1.5\): expected a float in \(0, 1\)"),
        ({"alignment_threshold": 0.0}, r"alignment_threshold=0.0\): expected a float in \(0, 1\]"),
        ({"pss_fn": "tanh"}, r"pss_fn='tanh'\): expected 'log' or 'clip'"),
        ({"embedding_rank_rise": 0.9}, r"embedding_rank_rise=0.9\): expected a finite float > 1.0"),
        ({"warmup": -1}, r"warmup=-1\): expected an int >= 0"),
        ({"include": "blocks.*"}, r"include='blocks.\*'\): expected a sequence"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SpectralMonitor(**kwargs)


def _grouping(monkeypatch, merge: bool) -> None:
    """Every weight of the tiny GPT in one zero-padded stack, or one stack per shape."""
    import lightning_stability.ops.spectral_stack as stack

    monkeypatch.setattr(stack, "MERGE_RATIO", 1e9 if merge else 3.0)
    monkeypatch.setattr(stack, "MERGE_MAX_ELEMENTS", 1 << 30 if merge else 0)


def _capped_fit(root):
    model, loader = tiny_gpt(124)
    bump = _mlp_bump()
    monitor = SpectralMonitor(check_every_n_steps=1, warmup=100, ladder=("cap",), full_every_n_steps=None)
    trainer = make_trainer(root, 124, [bump, monitor])
    trainer.fit(model, loader)
    return monitor, model, _events(trainer)


def test_a_padded_stack_measures_and_caps_as_stacks_of_one_shape(tmp_path, monkeypatch):
    # Zero padding keeps every nonzero singular value and the top pair: one stack of all seven
    # weights ((7, 128, 128), the (32, 128) weight among (n, 32) ones) gives what five stacks do.
    _grouping(monkeypatch, merge=False)
    apart, apart_model, apart_events = _capped_fit(tmp_path / "apart")
    _grouping(monkeypatch, merge=True)
    merged, merged_model, merged_events = _capped_fit(tmp_path / "merged")
    assert len(apart._tracker.groups) == 6 and not any(g.padded for g in apart._tracker.groups)
    assert len(merged._tracker.groups) == 1 and merged._tracker.groups[0].padded and merged._tracker.groups[0]._weights.shape == (7, 128, 128)

    assert [(e.step, e.kind, e.action, e.target) for e in merged_events] == [
        (e.step, e.kind, e.action, e.target) for e in apart_events
    ]
    (cap,) = [e for e in merged_events if e.action == "cap"]
    (ref,) = [e for e in apart_events if e.action == "cap"]
    assert cap.target == MLP
    for key in ("sigma_before", "sigma_after", "stable_rank", "growth"):
        assert cap.metrics[key] == pytest.approx(ref.metrics[key], rel=1e-4), key
    for p, q in zip(merged_model.parameters(), apart_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    a, b = merged.estimates(), apart.estimates()
    assert a.keys() == b.keys()
    for name in a:
        for key in ("sigma_max", "stable_rank", "update_ratio", "alignment", "alignment_max"):
            assert a[name][key] == pytest.approx(b[name][key], rel=1e-3, abs=1e-6), f"{name} {key}"
    sa, sb = merged.state_dict()["layers"], apart.state_dict()["layers"]
    for name in sa:
        for key in ("u", "v", "basis"):  # at each layer's own size, not the padded one
            assert sa[name][key].shape == sb[name][key].shape, f"{name} {key}"
            torch.testing.assert_close(sa[name][key], sb[name][key], rtol=1e-3, atol=1e-4)
    # the padding stayed zero
    g = merged._tracker.groups[0]
    for b_, (m, n) in enumerate(g.sizes):
        assert not g.u[b_, m:].any() and not g.v[b_, n:].any() and not g.du[b_, m:].any() and not g.dv[b_, n:].any()


def test_a_padded_stack_saves_at_true_shapes_and_resumes_exactly(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import ModelCheckpoint

    _grouping(monkeypatch, merge=True)

    def run(root, ckpt=None):
        model, loader = tiny_gpt(30, batches=15)  # step 15 is an epoch boundary: the data resumes exactly
        monitor = SpectralMonitor(check_every_n_steps=5, warmup=0, full_every_n_steps=None)
        saver = ModelCheckpoint(dirpath=root, every_n_train_steps=15, save_top_k=-1)
        trainer = make_trainer(root, 30, [monitor, saver], enable_checkpointing=True)
        trainer.fit(model, loader, ckpt_path=ckpt)
        return monitor

    straight = run(tmp_path / "full")
    assert len(straight._tracker.groups) == 1 and straight._tracker.groups[0].padded
    ckpt = str(tmp_path / "full" / "epoch=0-step=15.ckpt")
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if "SpectralMonitor" in k]
    assert state["layers"]["blocks.0.mlp.2"]["u"].shape == (32,)  # (32, 128): its own m and n
    assert state["layers"]["blocks.0.mlp.2"]["v"].shape == (128,)
    assert state["layers"]["tok_emb"]["probes"][0].shape == (26,)
    resumed = run(tmp_path / "resumed", ckpt)
    a, b = straight.state_dict()["layers"], resumed.state_dict()["layers"]
    for name in a:
        for key in ("basis", "u", "v", "du", "dv", "du_next", "dv_next"):
            assert torch.equal(a[name][key], b[name][key]), f"{name} {key}"
    assert straight.estimates() == resumed.estimates()  # the update estimate went on, too

    # the same checkpoint resumes into one stack per shape (and so do those written before merging)
    _grouping(monkeypatch, merge=False)
    apart = run(tmp_path / "apart", ckpt)
    assert len(apart._tracker.groups) == 6
    for name, s in apart.estimates().items():
        assert s["sigma_max"] == pytest.approx(straight.estimates()[name]["sigma_max"], rel=1e-4), name


def test_a_padded_stack_recovers_after_a_nan_weight_is_rolled_back(tmp_path):
    # the tiny GPT's weights share a zero-padded stack; a NaN weight turns the padded entries of the
    # vectors NaN too, and the rollback restores only each layer's own entries: unless the padding is
    # cleared, every later check sees a non-finite sigma and asks for rollbacks until the budget halts
    from lightning_stability import GradientSpikeGuard
    from lightning_stability.demos import FaultInjector, TinyGPT, make_dataloader

    pl.seed_everything(0, verbose=False)
    loader, ds = make_dataloader(block_size=16, batch_size=8, n_samples=8 * 60, seed=0)
    model = TinyGPT(len(ds.vocab), block_size=16, d_model=32, n_layer=1, n_head=2, max_steps=40, warmup_steps=10)
    monitor = SpectralMonitor(check_every_n_steps=5)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path),
        callbacks=[FaultInjector({12: ("weight_nan", None)}), GradientSpikeGuard(), monitor,
                   InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=3, rollback_on_nonfinite_loss=False)],
    )
    trainer.fit(model, loader)
    assert any(g.padded for g in monitor._tracker.groups)
    events = [(e.step, e.kind) for e in get_event_log(trainer)]
    assert [s for s, k in events if k == "nonfinite_weight"] == [15]
    assert [s for s, k in events if k == "rollback"] == [15]
    assert "rollback_halt" not in {k for _, k in events}
    assert trainer.global_step == 40 and all(torch.isfinite(p).all() for p in model.parameters())
    assert all(math.isfinite(s["sigma_max"]) for s in monitor.estimates().values())


def test_the_loss_check_after_an_intervention_judges_the_same_loss_on_every_rank(tmp_path):
    # Each rank's loss is its own data's (10x apart here). The check after the cap compared this
    # rank's loss before it with the rank mean after it: rank 0 (loss 1x, mean 5.5x) asked for a
    # rollback alone, whose collectives would then run on one rank.
    from tests.callbacks._two_ranks import run_two_ranks

    ranks = run_two_ranks("ddp_spectral_loss_script.py", tmp_path)
    assert ranks[0]["events"] == ranks[1]["events"]
    kinds = [(e[0], e[1], e[2]) for e in ranks[0]["events"]]
    assert (35, "sigma_growth", "cap") in kinds
    assert not [k for k in kinds if k[1] == "intervention_failed"]
    assert ranks[0]["last_loss"] == ranks[1]["last_loss"]  # the rank mean, on both


def test_intervention_failed_decides_from_the_losses_it_is_given():
    from lightning_stability.callbacks.spectral_monitor import intervention_failed

    assert intervention_failed(None, 5.0, 0.1) is None  # nothing being judged
    assert intervention_failed(2.0, 2.1, 0.1) is None
    assert intervention_failed(2.0, 2.3, 0.1) == {"loss_before": 2.0, "loss_after": 2.3}
    assert intervention_failed(2.0, math.nan, 0.1) is not None
    # per-rank losses (1.0 and 10.0 before, the same after): judged alone, rank 0 fails and rank 1
    # passes; judged on the rank mean, as the monitor now does, both take one decision
    before, after = [1.0, 10.0], [1.5, 10.5]
    assert [intervention_failed(b, sum(after) / 2, 0.1) is None for b in before] == [False, True]
    mean_before = sum(before) / 2
    assert [intervention_failed(mean_before, sum(after) / 2, 0.1) is None for _ in before] == [True, True]


def _agree_fake(per_rank_losses, per_rank_ranks=(3.0, 3.0)):
    """The check's agreement on a fake two-rank gather that stacks the ranks' tensors."""
    from lightning_stability.callbacks._spectral_policy import agreed_inputs

    def stats(rank):
        return {"a": {"sigma_max": 2.0 + rank, "stable_rank": per_rank_ranks[rank]}}

    def values(rank):  # each rank's vector as agree packs it: keys in sorted order (a/sigma_max, a/stable_rank, loss)
        return torch.tensor([2.0 + rank, per_rank_ranks[rank], per_rank_losses[rank]], dtype=torch.float64)

    gather = lambda t: torch.stack([values(0), values(1)])  # noqa: E731
    return [agreed_inputs(stats(rank), torch.tensor(per_rank_losses[rank]), gather, torch.device("cpu"))
            for rank in (0, 1)]


def test_the_ranks_agree_on_one_loss_at_a_check():
    (s0, l0), (s1, l1) = _agree_fake([1.0, 10.0], per_rank_ranks=(3.0, 1.5))
    # the worst rank's statistics: the largest sigma_max, the smallest stable rank
    assert l0 == l1 == 5.5 and s0 == s1 == {"a": {"sigma_max": 3.0, "stable_rank": 1.5}}
    (_, l0), (_, l1) = _agree_fake([1.0, math.nan])  # a NaN loss on one rank is non-finite on both
    assert math.isnan(l0) and math.isnan(l1)


def test_at_its_defaults_the_monitor_observes_and_advises_the_remedy_to_opt_into(tmp_path):
    # docs/benchmarks.md: cap and PSS rescued 0 of 6 blow-ups, so nothing edits weights by default
    from lightning_stability.callbacks.spectral_monitor import ADVICE

    def run(root, monitor):
        model, loader = tiny_gpt(124)
        trainer = make_trainer(root, 124, [_mlp_bump()] + ([monitor] if monitor else []))
        trainer.fit(model, loader)
        return model, trainer

    monitor = SpectralMonitor(check_every_n_steps=1, warmup=100, full_every_n_steps=None)
    with pytest.warns(UserWarning, match=r"opt in: SpectralMonitor\(ladder=\('clip_updates', 'rollback'\)\)"):
        watched, trainer = run(tmp_path / "watched", monitor)
    plain, _ = run(tmp_path / "plain", None)
    for p, q in zip(watched.parameters(), plain.parameters()):
        assert torch.equal(p, q)  # training exactly as without the monitor
    growth = _events(trainer, "sigma_growth")
    assert [(e.step, e.action, e.target) for e in growth] == [(121, None, MLP)]
    (advice,) = _events(trainer, "spectral_advice")
    assert (advice.step, advice.severity, advice.action, advice.target) == (121, "info", None, MLP)
    assert "SpectralUpdateClip(optimizer, c=3.0)" in ADVICE and "ladder=('cap', 'pss')" in ADVICE


@pytest.mark.parametrize(("precision", "accumulate"), [("fp16-scaler", 1), ("32-true", 2)])
def test_the_loss_the_monitor_judges_is_the_unscaled_loss_per_optimizer_step(tmp_path, precision, accumulate):
    # Under 16-mixed Lightning scales the loss before on_before_backward sees it (x65536 here), and
    # divides it by accumulate_grad_batches: the monitor's interval loss must be neither.
    from lightning.pytorch.plugins.precision import MixedPrecision

    kw = {"accumulate_grad_batches": accumulate}
    if precision == "fp16-scaler":  # CPU 16-mixed has no GradScaler of its own: give it one
        kw["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]

    class Losses(pl.Callback):
        def __init__(self):
            self.per_step: dict[int, float] = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            with torch.no_grad():
                loss = float(pl_module.training_step(batch, batch_idx))  # the model's own, unscaled, whole
            step = batch_idx // accumulate  # one epoch: the micro-batches of each optimizer step in order
            self.per_step[step] = self.per_step.get(step, 0.0) + loss / accumulate

    model, loader = tiny_gpt(10 * accumulate)
    losses = Losses()
    monitor = SpectralMonitor(check_every_n_steps=5, full_every_n_steps=None)
    trainer = make_trainer(tmp_path, 10, [losses, monitor], **kw)
    trainer.fit(model, loader)
    if precision == "fp16-scaler":
        assert trainer.precision_plugin.scaler.get_scale() > 1000  # the loss on_before_backward sees is huge
    expected = sum(losses.per_step[s] for s in range(5, 10)) / 5  # the check of steps 5..9
    assert monitor.state_dict()["last_loss"] == pytest.approx(expected, rel=2e-2)


def test_a_detection_step_is_logged_whatever_log_every_n_steps_says(tmp_path):
    model, loader = tiny_gpt(40)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(128, generator=g), torch.randn(32, generator=g)
    bump = Tamper(MLP, 23, lambda w: w + 5 * torch.outer(a / a.norm(), b / b.norm()) * torch.linalg.matrix_norm(w, 2))
    logger = MemoryLogger()
    monitor = SpectralMonitor(check_every_n_steps=1, warmup=15, full_every_n_steps=None)
    trainer = make_trainer(tmp_path, 40, [bump, monitor], log_every_n_steps=50, logger=logger)
    trainer.fit(model, loader)
    detections = {e.step - 1: e for e in _events(trainer, "sigma_growth") if e.target == MLP}  # the checked step
    assert 23 in detections
    steps = {step for step, metrics in logger.records if any(k.startswith("stability/spectral/") for k in metrics)}
    detected_steps = {e.step - 1 for e in get_event_log(trainer) if e.severity != "info"}
    assert 23 in steps and steps <= detected_steps  # no logging step falls within 40 steps at 50
    logged = logger.metrics_at(23)[f"stability/spectral/{MLP}/sigma_max"]
    assert logged == pytest.approx(detections[23].metrics["sigma_max"], rel=1e-6)


def test_a_window_shorter_than_the_armed_history_still_arms(tmp_path):
    # window=2 (allowed) kept at most 2 checks, and detections needed 3: they never armed
    model, loader = tiny_gpt(124)
    monitor = SpectralMonitor(check_every_n_steps=1, warmup=100, window=2, ladder=("cap",), full_every_n_steps=None)
    trainer = make_trainer(tmp_path, 122, [_mlp_bump(), monitor])
    trainer.fit(model, loader)
    assert (121, "cap", MLP) in [(e.step, e.action, e.target) for e in _events(trainer, "sigma_growth")]


def test_the_logging_cadence_does_not_change_what_is_detected_or_done(tmp_path):
    # Checks follow their own schedule (every 50 steps by default), not log_every_n_steps: logging
    # every step or every 7 steps detects the same bump at the same check and caps it alike.
    def run(root, log_every):
        model, loader = tiny_gpt(200)
        bump = Tamper(MLP, 170, lambda w: 4.0 * w)
        monitor = SpectralMonitor(warmup=100, ladder=("cap",), full_every_n_steps=None)
        trainer = make_trainer(root, 200, [bump, monitor], log_every_n_steps=log_every, logger=MemoryLogger())
        trainer.fit(model, loader)
        decided = [(e.step, e.kind, e.action, e.target) for e in _events(trainer) if e.severity != "info"]
        return decided, model, trainer

    every, every_model, trainer = run(tmp_path / "every", 1)
    sparse, sparse_model, _ = run(tmp_path / "sparse", 7)
    assert (200, "sigma_growth", "cap", MLP) in every  # the check after step 199 saw the bump of step 170
    assert sparse == every
    for p, q in zip(every_model.parameters(), sparse_model.parameters()):
        assert torch.equal(p, q)
    logged = {step for step, metrics in trainer.loggers[0].records if f"stability/spectral/{MLP}/sigma_max" in metrics}
    assert logged == set(range(200))  # logging every step writes every step, checks or not


class _Around(pl.Callback):
    """The MLP weight at the end of optimizer step ``step``: placed before the monitor, as its check
    finds it (and the interventions pending then); after it, as the check left it."""

    def __init__(self, monitor: SpectralMonitor, step: int) -> None:
        self.monitor, self.step = monitor, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step - 1 == self.step:
            self.w = _weight(pl_module, MLP).detach().clone()
            self.trials = dict(self.monitor._act.trials)


def test_a_cap_that_training_undoes_is_reverted_and_not_repeated_in_the_incident(tmp_path):
    """The cap at 121 brings sigma_max down; a second bump takes it above where it was when it was
    capped: the cap did not move its statistic the right way (the loss is left out of it here). It is
    subtracted again at the next check, the rest of the training since kept, and the incident's next
    detections get no second cap."""
    model, loader = tiny_gpt(140)
    monitor = SpectralMonitor(check_every_n_steps=1, warmup=100, ladder=("cap",), cooldown=50, loss_tolerance=1e9,
                              full_every_n_steps=None)
    before, after = _Around(monitor, 121), _Around(monitor, 121)  # the check of step 121 (events carry 122)
    trainer = make_trainer(tmp_path, 124, [_mlp_bump(), Tamper(MLP, 121, lambda w: 6.0 * w), before, monitor, after])
    trainer.fit(model, loader)
    growth = [(e.step, e.action) for e in _events(trainer, "sigma_growth") if e.target == MLP]
    assert growth[0] == (121, "cap") and all(action is None for _, action in growth[1:])  # never capped again
    (reverted,) = _events(trainer, "intervention_reverted")
    assert (reverted.step, reverted.action, reverted.target) == (122, "revert_cap", MLP)
    assert reverted.metrics["sigma_now"] >= reverted.metrics["sigma_then"]
    (trial,) = before.trials.values()
    u, c, v = trial.edit
    assert trial.action == "cap" and float(c[0]) < 0  # the cap had lowered the top value
    torch.testing.assert_close(after.w, before.w - (u * c) @ v.T, rtol=0, atol=1e-6)
    assert monitor._policy[MLP].ladder.failed == {"cap"}


def test_a_clip_of_updates_under_which_the_layer_keeps_growing_is_stopped(tmp_path):
    model, loader = tiny_gpt(140)
    monitor = SpectralMonitor(check_every_n_steps=1, warmup=100, ladder=("clip_updates",), cooldown=50,
                              loss_tolerance=1e9, full_every_n_steps=None)
    trainer = make_trainer(tmp_path, 124, [_mlp_bump(), Tamper(MLP, 121, lambda w: 2.0 * w), monitor])
    trainer.fit(model, loader)
    assert [(e.step, e.action) for e in _events(trainer, "sigma_growth") if e.target == MLP][0] == (121, "clip_updates")
    (reverted,) = _events(trainer, "intervention_reverted")
    assert (reverted.step, reverted.action) == (122, "revert_clip_updates")
    assert reverted.metrics["sigma_now"] > 1.5 * reverted.metrics["sigma_then"]
    assert MLP not in monitor._act.clip_on and not trainer.optimizers[0]._optimizer_step_pre_hooks
    later = [e.action for e in _events(trainer) if e.target == MLP and e.step > 122 and e.kind != "intervention_reverted"]
    assert "clip_updates" not in later


def test_a_pending_intervention_survives_save_and_resume(tmp_path):
    model, loader = tiny_gpt(140)
    monitor = SpectralMonitor(check_every_n_steps=1, warmup=100, ladder=("pss",), full_every_n_steps=None)
    trainer = make_trainer(tmp_path, 121, [_mlp_bump(), monitor])
    trainer.fit(model, loader)
    state = monitor.state_dict()
    ((name, saved),) = state["trials"].items()
    assert name == MLP and saved["action"] == "pss" and saved["step"] == 120  # the check of step 120
    fresh = SpectralMonitor(check_every_n_steps=1, warmup=100, ladder=("pss",), full_every_n_steps=None)
    fresh.load_state_dict(state)
    (trial,) = fresh._act.trials.values()
    for a, b in zip(trial.edit, monitor._act.trials[MLP].edit):
        assert torch.equal(a, b.cpu())
    assert fresh.state_dict()["trials"][MLP]["sigma"] == saved["sigma"]
