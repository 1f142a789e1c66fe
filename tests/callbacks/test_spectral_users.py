"""SpectralMonitor on models nobody here wrote: Hugging Face GPT-2 (Conv1D, tied head), Llama (GQA),
a BERT-style encoder, Lightning's demos.Transformer (nn.MultiheadAttention), a nanoGPT-style model
with tied embeddings, and a model built in configure_model."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_stability import SpectralMonitor, get_event_log
from tests.conftest import make_trainer

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB, T, BATCH = 64, 16, 4


def _gpt2() -> nn.Module:
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32)
    )


def _llama() -> nn.Module:
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=VOCAB, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg)


class NanoGPT(nn.Module):
    """nanoGPT's layout: fused c_attn, c_proj, an MLP, the head tied to the token embedding."""

    def __init__(self, d: int = 32, n_layer: int = 2) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(VOCAB, d),
            "wpe": nn.Embedding(T, d),
            "h": nn.ModuleList(nn.ModuleDict({
                "ln_1": nn.LayerNorm(d), "c_attn": nn.Linear(d, 3 * d), "c_proj": nn.Linear(d, d),
                "ln_2": nn.LayerNorm(d), "c_fc": nn.Linear(d, 4 * d), "mlp_proj": nn.Linear(4 * d, d),
            }) for _ in range(n_layer)),
            "ln_f": nn.LayerNorm(d),
        })
        self.lm_head = nn.Linear(d, VOCAB, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # nanoGPT ties this way round
        self.n_head = 2

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        tr: nn.ModuleDict = self.transformer
        x = tr.wte(idx) + tr.wpe(torch.arange(idx.shape[1]))
        for blk in tr.h:
            b, t, d = x.shape
            q, k, v = blk.c_attn(blk.ln_1(x)).split(d, dim=-1)
            q, k, v = (z.view(b, t, self.n_head, -1).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
            x = x + blk.c_proj(y)
            x = x + blk.mlp_proj(F.gelu(blk.c_fc(blk.ln_2(x))))
        return self.lm_head(tr.ln_f(x))


def _demo_transformer() -> nn.Module:
    from lightning.pytorch.demos import Transformer

    return Transformer(vocab_size=VOCAB, ninp=32, nhead=2, nhid=64, nlayers=1, dropout=0.0)


def _loss(kind: str, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if kind in ("gpt2", "llama"):
        return model(input_ids=ids, labels=ids).loss
    if kind == "bert":
        mask = torch.ones_like(ids)
        mask[:, -3:] = 0  # padded batches
        return model(input_ids=ids, attention_mask=mask, labels=ids[:, 0] % 3).loss
    if kind == "demo":
        out = model(ids[:, :-1], ids[:, :-1])
        return F.nll_loss(out, ids[:, 1:].reshape(-1))
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


class Wrap(pl.LightningModule):
    """A user's LightningModule around a plain model; ``training_step`` returns the loss only."""

    def __init__(self, kind: str, build, in_configure_model: bool = False) -> None:
        super().__init__()
        self.kind, self.build = kind, build
        self.model: nn.Module | None = None if in_configure_model else build()

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.build()

    def training_step(self, batch, batch_idx):
        return _loss(self.kind, self.model, batch[0])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _loader(steps: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (steps * BATCH, T), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=BATCH)


def _every_matrix(model: nn.Module) -> set[str]:
    """Every parameter of two or more dimensions, tied ones once (named_parameters drops repeats), by
    the name a user reads: the module's for a ``.weight``, the parameter's otherwise."""
    names = set()
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            names.add(name[: -len(".weight")] if name.endswith(".weight") else name)
    return names


MODELS = {"gpt2": _gpt2, "llama": _llama, "bert": _bert, "demo": _demo_transformer, "nanogpt": NanoGPT}


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_weight_matrix_of_a_users_model_is_tracked_once_and_measured(tmp_path, kind):
    pl.seed_everything(0, verbose=False)
    module = Wrap(kind, MODELS[kind])
    monitor = SpectralMonitor(check_every_n_steps=5, full_every_n_steps=None)
    trainer = make_trainer(tmp_path, 15, [monitor])
    trainer.fit(module, _loader(15))
    expected = {f"model.{n}" for n in _every_matrix(module.model)}
    assert set(monitor.layer_names) == expected
    assert len(monitor.layer_names) == len(expected)  # tied weights once
    assert monitor.skipped == {}
    assert not [e for e in get_event_log(trainer) if e.kind == "spectral_skipped"]
    params = dict(module.named_parameters(remove_duplicate=False))
    for name, s in monitor.estimates().items():
        p = params.get(f"{name}.weight", params.get(name))
        true = float(torch.linalg.matrix_norm(p.detach().double().reshape(p.shape[0], -1), 2))
        assert s["sigma_max"] == pytest.approx(true, rel=2e-2), name
        assert s["sigma_max"] <= true * (1 + 1e-5), name  # a lower bound, from either orientation
    if kind == "gpt2":
        # 8 Conv1D projections, the token and position embeddings; lm_head is wte, counted once
        assert len(expected) == 10 and "model.lm_head" not in monitor.layer_names
        assert monitor._tracker.layers["model.transformer.h.0.attn.c_attn"].transposed
        assert monitor._tracker.layers["model.transformer.wte"].embedding
    if kind == "demo":
        assert "model.transformer.encoder.layers.0.self_attn.in_proj_weight" in monitor.layer_names
    if kind == "nanogpt":
        # the head and the token embedding are one weight, measured once, as an embedding
        tied = [n for n in monitor.layer_names if n in ("model.transformer.wte", "model.lm_head")]
        assert len(tied) == 1 and monitor._tracker.layers[tied[0]].embedding


def test_the_layers_of_a_model_built_in_configure_model_are_tracked(tmp_path):
    # Lightning calls callback setup before LightningModule.configure_model
    pl.seed_everything(0, verbose=False)
    module = Wrap("nanogpt", NanoGPT, in_configure_model=True)
    assert module.model is None
    monitor = SpectralMonitor(check_every_n_steps=5, full_every_n_steps=None)
    make_trainer(tmp_path, 5, [monitor]).fit(module, _loader(5))
    assert set(monitor.layer_names) == {f"model.{n}" for n in _every_matrix(module.model)}
    assert all(math.isfinite(s["sigma_max"]) and s["sigma_max"] > 0 for s in monitor.estimates().values())


class _Twins(pl.LightningModule):
    """Two layers as transformers' Conv1D (weight (in, out)) or as nn.Linear (weight (out, in)), with
    the same numbers: the Linear's weight is the Conv1D's transposed."""

    def __init__(self, conv1d: bool) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        w1, w2 = torch.randn(24, 16, generator=g) / 4, torch.randn(8, 24, generator=g) / 5  # (out, in)
        if conv1d:
            self.fc, self.out = Conv1D(24, 16), Conv1D(8, 24)
            with torch.no_grad():
                self.fc.weight.copy_(w1.t())
                self.out.weight.copy_(w2.t())
        else:
            self.fc, self.out = nn.Linear(16, 24), nn.Linear(24, 8)
            with torch.no_grad():
                self.fc.weight.copy_(w1)
                self.out.weight.copy_(w2)
        with torch.no_grad():
            self.fc.bias.zero_()
            self.out.bias.zero_()
        self.conv1d = conv1d

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def matrix(self, name: str) -> torch.Tensor:
        w = getattr(self, name).weight.detach()
        return w.t() if self.conv1d else w


class _Bump(pl.Callback):
    """At the end of step 30, a rank-one bump of ``fc`` along fixed directions: sigma_max jumps."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step - 1 == 30:
            g = torch.Generator().manual_seed(5)
            a, b = torch.randn(24, generator=g), torch.randn(16, generator=g)
            bump = 4.0 * torch.outer(a / a.norm(), b / b.norm()) * torch.linalg.matrix_norm(pl_module.matrix("fc"), 2)
            with torch.no_grad():
                pl_module.fc.weight.add_(bump.t() if pl_module.conv1d else bump)


def _twin_fit(tmp_path, conv1d: bool, action: str):
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40 * 8, 16, generator=g)
    y = torch.randn(40 * 8, 8, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    model = _Twins(conv1d)
    monitor = SpectralMonitor(check_every_n_steps=1, warmup=20, ladder=(action,), update_clip=0.5, cooldown=50,
                              pss_max_k=2, full_every_n_steps=None)
    trainer = make_trainer(tmp_path / ("conv1d" if conv1d else "linear"), 36, [_Bump(), monitor])
    trainer.fit(model, loader)
    mine = [e for e in get_event_log(trainer) if e.source == monitor.source]
    # an event on a layer names its weight as named_parameters() (and the guard) do
    assert all(e.details == {"parameter": f"{e.target}.weight"} for e in mine if e.target in ("fc", "out"))
    return model, monitor, [(e.step, e.kind, e.action, e.target) for e in mine]


@pytest.mark.parametrize("action", ["cap", "pss", "clip_updates"])
def test_an_intervention_on_a_conv1d_weight_is_the_one_on_the_equivalent_linear(tmp_path, action):
    linear, lin_monitor, lin_events = _twin_fit(tmp_path, False, action)
    conv, conv_monitor, conv_events = _twin_fit(tmp_path, True, action)
    assert (31, "sigma_growth", action, "fc") in lin_events
    assert conv_events == lin_events
    for name in ("fc", "out"):
        torch.testing.assert_close(conv.matrix(name), linear.matrix(name), rtol=1e-4, atol=1e-5)
    for name in ("fc", "out"):
        a, b = conv_monitor.estimates()[name], lin_monitor.estimates()[name]
        for key in ("sigma_max", "update_ratio", "alignment"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), (name, key)
        # the left vector lives in the output space for both
        ga, gb = conv_monitor._tracker.layers[name], lin_monitor._tracker.layers[name]
        assert ga.group.vector("u", ga.slot).shape == gb.group.vector("u", gb.slot).shape == (conv.matrix(name).shape[0],)


def test_matrix_shaped_parameters_of_unknown_layers_are_listed_in_one_info_event(tmp_path):
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.randn(16, 8) / 4)  # a bare matrix: used as x @ table
            self.pos = nn.Parameter(torch.zeros(1, T, 16))  # ViT-style position embedding

        def forward(self, x):
            return (x + self.pos[:, : x.shape[1]]) @ self.table

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 16)
            self.custom = Custom()

        def training_step(self, batch, batch_idx):
            return self.custom(self.inp(batch[0])).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    pl.seed_everything(0, verbose=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(12, T, 4)), batch_size=4)
    monitor = SpectralMonitor(full_every_n_steps=None)
    trainer = make_trainer(tmp_path, 3, [monitor])
    trainer.fit(Model(), loader)
    assert monitor.layer_names == ["inp"]
    assert sorted(monitor.skipped) == ["custom.pos", "custom.table"]
    assert "Custom" in monitor.skipped["custom.table"] and "orientation is unknown" in monitor.skipped["custom.table"]
    (event,) = [e for e in get_event_log(trainer) if e.kind == "spectral_skipped"]
    assert event.severity == "info" and event.action is None
    assert event.metrics["tracked"] == 1 and event.metrics["skipped"] == 2
    assert "custom.table: a 2-D parameter of Custom" in event.target and "custom.pos: a 3-D parameter" in event.target
