from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_stability import get_event_log
from lightning_stability.demos import TinyGPT
from lightning_stability.ops.fp8 import E4M3, quantize
from lightning_stability.plugins.fp8 import EmulatedFP8Linear, FP8Precision
from tests.conftest import MemoryLogger, make_trainer, tiny_gpt


def _converted(model, **kw):
    plugin = FP8Precision(backend="emulated", **kw)
    plugin.convert_module(model)
    return plugin


def test_conversion_keeps_the_ends_the_head_odd_shapes_and_keep_patterns():
    model = TinyGPT(40, block_size=16, d_model=32, n_layer=2, n_head=2)  # every block linear has an FP8 shape
    model.blocks[1].odd = nn.Linear(20, 24)
    weight = model.blocks[0].attn.proj.weight
    plugin = _converted(model, keep=["*.mlp.2"])
    assert plugin.converted_layers == ["blocks.0.attn.proj", "blocks.0.mlp.0", "blocks.1.attn.qkv",
                                       "blocks.1.attn.proj", "blocks.1.mlp.0"]
    assert plugin.skipped_layers == {
        "blocks.0.attn.qkv": "first or last linear layer (keep_first_last=True)",
        "blocks.0.mlp.2": "matches keep pattern '*.mlp.2'",
        "blocks.1.mlp.2": "matches keep pattern '*.mlp.2'",
        "blocks.1.odd": "in_features=20 is not divisible by 16",
        "lm_head": "output head (kept in high precision)",
    }
    proj = model.blocks[0].attn.proj
    assert isinstance(proj, EmulatedFP8Linear) and proj.weight is weight  # the optimizer's tensors stay
    assert proj.weight.dtype == torch.float32  # float32 master weights
    assert type(model.lm_head) is nn.Linear
    assert "blocks.0.attn.proj.amax_history" in dict(model.named_buffers())


def test_emulated_layer_matches_the_fp8_formula_with_delayed_scaling():
    torch.manual_seed(0)
    lin = EmulatedFP8Linear(16, 8, amax_history_len=4)
    x1, x2 = torch.randn(8, 16), torch.randn(8, 16) * 3
    y1 = lin(x1)
    # first call: scale 1 (nothing recorded yet), as Transformer Engine's first step
    torch.testing.assert_close(y1, F.linear(quantize(x1, 1.0, E4M3), quantize(lin.weight.detach(), 1.0, E4M3), lin.bias))
    # second call: the scales from the first call's amaxes
    sx = 448 / x1.abs().max()
    sw = 448 / lin.weight.detach().abs().max()
    y2 = lin(x2)
    ref = F.linear(quantize(x2, sx, E4M3), quantize(lin.weight.detach(), sw, E4M3), lin.bias)
    torch.testing.assert_close(y2, ref)
    assert float(lin.amax_history[0, 0]) == float(x2.abs().max())
    assert float(lin.amax_history[1, 0]) == float(x1.abs().max())
    # any token count: the emulator has no GEMM tile rule (TE's multiple of 8 applies only where TE runs)
    x3 = torch.randn(1, 5, 16)
    s3 = (448 / torch.maximum(x1.abs().max(), x2.abs().max()), 448 / lin.weight.detach().abs().max())
    torch.testing.assert_close(lin(x3), F.linear(quantize(x3, s3[0], E4M3), quantize(lin.weight.detach(), s3[1], E4M3),
                                                 lin.bias))


class _Jump(pl.Callback):
    """Multiplies one layer's weight at a given step: its delayed FP8 scale is then far too large."""

    def __init__(self, step, path, factor=1000.0):
        self.step, self.path, self.factor = step, path, factor

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.get_submodule(self.path).weight.mul_(self.factor)


def test_fit_logs_health_and_a_layer_that_overflows_falls_back_then_retries(tmp_path):
    model, loader = tiny_gpt(12)  # one block: attn.proj, mlp.0 and mlp.2 are converted
    # a 10% overflow limit: the first steps' growing gradients saturate a few values at their delayed
    # scale (TE's delayed scaling does the same) and must not count here
    plugin = FP8Precision(backend="emulated", health_every_n_steps=1, patience=1, cooldown=4, overflow_limit=0.1)
    logger = MemoryLogger()
    trainer = make_trainer(tmp_path, 12, [_Jump(5, "blocks.0.mlp.0")], plugins=[plugin], logger=logger,
                           log_every_n_steps=1)
    trainer.fit(model, loader)
    assert plugin.converted_layers == ["blocks.0.attn.proj", "blocks.0.mlp.0", "blocks.0.mlp.2"]
    logged = {k for _, m in logger.records for k in m}
    for role in ("input", "weight", "grad"):
        for key in ("amax", "scale", "headroom", "overflow_frac", "underflow_frac", "snr_db"):
            assert f"stability/fp8/blocks.0.attn.proj/{role}/{key}" in logged
    events = [e for e in get_event_log(trainer) if e.source == "FP8Precision"]
    fallbacks = [e for e in events if e.kind == "fp8_fallback"]
    # the jumped layer first (its weights saturate at the stale scale), then the layers its 1000x larger
    # outputs and gradients reach; nothing before the jump
    assert fallbacks[0].target == "blocks.0.mlp.0" and fallbacks[0].step == 5  # the step of the jump
    assert fallbacks[0].metrics["overflow_frac"] > 0.5
    assert {e.action for e in fallbacks} == {"bf16:health"} and all(e.step >= 5 for e in fallbacks)
    retries = [e for e in events if e.kind == "fp8_retry"]
    assert retries and retries[0].target == "blocks.0.mlp.0" and retries[0].step == fallbacks[0].step + 4
    # the run before the jump had no overflow anywhere
    first = next(m for _, m in logger.records if "stability/fp8/blocks.0.mlp.0/overflow_frac" in m)
    assert first["stability/fp8/blocks.0.mlp.0/overflow_frac"] == 0.0
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())


