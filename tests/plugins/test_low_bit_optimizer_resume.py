"""Checkpoints of LowBitOptimizer runs: they resume without the callback (people drop it), the torch
optimizer taking the decoded moments; with it, bit for bit; and the schedule continues either way."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_stability import LowBitOptimizer
from lightning_stability.ops.optim8bit import dequantize_state
from tests.conftest import make_trainer
from tests.plugins.test_low_bit_optimizer_users import _Hyper, _loader, _Scheduled

bnb = pytest.importorskip("bitsandbytes")
STEPS, SAVE = 12, 6  # the checkpoint at the end of the first epoch: the resumed run sees the same batches


class _SGD(_Scheduled):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, 0.5),
                                                   "interval": "step"}}


def _model(kind):
    return _SGD("LinearLR") if kind == "sgd" else _Scheduled("SequentialLR")


class _AtSave(pl.Callback):
    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if not hasattr(self, "state"):
            opt = trainer.optimizers[0]
            self.params = [n for n, _ in pl_module.named_parameters()]
            self.state = {n: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                          for n, p in pl_module.named_parameters()}


class _AtStart(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not hasattr(self, "state"):
            opt = trainer.optimizers[0]
            self.optimizer = opt
            self.state = {n: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                          for n, p in pl_module.named_parameters()}


def _run_with_callback(tmp_path, kind):
    pl.seed_everything(0, verbose=False)
    at_save, hyper = _AtSave(), _Hyper()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=SAVE, save_top_k=-1)
    model = _model(kind)
    make_trainer(tmp_path / "whole", STEPS, [LowBitOptimizer(), ckpt, at_save, hyper], enable_checkpointing=True).fit(
        model, _loader(8 * SAVE))
    return model, at_save, hyper, tmp_path / "ckpt" / f"epoch=0-step={SAVE}.ckpt"


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_a_checkpoint_written_with_the_callback_resumes_without_it(tmp_path, kind):
    _, at_save, hyper, path = _run_with_callback(tmp_path, kind)
    assert at_save.state["net.0.weight"]["state1"].dtype == torch.uint8  # the run really kept 8-bit state

    pl.seed_everything(0, verbose=False)
    probe, resumed_hyper = _AtStart(), _Hyper()
    model = _model(kind)
    trainer = make_trainer(tmp_path / "plain", STEPS, [probe, resumed_hyper])
    trainer.fit(model, _loader(8 * SAVE), ckpt_path=str(path))
    assert trainer.global_step == STEPS
    expected_type = torch.optim.SGD if kind == "sgd" else torch.optim.AdamW
    assert type(probe.optimizer) is expected_type
    # the torch optimizer resumed from the 8-bit moments, decoded as the 8-bit optimizer decodes them
    keys = ("momentum_buffer",) if kind == "sgd" else ("exp_avg", "exp_avg_sq")
    for name, saved in at_save.state.items():
        state = probe.state[name]
        for key, slot in zip(keys, ("1", "2")):
            assert state[key].dtype == torch.float32
            assert torch.equal(state[key], dequantize_state(saved, slot)), (name, key)
        if kind == "adamw":
            assert float(state["step"]) == saved["step"] == SAVE
    # torch's own group keys, no bitsandbytes ones
    group = probe.optimizer.param_groups[0]
    assert "optim_bits" not in group and ("amsgrad" in group or kind == "sgd")
    # the schedule continues where it was
    assert resumed_hyper.lrs == hyper.lrs[SAVE:]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_plain_checkpoint_resumes_with_the_callback_added_and_the_schedule_continues(tmp_path):
    pl.seed_everything(0, verbose=False)
    hyper = _Hyper()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=SAVE, save_top_k=-1)
    make_trainer(tmp_path / "plain", STEPS, [ckpt, hyper], enable_checkpointing=True).fit(_model("adamw"), _loader(8 * SAVE))
    saved = torch.load(tmp_path / "ckpt" / f"epoch=0-step={SAVE}.ckpt", weights_only=False)
    torch_state = saved["optimizer_states"][0]["state"][0]  # net.0.weight

    pl.seed_everything(0, verbose=False)
    probe, resumed_hyper = _AtStart(), _Hyper()
    make_trainer(tmp_path / "8bit", STEPS, [LowBitOptimizer(), probe, resumed_hyper]).fit(
        _model("adamw"), _loader(8 * SAVE), ckpt_path=str(tmp_path / "ckpt" / f"epoch=0-step={SAVE}.ckpt"))
    assert type(probe.optimizer) is bnb.optim.AdamW8bit
    state = probe.state["net.0.weight"]
    assert state["state1"].dtype == torch.uint8 and state["step"] == SAVE
    for slot, key in (("1", "exp_avg"), ("2", "exp_avg_sq")):
        err = (dequantize_state(state, slot) - torch_state[key]).norm() / torch_state[key].norm()
        assert 0 < err < 0.03  # quantised, not lost
    assert probe.optimizer.param_groups[0]["betas"] == (0.9, 0.999) and "optim_bits" not in saved["optimizer_states"][0]
    assert resumed_hyper.lrs == hyper.lrs[SAVE:]
