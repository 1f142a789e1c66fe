"""FP8Precision on the batches and models users have: token counts that are no multiple of 8 (a last
partial batch, an odd validation batch), and layers built in ``configure_model``."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_stability.demos import TinyGPT, make_dataloader
from lightning_stability.plugins.fp8 import EmulatedFP8Linear, FP8Precision
from tests.conftest import make_trainer
from tests.plugins.conftest import FakeTELinear, fit_llama


class _Validated(TinyGPT):
    def validation_step(self, batch, batch_idx):
        logits = self(batch["input_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
        self.log("val/loss", loss)
        return loss


class _Shapes(pl.Callback):
    """The input shapes the FP8 layer ``blocks.0.mlp.0`` sees, in training and in validation."""

    def __init__(self):
        self.train, self.val = [], []

    def on_fit_start(self, trainer, pl_module):
        pl_module.blocks[0].mlp[0].register_forward_pre_hook(
            lambda m, args: (self.train if m.training else self.val).append(tuple(args[0].shape)))


@pytest.mark.parametrize("backend", ["emulated", "te"])
def test_token_counts_not_divisible_by_8_train_and_validate(tmp_path, backend, request):
    if backend == "te":
        request.getfixturevalue("fake_te")  # the fake raises on such shapes as TE does
    # 15 tokens a sequence; batches of 5 (75 tokens) and a last one of 2 (30); validation batches of 3 (45)
    train, ds = make_dataloader(block_size=15, batch_size=5, n_samples=5 * 3 + 2)
    val, _ = make_dataloader(block_size=15, batch_size=3, n_samples=3, seed=1)
    pl.seed_everything(0, verbose=False)
    model = _Validated(len(ds.vocab), block_size=15, d_model=32, n_layer=1, n_head=2, max_steps=8, warmup_steps=2)
    plugin = FP8Precision(backend=backend)
    shapes = _Shapes()
    trainer = make_trainer(tmp_path, 8, [shapes], plugins=[plugin], limit_val_batches=1, val_check_interval=4,
                           num_sanity_val_steps=1)
    trainer.fit(model, train, val)
    assert trainer.global_step == 8 and "blocks.0.mlp.0" in plugin.converted_layers
    assert (2, 15, 32) in shapes.train and (5, 15, 32) in shapes.train and (3, 15, 32) in shapes.val
    assert all(torch.isfinite(p).all() for p in model.parameters())
    layer = model.blocks[0].mlp[0]
    if backend == "te":
        assert type(layer) is FakeTELinear and set(layer.shapes) >= {(80, 32), (32, 32), (48, 32)}  # padded to 8
    else:  # the emulator runs the shape as it is, quantised like any other
        assert isinstance(layer, EmulatedFP8Linear) and float(layer.amax_history[:, 0].amax()) > 0


class _Configured(pl.LightningModule):
    """A model whose layers exist only after ``configure_model`` (the pattern Lightning recommends for
    large and sharded models), built once."""

    def __init__(self, d=32):
        super().__init__()
        self.d, self.net = d, None

    def configure_model(self):
        if self.net is not None:
            return
        self.net = nn.Sequential(nn.Linear(16, self.d), nn.ReLU(), nn.Linear(self.d, self.d), nn.ReLU(),
                                 nn.Linear(self.d, self.d), nn.ReLU(), nn.Linear(self.d, 8))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _xy(n=32):
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(n, 16, generator=g), torch.randn(n, 8, generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=8)


@pytest.mark.parametrize("backend", ["emulated", "te"])
def test_layers_built_in_configure_model_are_converted_and_trained(tmp_path, backend, request):
    if backend == "te":
        request.getfixturevalue("fake_te")
    model = _Configured()
    plugin = FP8Precision(backend=backend)
    trainer = make_trainer(tmp_path, 4, [], plugins=[plugin])
    trainer.fit(model, _xy())
    assert plugin.converted_layers == ["net.2", "net.4"]  # the first and the last are kept
    kind = FakeTELinear if backend == "te" else EmulatedFP8Linear
    assert [type(m) for m in model.net if isinstance(m, nn.Linear)] == [nn.Linear, kind, kind, nn.Linear]
    # the optimizer holds the converted layers' parameters (built after the conversion)
    held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in model.parameters()} == held
    # and it resumes: the weights load before the conversion, the scaling after
    path = tmp_path / "c.ckpt"
    trainer.save_checkpoint(path)
    fresh, again = _Configured(), FP8Precision(backend=backend)
    make_trainer(tmp_path / "r", 6, [], plugins=[again]).fit(fresh, _xy(), ckpt_path=str(path))
    assert again.converted_layers == ["net.2", "net.4"]
    if backend == "emulated":
        assert float(fresh.net[2].amax_history.abs().sum()) > 0


def test_multihead_attention_out_proj_is_not_reported_as_fp8():
    """``nn.MultiheadAttention`` reads ``out_proj.weight`` itself: converting it would claim FP8 and run
    bf16. Lightning's ``demos.Transformer`` is built on it."""
    from lightning.pytorch.demos import Transformer

    model = Transformer(vocab_size=40, ninp=32, nhead=2, nhid=64, nlayers=1)
    plugin = FP8Precision(backend="emulated", keep_first_last=False)
    plugin.convert_module(model)
    outs = [n for n, m in model.named_modules() if n.endswith("self_attn.out_proj")]
    assert outs and all(n in plugin.skipped_layers and "MultiheadAttention" in plugin.skipped_layers[n] for n in outs)
    assert all(type(model.get_submodule(n)) is not EmulatedFP8Linear for n in outs)
    assert any(n.endswith("linear1") for n in plugin.converted_layers)  # the feed-forward layers still are