def test_nonfinite_amax_and_an_event_naming_a_layer_make_it_fall_back(tmp_path):
    model, loader = tiny_gpt(3)
    plugin = FP8Precision(backend="emulated", health_every_n_steps=1, cooldown=100)

    class Trouble(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:  # another callback names a layer
                get_event_log(trainer).emit(1, "spectral_spike", "SpectralMonitor", "warning", {}, None,
                                            "blocks.0.attn.proj")

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            pass

    trainer = make_trainer(tmp_path, 3, [Trouble()], plugins=[plugin])
    trainer.fit(model, loader)
    assert plugin.fallback_layers == ["blocks.0.attn.proj"]
    (event,) = [e for e in get_event_log(trainer) if e.kind == "fp8_fallback"]
    assert event.action == "bf16:event"
    # a non-finite input: its amax is not finite
    lin = model.blocks[0].mlp[0]
    lin.health_due = True
    lin.train()
    x = torch.randn(8, 32)
    x[0, 0] = float("inf")
    lin(x)
    assert not torch.isfinite(lin.health["input"]["amax"])


def test_state_round_trips_with_the_model(tmp_path):
    model, loader = tiny_gpt(8)
    plugin = FP8Precision(backend="emulated", health_every_n_steps=1, patience=1, cooldown=100, overflow_limit=0.1)
    trainer = make_trainer(tmp_path, 8, [_Jump(3, "blocks.0.mlp.0")], plugins=[plugin])
    trainer.fit(model, loader)
    for name in plugin.converted_layers:  # every layer fell back and reset: give each a state of its own
        model.get_submodule(name).amax_history.uniform_()
        model.get_submodule(name).scale.uniform_()
    state = plugin.state_dict()
    assert "blocks.0.mlp.0" in state["fallback"] and state["layers"]["blocks.0.mlp.0"]["until"] > 8
    fresh_model, _ = tiny_gpt(8)
    fresh = FP8Precision(backend="emulated")
    fresh.convert_module(fresh_model)
    # the module's state_dict holds the weights only: the scaling state is the plugin's
    assert set(model.state_dict()) == set(tiny_gpt(8)[0].state_dict())
    fresh_model.load_state_dict(model.state_dict())
    assert all(float(fresh_model.get_submodule(n).amax_history.abs().sum()) == 0 for n in fresh.converted_layers)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["layers"] == state["layers"] and fresh.fallback_layers == state["fallback"]
    assert set(state["scaling"]) == set(fresh.converted_layers)
    for name in fresh.converted_layers:
        for key in ("amax_history", "scale"):
            assert torch.equal(getattr(fresh_model.get_submodule(name), key), getattr(model.get_submodule(name), key))
    fresh.load_state_dict({})  # an empty state must not crash


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"backend": "xla"}, "backend='xla'"),
        ({"recipe": "block"}, "recipe='block'.*block-scaled recipes need Transformer Engine"),
        ({"recipe": "mxfp8", "backend": "emulated"}, "SM>=10.0"),
        ({"fp8_format": "e5m2"}, "fp8_format"),
        ({"amax_history_len": 0}, "amax_history_len"),
        ({"overflow_limit": 2.0}, "overflow_limit"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FP8Precision(**kwargs)


class _Losses(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_emulated_fp8_trains_like_float32_and_coarser_formats_drift_further(tmp_path):
    from lightning_stability.ops.fp8 import FP8Format

    finals = {}
    for name, plugins in [
        ("fp32", []),
        ("fp8", [FP8Precision(backend="emulated")]),
        ("e3m1", [FP8Precision(backend="emulated", formats=(FP8Format.custom(3, 1), FP8Format.custom(3, 1)))]),
    ]:
        model, loader = tiny_gpt(60)
        losses = _Losses()
        make_trainer(tmp_path / name, 60, [losses], plugins=plugins).fit(model, loader)
        finals[name] = sum(losses.losses[-10:]) / 10
        assert finals[name] < 0.85 * losses.losses[0]  # every run learns
    assert finals["fp8"] != finals["fp32"]  # the quantisation is really in the loop
    assert abs(finals["fp8"] - finals["fp32"]) < 0.02 * finals["fp32"]
    assert abs(finals["e3m1"] - finals["fp32"]) > abs(finals["fp8"] - finals["fp32"])


def test_watch_only_warns_once_per_incident_and_never_switches(tmp_path):
    model, loader = tiny_gpt(10)
    plugin = FP8Precision(backend="emulated", health_every_n_steps=1, patience=1, overflow_limit=0.1, fallback=False)
    trainer = make_trainer(tmp_path, 10, [_Jump(5, "blocks.0.mlp.0")], plugins=[plugin])
    trainer.fit(model, loader)
    events = [e for e in get_event_log(trainer) if e.source == "FP8Precision"]
    assert not [e for e in events if e.kind == "fp8_fallback"] and plugin.fallback_layers == []
    unhealthy = [e for e in events if e.kind == "fp8_unhealthy"]
    assert unhealthy[0].target == "blocks.0.mlp.0" and unhealthy[0].step == 5 and unhealthy[0].action is None
    # one warning for the incident, however many unhealthy samples it spans
    assert len([e for e in unhealthy if e.target == "blocks.0.mlp.0"]) == 1
