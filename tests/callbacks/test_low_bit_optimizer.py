from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_stability import LowBitOptimizer
from lightning_stability.ops.optim8bit import dequantize_state
from tests.conftest import make_trainer, tiny_gpt

bnb = pytest.importorskip("bitsandbytes")


class _Record(pl.Callback):
    def __init__(self):
        self.losses, self.lrs = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _wide_gpt(steps, **kw):
    # width 64: the block weights have >= 4096 values, so their state is 8-bit
    model, loader = tiny_gpt(steps, **kw)
    from lightning_stability.demos import TinyGPT

    pl.seed_everything(0, verbose=False)
    wide = TinyGPT(model.hparams.vocab_size, block_size=16, d_model=64, n_layer=1, n_head=2, max_steps=steps,
                   warmup_steps=10, **kw)
    return wide, loader


def test_adamw_becomes_adamw8bit_with_groups_schedule_and_32bit_exceptions(tmp_path):
    model, loader = _wide_gpt(20)
    record = _Record()
    swap = LowBitOptimizer()
    trainer = make_trainer(tmp_path, 20, [swap, record])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, loader)
    assert not [w for w in caught if "overridden after learning rate scheduler" in str(w.message)]
    opt = trainer.optimizers[0]
    assert type(opt) is bnb.optim.AdamW8bit and swap.swapped == [("AdamW", "AdamW8bit")]
    # TinyGPT's two groups: decayed weights and the rest, hyperparameters carried over
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    # the scheduler drives the new optimizer: warmup then cosine, as with the torch optimizer
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.optimizer is opt
    assert record.lrs[0] == pytest.approx(3e-3 * 2 / 10) and record.lrs[9] == pytest.approx(3e-3)
    # 8-bit state for the block weights, 32-bit for the embeddings, the head and the norms
    state = opt.state
    assert state[model.blocks[0].mlp[0].weight]["state1"].dtype == torch.uint8
    for p in (model.tok_emb.weight, model.lm_head.weight, model.ln_f.weight):
        assert state[p]["state1"].dtype == torch.float32
    assert "tok_emb.weight" in swap.kept_32bit and "lm_head.weight" in swap.kept_32bit
    # the process-wide override manager is left clean
    assert not any(id(p) in bnb.optim.GlobalOptimManager.get_instance().pid2config for p in model.parameters())


def test_8bit_training_tracks_the_torch_optimizer(tmp_path):
    finals = {}
    for name, callbacks in (("torch", []), ("8bit", [LowBitOptimizer()])):
        model, loader = _wide_gpt(60)
        record = _Record()
        make_trainer(tmp_path / name, 60, [*callbacks, record]).fit(model, loader)
        finals[name] = sum(record.losses[-10:]) / 10
        assert finals[name] < 0.8 * record.losses[0]
    assert finals["8bit"] != finals["torch"]
    assert abs(finals["8bit"] - finals["torch"]) < 0.03 * finals["torch"]


def test_resume_from_a_plain_torch_checkpoint_converts_the_state(tmp_path):
    model, loader = _wide_gpt(8)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(tmp_path, 5, [ckpt], enable_checkpointing=True)
    trainer.fit(model, loader)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["optimizer_states"][0]["state"]
    weight_index = [n for n, _ in model.named_parameters()].index("blocks.0.mlp.0.weight")

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not hasattr(self, "state"):
                opt = trainer.optimizers[0]
                self.state = {k: v.clone() if torch.is_tensor(v) else v
                              for k, v in opt.state[pl_module.blocks[0].mlp[0].weight].items()}

    probe = Probe()
    resumed = make_trainer(tmp_path / "resumed", 8, [LowBitOptimizer(), probe])
    resumed.fit(model, loader, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.global_step == 8
    # the map from the decayed group: find the weight's torch state by its position in the groups
    decay_ids = [i for i, (n, p) in enumerate(model.named_parameters()) if p.dim() >= 2]
    torch_state = saved[decay_ids.index(weight_index)]
    st = probe.state
    assert st["state1"].dtype == torch.uint8 and st["step"] == 5
    for slot, key in (("1", "exp_avg"), ("2", "exp_avg_sq")):
        ref = torch_state[key]
        err = (dequantize_state(st, slot) - ref).norm() / ref.norm()
        assert 0 < err < 0.03  # quantised, not lost


def test_resume_from_its_own_checkpoint_restores_the_8bit_state_exactly(tmp_path):
    model, loader = _wide_gpt(8)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(tmp_path, 5, [LowBitOptimizer(), ckpt], enable_checkpointing=True)
    trainer.fit(model, loader)
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in trainer.optimizers[0].state[model.blocks[0].mlp[0].weight].items()}

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not hasattr(self, "state"):
                state = trainer.optimizers[0].state[pl_module.blocks[0].mlp[0].weight]
                self.state = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}

    probe = Probe()
    resumed = make_trainer(tmp_path / "resumed", 6, [LowBitOptimizer(), probe])
    resumed.fit(model, loader, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    for key, value in before.items():
        if torch.is_tensor(value):
            assert torch.equal(probe.state[key], value), key
        else:
            assert probe.state[key] == value


class _Opt(pl.LightningModule):
    def __init__(self, make):
        super().__init__()
        self.layer = torch.nn.Linear(8, 8)
        self.make = make

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return self.make(self.parameters())


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: torch.optim.Adam(p, weight_decay=0.1), "decays the weights decoupled"),
        (lambda p: torch.optim.SGD(p, lr=0.1), "momentum > 0"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), "nesterov"),
        (lambda p: torch.optim.AdamW(p, maximize=True), "maximize"),
        (lambda p: torch.optim.RMSprop(p), "no 8-bit equivalent of RMSprop"),
    ],
)
def test_optimizers_it_cannot_mirror_are_refused_clearly(tmp_path, make, match):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 8)), batch_size=4)
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, 2, [LowBitOptimizer()]).fit(_Opt(make), loader)


