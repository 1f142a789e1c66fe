"""LowBitOptimizer with the schedulers and models users have: every torch scheduler (nested ones
included) keeps driving the 8-bit optimizer, the learning rate equal to the plain run's at every step;
layers built in ``configure_model`` are swapped like any others."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import lr_scheduler as S

from lightning_stability import LowBitOptimizer
from tests.conftest import make_trainer

bnb = pytest.importorskip("bitsandbytes")
STEPS = 12

SCHEDULERS = {
    "LinearLR": lambda opt: S.LinearLR(opt, start_factor=0.1, total_iters=6),
    "CosineAnnealingLR": lambda opt: S.CosineAnnealingLR(opt, T_max=STEPS),
    "LambdaLR": lambda opt: S.LambdaLR(opt, lambda step: 1.0 / (1 + step)),
    # warm-up then cosine, the usual LLM schedule
    "SequentialLR": lambda opt: S.SequentialLR(
        opt, [S.LinearLR(opt, start_factor=0.1, total_iters=4), S.CosineAnnealingLR(opt, T_max=STEPS - 4)],
        milestones=[4]),
    "ChainedScheduler": lambda opt: S.ChainedScheduler(
        [S.LinearLR(opt, start_factor=0.2, total_iters=5), S.ExponentialLR(opt, gamma=0.9)]),
    "SequentialLR(ChainedScheduler)": lambda opt: S.SequentialLR(
        opt, [S.ChainedScheduler([S.LinearLR(opt, start_factor=0.2, total_iters=3), S.ExponentialLR(opt, gamma=0.8)]),
              S.StepLR(opt, step_size=2, gamma=0.5)], milestones=[5]),
    "OneCycleLR": lambda opt: S.OneCycleLR(opt, max_lr=1e-2, total_steps=STEPS),
    # the monitored metric never improves: the LR halves every second step after the first
    "ReduceLROnPlateau": lambda opt: S.ReduceLROnPlateau(opt, factor=0.5, patience=1),
}


class _Scheduled(pl.LightningModule):
    def __init__(self, scheduler, configured=False):
        super().__init__()
        self.scheduler, self.configured, self.net = scheduler, configured, None
        if not configured:
            self.configure_model()

    def configure_model(self):
        if self.net is None:  # 64 x 64 = 4096 values: 8-bit state
            self.net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))

    def training_step(self, batch, batch_idx):
        self.log("const", 1.0)
        return F.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.01)
        sched = {"scheduler": SCHEDULERS[self.scheduler](opt), "interval": "step"}
        if self.scheduler == "ReduceLROnPlateau":
            sched["monitor"] = "const"
        return {"optimizer": opt, "lr_scheduler": sched}


def _loader(n=8 * STEPS):
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(n, 64, generator=g), torch.randn(n, 64, generator=g)), batch_size=8)


class _Hyper(pl.Callback):
    """The learning rate and betas each step runs with."""

    def __init__(self):
        self.lrs, self.betas = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        group = trainer.optimizers[0].param_groups[0]
        self.lrs.append(group["lr"])
        self.betas.append(tuple(group.get("betas", ())))


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_the_lr_equals_the_plain_runs_at_every_step(tmp_path, name):
    runs = {}
    for run, callbacks in (("torch", []), ("8bit", [LowBitOptimizer()])):
        pl.seed_everything(0, verbose=False)
        hyper = _Hyper()
        trainer = make_trainer(tmp_path / run, STEPS, [*callbacks, hyper])
        trainer.fit(_Scheduled(name), _loader())
        runs[run] = hyper
    assert type(trainer.optimizers[0]) is bnb.optim.AdamW8bit
    assert len(runs["8bit"].lrs) == STEPS
    assert runs["8bit"].lrs == runs["torch"].lrs  # exactly, step by step
    assert len(set(runs["torch"].lrs)) > 2  # the schedule really moves
    assert runs["8bit"].betas == runs["torch"].betas  # OneCycleLR cycles the momentum (beta1) too
    if name == "OneCycleLR":
        assert len(set(runs["torch"].betas)) > 2


@pytest.mark.parametrize("configured", [False, True], ids=["__init__", "configure_model"])
def test_layers_built_in_configure_model_are_swapped(tmp_path, configured):
    model = _Scheduled("LinearLR", configured=configured)
    assert (model.net is None) == configured
    swap = LowBitOptimizer()
    trainer = make_trainer(tmp_path, 3, [swap])
    trainer.fit(model, _loader())
    opt = trainer.optimizers[0]
    assert type(opt) is bnb.optim.AdamW8bit
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert opt.state[model.net[0].weight]["state1"].dtype == torch.uint8  # 8-bit state for the layers built late
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is opt
