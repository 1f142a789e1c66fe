"""Run by test_fsdp.py as its own program: Lightning re-executes this file per rank (FSDP2 on 2 gloo ranks).

One fit with SpectralMonitor, InMemoryRollback and SoftmaxSaturationMonitor on a row-sharded TinyGPT."""

from __future__ import annotations

import hashlib
import json
import sys

import lightning.pytorch as pl
import torch
from torch.distributed.tensor import DTensor

from lightning_stability import InMemoryRollback, SoftmaxSaturationMonitor, SpectralMonitor, get_event_log
from tests.callbacks._fsdp_model import CountCollectives, fsdp_trainer, sharded_gpt

BUMP_STEP, NAN_STEP, STEPS = 44, 53, 60


class Bump(pl.Callback):
    """A rank-one bump of one weight at the end of step 44, the same full matrix on every rank: each
    rank adds its own rows of it."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step - 1 == BUMP_STEP:
            w = pl_module.blocks[0].mlp[0].weight
            full = w.full_tensor()
            g = torch.Generator().manual_seed(1)
            a, b = torch.randn(full.shape[0], generator=g), torch.randn(full.shape[1], generator=g)
            bump = 3.0 * torch.linalg.matrix_norm(full, 2) * torch.outer(a / a.norm(), b / b.norm())
            rows = w.to_local().shape[0]
            start = trainer.global_rank * -(-full.shape[0] // 2)
            with torch.no_grad():
                w.to_local().add_(bump[start:start + rows])


class NanOnRankOne(pl.Callback):
    def __init__(self):
        self.hook = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == NAN_STEP and trainer.global_rank == 1:
            self.hook = pl_module.lm_head.register_forward_hook(lambda m, a, out: out + float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.hook is not None:
            self.hook.remove()
            self.hook = None


def local_digest(pl_module) -> str:
    return hashlib.sha256(b"".join(p.to_local().detach().numpy().tobytes() for p in pl_module.parameters())).hexdigest()


class Record(pl.Callback):
    """Last in the list: per step, the collectives the monitor issued, the whole weights it gathered,
    each rank's digest of its own shards, and the monitor's estimates against the gathered weights."""

    def __init__(self, monitor: SpectralMonitor, counter: CountCollectives):
        self.monitor, self.counter = monitor, counter
        self.calls: dict[int, dict[str, int]] = {}
        self.gathers: dict[int, int] = {}
        self.digests: dict[int, str] = {}
        self.capped: dict[str, float] = {}
        self._gathered = 0
        original = DTensor.full_tensor

        def counted(t, *args, **kwargs):
            if self.counter.active:
                self._gathered += 1
            return original(t, *args, **kwargs)

        DTensor.full_tensor = counted
        for hook in ("on_before_optimizer_step", "on_train_batch_end"):
            bound = getattr(monitor, hook)

            def wrapped(*args, _bound=bound, **kwargs):
                self.counter.active = True
                try:
                    return _bound(*args, **kwargs)
                finally:
                    self.counter.active = False

            setattr(monitor, hook, wrapped)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        calls = self.counter.reset()
        self.calls[step] = calls
        self.gathers[step], self._gathered = self._gathered, 0
        self.digests[trainer.global_step] = local_digest(pl_module)
        if any(e.step == trainer.global_step - 1 and e.action == "cap" for e in get_event_log(trainer)):
            w = pl_module.blocks[0].mlp[0].weight.full_tensor()
            self.capped["after"] = float(torch.linalg.matrix_norm(w, 2))


def main(out: str) -> None:
    counter = CountCollectives()
    model, loader = sharded_gpt(STEPS)
    spectral = SpectralMonitor(check_every_n_steps=5, warmup=30, ladder=("cap",), full_every_n_steps=20,
                               loss_tolerance=10.0)
    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=3)
    softmax = SoftmaxSaturationMonitor(every_n_steps=5)
    record = Record(spectral, counter)
    trainer = fsdp_trainer(out, STEPS, [Bump(), NanOnRankOne(), spectral, rollback, softmax, record])
    trainer.fit(model, loader)
    for g in spectral._tracker.groups:  # converged, so the estimates can be held to the exact values tightly
        spectral._tracker.converge_group(g, 10, 300)
    estimates = spectral.estimates()  # a collective under sharding: every rank asks
    exact = {}
    for name, layer in spectral._tracker.layers.items():
        w = layer.param.full_tensor().reshape(layer.param.shape[0], -1)
        exact[name] = [float(torch.linalg.matrix_norm(w, 2)), float(w.pow(2).sum() / torch.linalg.matrix_norm(w, 2) ** 2)]
    events = [(e.step, e.kind, e.action, e.target) for e in get_event_log(trainer)]
    cap = [e.metrics for e in get_event_log(trainer) if e.action == "cap"]
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as fh:
        json.dump({
            "events": events,
            "estimates": {k: [v["sigma_max"], v["stable_rank"]] for k, v in estimates.items()},
            "exact": exact,
            "calls": record.calls, "gathers": record.gathers, "digests": record.digests,
            "rollbacks": [(r["step"], r["restored_step"]) for r in rollback.rollbacks],
            "cap": dict(cap[0]) if cap else None, "capped": record.capped,
            "softmax": softmax.last_stats,
            "full": {k: spectral._full.results.get(k, {}).get("sigma_max") for k in spectral.layer_names},
        }, fh, default=str)


if __name__ == "__main__":
    main(sys.argv[1])
