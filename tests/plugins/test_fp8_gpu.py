"""FP8Precision with the real Transformer Engine, on an SM 8.9+ GPU (skipped elsewhere)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_stability.ops.fp8 import E4M3, quantize
from lightning_stability.plugins.fp8 import FP8Precision
from tests.conftest import make_trainer, tiny_gpt

pytestmark = pytest.mark.gpu


@pytest.fixture
def te():
    te = pytest.importorskip("transformer_engine.pytorch")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need SM >= 8.9")
    return te


@pytest.mark.parametrize("recipe", ["delayed", "current", "block"])
def test_te_backend_trains_with_each_recipe(te, tmp_path, recipe):
    if recipe == "block" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("block scaling needs SM >= 9.0")
    model, loader = tiny_gpt(30)
    plugin = FP8Precision(backend="te", recipe=recipe, health_every_n_steps=5)
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = make_trainer(tmp_path, 30, [Record()], plugins=[plugin], accelerator="gpu")
    trainer.fit(model, loader)
    assert plugin.backend == "te" and plugin.converted_layers
    assert all(isinstance(model.get_submodule(n), te.Linear) for n in plugin.converted_layers)
    assert sum(losses[-5:]) / 5 < 0.9 * losses[0]
    assert plugin.last_health and all(v == v for v in plugin.last_health.values())  # no NaN


def test_te_and_the_emulator_agree_on_one_layer(te):
    torch.manual_seed(0)
    layer = te.Linear(64, 64, params_dtype=torch.float32, device="cuda")
    x = torch.randn(32, 64, device="cuda")
    from transformer_engine.common import recipe

    fp8_recipe = recipe.DelayedScaling(amax_history_len=4)
    for _ in range(2):  # the second call uses scales from the first one's amaxes
        with te.fp8_autocast(enabled=True, fp8_recipe=fp8_recipe):
            y_te = layer(x)
    meta = layer.fp8_meta["scaling_fwd"]
    sx, sw = meta.scale[0], meta.scale[1]
    # the scales TE computed are the delayed-scaling rule's
    torch.testing.assert_close(sx, 448 / x.abs().max(), rtol=1e-6, atol=0)
    y_emu = torch.nn.functional.linear(quantize(x, sx, E4M3), quantize(layer.weight.detach(), sw, E4M3), layer.bias)
    rel = float((y_te.float() - y_emu).norm() / y_emu.norm())
    print(f"TE vs emulator, one layer: relative difference {rel:.2e}")
    assert rel < 1e-2