def test_other_families_and_named_targets(tmp_path):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 8)), batch_size=4)
    sgd = LowBitOptimizer()
    trainer = make_trainer(tmp_path, 2, [sgd])
    trainer.fit(_Opt(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)), loader)
    assert type(trainer.optimizers[0]) is bnb.optim.SGD8bit and trainer.optimizers[0].param_groups[0]["lr"] == 0.1
    lion = LowBitOptimizer(optimizer="lion8bit")
    trainer = make_trainer(tmp_path, 2, [lion])
    trainer.fit(_Opt(lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.05)), loader)
    opt = trainer.optimizers[0]
    assert type(opt) is bnb.optim.Lion8bit and opt.param_groups[0]["lr"] == 1e-4
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[0]["betas"] == (0.9, 0.99)  # Lion's own


def test_refused_strategies_and_bad_arguments():
    from lightning_stability.callbacks.low_bit_optimizer import _REFUSED_STRATEGIES

    assert set(_REFUSED_STRATEGIES) == {"DeepSpeedStrategy", "FSDPStrategy", "ModelParallelStrategy"}
    with pytest.raises(ValueError, match="optimizer='adamw4bit'"):
        LowBitOptimizer(optimizer="adamw4bit")
    with pytest.raises(ValueError, match="keep_32bit"):
        LowBitOptimizer(keep_32bit=["biases"])


def test_container_schedulers_keep_their_children_where_the_rebinding_looks():
    # Pinned: SequentialLR and ChainedScheduler hold their child schedulers in ``_schedulers``.
    from lightning_stability.callbacks.low_bit_optimizer import CHILD_SCHEDULERS

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=1.0)
    s = torch.optim.lr_scheduler
    a, b = s.LinearLR(opt, 0.1, total_iters=2), s.ExponentialLR(opt, 0.9)
    assert getattr(s.SequentialLR(opt, [a, b], milestones=[2]), CHILD_SCHEDULERS) == [a, b]
    assert list(getattr(s.ChainedScheduler([a, b]), CHILD_SCHEDULERS)) == [a, b]


def test_bnb_nests_its_quantisation_state_where_the_conversion_looks():
    from lightning_stability.callbacks.low_bit_optimizer import BNB_NESTED_STATE

    assert bnb.optim.optimizer.Optimizer8bit._FSDP_WRAPPED_QUANT_STATE_KEY == BNB_NESTED_STATE


def test_a_checkpoint_written_with_the_callback_resumes_without_it_and_with_it(tmp_path):
    def run(steps, callbacks, ckpt_path=None):
        model, loader = _wide_gpt(30)
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=15, save_top_k=-1)
        trainer = make_trainer(tmp_path, steps, [*callbacks, ckpt], enable_checkpointing=True)
        trainer.fit(model, loader, ckpt_path=ckpt_path)
        return trainer

    saved_run = run(15, [LowBitOptimizer()])
    opt8 = saved_run.optimizers[0]
    path = str(tmp_path / "ckpt" / "epoch=0-step=15.ckpt")
    eight_bit = {id(p): opt8.state[p] for g in opt8.param_groups for p in g["params"]}
    order = [id(p) for g in opt8.param_groups for p in g["params"]]
    assert any(st["state1"].dtype == torch.uint8 for st in eight_bit.values())

    # without the callback: a plain AdamW whose moments are the 8-bit moments dequantised
    plain = run(15, [], ckpt_path=path)  # restores, takes no step
    opt = plain.optimizers[0]
    assert type(opt).__name__ == "AdamW"
    for pid, p in zip(order, [p for g in opt.param_groups for p in g["params"]]):
        torch.testing.assert_close(opt.state[p]["exp_avg"], dequantize_state(eight_bit[pid], "1").view(p.shape))
    assert run(16, [], ckpt_path=path).global_step == 16  # and trains on

    # with it: the exact 8-bit codes come back
    again = run(15, [LowBitOptimizer()])  # overwrite nothing: a fresh run to the same step
    resumed = run(16, [LowBitOptimizer()], ckpt_path=path)
    assert again.global_step == 15 and resumed.global_step == 16
    saved = torch.load(path, weights_only=False)
    [exact] = saved["lightning_stability_low_bit_optimizer_states"].values()
    nested = [{**st, **st.get("__bnb_optimizer_quant_state__", {})} for st in exact["state"].values()]
    codes = [st["state1"] for st in nested if st["state1"].dtype == torch.uint8]
    expected = [eight_bit[pid]["state1"] for pid in order if eight_bit[pid]["state1"].dtype == torch.uint8]
    assert codes and len(codes) == len(expected) and all(torch.equal(c, e) for c, e in zip(codes, expected))
