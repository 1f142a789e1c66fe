"""FP8Precision with the real Transformer Engine and the real torchao, on an SM 8.9+ GPU (skipped elsewhere)."""

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


@pytest.fixture
def torchao():
    float8 = pytest.importorskip("torchao.float8")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need SM >= 8.9")
    return float8


def _losses(tmp_path, steps: int, **kw) -> tuple[list[float], pl.LightningModule]:
    model, loader = tiny_gpt(steps)
    losses: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    make_trainer(tmp_path, steps, [Record()], accelerator="gpu", **kw).fit(model, loader)
    return losses, model


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_torchao_backend_trains_with_each_recipe_close_to_bf16(torchao, tmp_path, recipe):
    from torchao.float8.float8_linear import Float8Linear

    plugin = FP8Precision(backend="torchao", recipe=recipe, health_every_n_steps=5)
    fp8, model = _losses(tmp_path / "fp8", 30, plugins=[plugin])
    bf16, _ = _losses(tmp_path / "bf16", 30, precision="bf16-mixed")
    assert plugin.backend == "torchao" and plugin.converted_layers
    assert all(isinstance(model.get_submodule(n), Float8Linear) for n in plugin.converted_layers)
    last = sum(fp8[-5:]) / 5
    print(f"torchao {recipe}: last-5 loss {last:.4f}, bf16 {sum(bf16[-5:]) / 5:.4f}, first {fp8[0]:.4f}")
    assert last < 0.9 * fp8[0]
    assert last == pytest.approx(sum(bf16[-5:]) / 5, rel=0.05)
    assert plugin.last_health and all(v == v for v in plugin.last_health.values())  # no NaN


def test_torchao_backend_resumes_a_fallback_from_a_checkpoint(torchao, tmp_path):
    from lightning_stability import get_event_log

    model, loader = tiny_gpt(12)
    plugin = FP8Precision(backend="torchao", health_every_n_steps=1, cooldown=100)
    target = "blocks.0.mlp.0"
    path = str(tmp_path / "fp8.ckpt")

    class NameThenSave(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                get_event_log(trainer).emit(3, "my_check", "MyMonitor", "warning", {}, None, target)
            if trainer.global_step == 6:
                trainer.save_checkpoint(path)

    make_trainer(tmp_path, 7, [NameThenSave()], plugins=[plugin], accelerator="gpu").fit(model, loader)
    assert plugin.fallback_layers == [target]
    resumed = FP8Precision(backend="torchao", health_every_n_steps=1, cooldown=100)
    model2, loader2 = tiny_gpt(12)
    make_trainer(tmp_path, 12, [], plugins=[resumed], accelerator="gpu").fit(model2, loader2, ckpt_path=path)
    assert resumed.fallback_layers == [target]
    assert all(torch.isfinite(p).all() for p in model2.parameters())


@pytest.mark.parametrize("float8_all_gather", [False, True])
def test_torchao_backend_under_fsdp2_on_one_gpu_converted_before_the_sharding(torchao, tmp_path, float8_all_gather):
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard

    from lightning_stability.demos import TinyGPT

    class Sharded(TinyGPT):
        def configure_model(self):
            self.trainer.precision_plugin.convert_module(self)
            mesh = self.device_mesh["data_parallel"]
            for module in (self.tok_emb, self.pos_emb, *self.blocks, self.ln_f, self.lm_head):
                fully_shard(module, mesh=mesh)

    model, loader = tiny_gpt(10)
    model.__class__ = Sharded
    plugin = FP8Precision(backend="torchao", health_every_n_steps=2, float8_all_gather=float8_all_gather)
    trainer = make_trainer(tmp_path, 10, [], plugins=[plugin], accelerator="gpu",
                           strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))
    trainer.fit(model, loader)
    assert plugin.converted_layers and plugin.last_health
    assert all(v == v for v in plugin.last_health.values())
    assert all(torch.isfinite(p.full_tensor()).all() for p in model.parameters())