def test_torchaos_rowwise_recipe_emulated_trains_llama_close_to_float32_with_per_row_health(tmp_path):
    """The emulator runs torchao's rowwise recipe, so it can be studied without a GPU: Llama's projections
    (GQA's narrower k and v among them) train as in float32, and the health is the tightest row's."""
    plugin = FP8Precision(backend="emulated", recipe="rowwise", health_every_n_steps=1)
    losses = {"float32": fit_llama(tmp_path, "float32", [])[1]}
    model, losses["rowwise"] = fit_llama(tmp_path, "rowwise", [plugin])
    assert (plugin.backend, plugin.recipe) == ("emulated", "rowwise")
    k_proj = "model.model.layers.0.self_attn.k_proj"
    assert k_proj in plugin.converted_layers
    layer = model.model.model.layers[0].self_attn.k_proj
    assert isinstance(layer, EmulatedFP8Linear) and layer.recipe == "rowwise"
    health = plugin.last_health
    for role in ("input", "weight", "grad"):
        scale = health[f"{k_proj}/{role}/scale"]
        assert scale > 0 and math.log2(scale) == int(math.log2(scale))  # a power of two
        assert 0.0 <= health[f"{k_proj}/{role}/headroom"] < 1.0  # each row scaled to within one bit of the top
    assert losses["rowwise"] == pytest.approx(losses["float32"], rel=0.02)


def test_on_gpt2_nothing_runs_in_fp8_and_the_warning_says_why(tmp_path):
    """Hugging Face's GPT-2 computes its projections with transformers' Conv1D (the weight stored
    transposed), no nn.Linear: FP8Precision converts none of them, lists each with the reason, and warns
    at fit start that no layer runs in FP8 rather than reporting it in passing."""
    from tests.clients.models import Client, loader

    model = Client("gpt2", max_steps=2)
    plugin = FP8Precision(backend="emulated")
    with pytest.warns(UserWarning, match=r"0 layers in FP8, 9 kept in high precision\. No layer runs in FP8: "
                                         r"8 x transformers' Conv1D .*; 1 x output head"):
        make_trainer(tmp_path, 2, [], plugins=[plugin]).fit(model, loader("gpt2", n=16))
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert plugin.converted_layers == [] and len(conv1d) == 8
    assert all("Conv1D" in plugin.skipped_layers[n] for n in conv1d)
    assert all(type(m).__name__ != "EmulatedFP8Linear" for m in model.modules())
