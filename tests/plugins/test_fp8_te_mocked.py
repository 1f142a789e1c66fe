"""The Transformer Engine backend on CPU, with the module mocked the way Lightning's own tests mock it;
the real thing runs in the GPU-marked tests on a Hopper machine."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from lightning_stability import get_event_log
from lightning_stability.plugins import _te
from lightning_stability.plugins.fp8 import FP8Precision
from tests.conftest import MemoryLogger, make_trainer, tiny_gpt
from tests.plugins.conftest import FakeTELinear

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None,
                                reason="Transformer Engine is installed: the GPU tests cover it")


def test_auto_picks_te_on_hopper_with_tes_delayed_scaling_recipe(fake_te):
    plugin = FP8Precision(margin=1, amax_history_len=16, amax_compute_algo="most_recent")
    assert plugin.backend == "te" and plugin.backend_reason == "Transformer Engine on SM90"
    fake_te.recipe.DelayedScaling.assert_called_once_with(
        margin=1, fp8_format=fake_te.recipe.Format.HYBRID, amax_history_len=16, amax_compute_algo="most_recent")
    FP8Precision(recipe="current", fp8_format="e4m3")
    fake_te.recipe.Float8CurrentScaling.assert_called_once_with(fp8_format=fake_te.recipe.Format.E4M3)
    FP8Precision(backend="te", recipe="block")
    fake_te.recipe.Float8BlockScaling.assert_called_once_with(fp8_format=fake_te.recipe.Format.HYBRID)


def test_block_scaling_converts_only_layers_of_whole_blocks(fake_te):
    from lightning_stability.demos import TinyGPT

    model = TinyGPT(40, block_size=16, d_model=128, n_layer=1, n_head=2)
    model.blocks[0].narrow = nn.Linear(128, 64)
    plugin = FP8Precision(backend="te", recipe="block")
    plugin.convert_module(model)
    assert plugin.converted_layers == ["blocks.0.attn.proj", "blocks.0.mlp.0", "blocks.0.mlp.2"]
    assert plugin.skipped_layers["blocks.0.narrow"] == "out_features=64 is not divisible by 128 (recipe 'block')"


def test_hardware_rules_and_their_errors(fake_te, monkeypatch):
    fake_te.sm["value"] = (8, 0)
    plugin = FP8Precision()  # auto: the emulator, saying why
    assert plugin.backend == "emulated" and "SM80" in plugin.backend_reason
    with pytest.raises(RuntimeError, match=r"needs SM>=8.9; this GPU is SM80.*backend='emulated'"):
        FP8Precision(backend="te")
    fake_te.sm["value"] = (8, 9)
    assert FP8Precision(backend="te").backend == "te"  # Ada runs per-tensor FP8
    with pytest.raises(RuntimeError, match=r"recipe='block'.*SM>=9.0"):
        FP8Precision(backend="te", recipe="block")
    fake_te.sm["value"] = (9, 0)
    for recipe in ("mxfp8", "nvfp4"):
        with pytest.raises(RuntimeError, match=rf"recipe='{recipe}'.*SM>=10.0"):
            FP8Precision(backend="te", recipe=recipe)
    fake_te.sm["value"] = (10, 0)
    FP8Precision(backend="te", recipe="mxfp8")
    fake_te.recipe.MXFP8BlockScaling.assert_called_once_with()
    fake_te.sm["value"] = None
    assert FP8Precision().backend == "emulated"
    monkeypatch.setattr(_te, "TE_AVAILABLE", False)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "lightning-stability\[fp8\]"'):
        FP8Precision(backend="te")


def test_fit_converts_to_te_linear_enters_the_fp8_autocast_and_reads_health_from_fp8_meta(fake_te, tmp_path):
    model, loader = tiny_gpt(3)
    weight = model.blocks[0].mlp[0].weight.detach().clone()
    plugin = FP8Precision(health_every_n_steps=1)
    logger = MemoryLogger()
    trainer = make_trainer(tmp_path, 3, [], plugins=[plugin], logger=logger, log_every_n_steps=1)
    trainer.fit(model, loader)
    layer = model.blocks[0].mlp[0]
    assert type(layer) is FakeTELinear and layer.weight.dtype == torch.float32
    assert type(model.blocks[0].attn.qkv) is nn.Linear and type(model.lm_head) is nn.Linear  # first layer, head
    assert plugin.converted_layers == ["blocks.0.attn.proj", "blocks.0.mlp.0", "blocks.0.mlp.2"]
    assert not torch.equal(layer.weight.detach(), weight)  # trained since
    # conversion copies the weights (the optimizer, built after it, holds the TE layer's parameters)
    fresh, _ = tiny_gpt(3)
    before = fresh.blocks[0].mlp[0].weight.detach().clone()
    FP8Precision().convert_module(fresh)
    assert type(fresh.blocks[0].mlp[0]) is FakeTELinear and torch.equal(fresh.blocks[0].mlp[0].weight, before)
    # every training step ran inside TE's FP8 autocast with the recipe object
    calls = [c for c in fake_te.te.pytorch.autocast.call_args_list if c.kwargs.get("enabled")]
    assert len(calls) == 3 and all(c.kwargs["recipe"] is fake_te.recipe.DelayedScaling.return_value for c in calls)
    # the health used the scales in the layer's FP8 metadata
    metrics = {k: v for _, m in logger.records for k, v in m.items()}
    assert metrics["stability/fp8/blocks.0.mlp.0/input/scale"] == 2.0
    assert metrics["stability/fp8/blocks.0.mlp.0/weight/scale"] == 4.0
    assert metrics["stability/fp8/blocks.0.mlp.0/grad/scale"] == 8.0


def test_a_fallen_back_te_layer_runs_outside_fp8_and_its_history_resets(fake_te, tmp_path):
    model, loader = tiny_gpt(4)
    plugin = FP8Precision(health_every_n_steps=1, cooldown=100)

    import lightning.pytorch as pl

    class Name(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:
                get_event_log(trainer).emit(1, "spectral_spike", "SpectralMonitor", "warning", {}, None, "blocks.0.mlp.2")

    make_trainer(tmp_path, 4, [Name()], plugins=[plugin]).fit(model, loader)
    assert plugin.fallback_layers == ["blocks.0.mlp.2"]
    layer = model.blocks[0].mlp[2]
    assert float(layer.fp8_meta["scaling_fwd"].amax_history.abs().sum()) == 0.0
    assert layer.fp8_meta["scaling_fwd"].scale.tolist() == [1.0, 1.0, 1.0]
    fake_te.te.pytorch.autocast.reset_mock()
    layer(torch.randn(8, 128))
    fake_te.te.pytorch.autocast.assert_called_once_with(enabled=False)
    # a token count TE's FP8 GEMMs refuse (the fake raises as TE does) runs padded with zero rows: the
    # output is the unpadded call's
    fc = model.blocks[0].mlp[0]
    x = torch.randn(1, 3, 32)
    with _te.fp8_autocast(enabled=True):
        y = fc(x)
    assert fc.shapes[-1] == (8, 32) and y.shape == (1, 3, 128)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, fc.weight, fc.bias))
    with pytest.raises(AssertionError, match="divisible by 8"):  # the fake keeps TE's rule
        nn.Linear.__call__(FakeTELinear(32, 8), torch.randn(3, 32))


def test_older_te_without_autocast_uses_fp8_autocast(fake_te):
    del fake_te.te.pytorch.autocast
    with _te.fp8_autocast(enabled=True, recipe="r"):
        pass
    fake_te.te.pytorch.fp8_autocast.assert_called_once_with(enabled=True, fp8_recipe="r")
