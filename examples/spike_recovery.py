"""Each kind of fault on its own, and how the guard and the rollback handle it.

    python examples/spike_recovery.py                  # nine runs of 200 steps, about a minute on 2 CPU cores
    python examples/spike_recovery.py --no-guard       # the same faults with no callbacks: what they do unhandled

The tiny GPT trains 200 steps; at step 120 one fault is injected (``lightning_stability.demos.FaultInjector``):
gradient spikes of 10x, 100x and 1000x on every element or 1000x on 1% of them, a NaN gradient, a NaN
loss, a batch with shuffled labels, a NaN written into a weight. ``GradientSpikeGuard`` and
``InMemoryRollback`` watch at their defaults. For each fault it prints what was detected, when, what
was done, and the final loss against a clean run's.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_stability import (
    HALTED_EXIT_CODE,
    GradientSpikeGuard,
    InMemoryRollback,
    get_event_log,
    halt_report,
    resolve_precision,
)
from lightning_stability.demos import FaultInjector, TinyGPT, make_dataloader

FAULT_STEP = 120
FAULTS: dict[str, tuple[str, float | None] | None] = {
    "clean": None,
    "gradient x10": ("grad_scale", 10.0),
    "gradient x100": ("grad_scale", 100.0),
    "gradient x1000": ("grad_scale", 1000.0),
    "1% of gradient x1000": ("grad_sparse", 1000.0),
    "NaN gradient": ("grad_nan", None),
    "NaN loss": ("loss_nan", None),
    "shuffled labels": ("labels_shuffle", None),
    "NaN weight": ("weight_nan", None),
}


class Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]) if isinstance(outputs, dict) else math.nan)


def run(name: str, steps: int = 200, guard: bool = True, precision: str = "32-true") -> dict[str, Any]:
    loader, dataset = make_dataloader(block_size=64, batch_size=16, n_samples=16 * steps)
    pl.seed_everything(0, verbose=False)
    model = TinyGPT(len(dataset.vocab), block_size=64, d_model=64, n_layer=2, n_head=4, max_steps=steps)
    fault = FAULTS[name]
    losses = Losses()
    callbacks: list[pl.Callback] = [FaultInjector({FAULT_STEP: fault} if fault else {})]
    if guard:
        callbacks += [GradientSpikeGuard(), InMemoryRollback(every_n_steps=25, commit_after=10)]
    setup = resolve_precision(precision)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, callbacks=[*callbacks, losses, *setup.pop("callbacks")],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **setup,
    )
    trainer.fit(model, loader)
    acted = [e for e in get_event_log(trainer) if e.severity != "info"]
    tail = [x for x in losses.losses[-20:] if math.isfinite(x)]
    return {
        "name": name,
        "detected": ", ".join(f"{e.kind}@{e.step}" for e in acted) or "-",
        "actions": ", ".join(sorted({e.action for e in acted if e.action})) or "-",
        "final": sum(tail) / len(tail) if tail else math.nan,
        "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        "halted": halt_report(trainer),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--no-guard", action="store_true", help="inject the faults with no callbacks")
    parser.add_argument("--precision", default="32-true", help="a precision flag (bf16-mixed, fp8-emulated, adamw8bit, ...)")
    args = parser.parse_args()
    for pattern in (".*does not have many workers.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", pattern)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    results = [run(name, args.steps, not args.no_guard, args.precision) for name in FAULTS]
    clean = results[0]["final"]
    print(f"\nOne fault at step {FAULT_STEP} of {args.steps}; {'no callbacks' if args.no_guard else 'guard and rollback'}\n")
    print(f"{'fault':22s} {'detected (kind@step)':38s} {'actions':22s} {'final loss':>10s} {'vs. clean':>9s} {'finite':>6s}")
    for r in results:
        ratio = r["final"] / clean if math.isfinite(r["final"]) else math.nan
        print(f"{r['name']:22s} {r['detected'][:38]:38s} {r['actions'][:22]:22s} {r['final']:10.4f} {ratio:8.3f}x "
              f"{str(r['finite']):>6s}")
    halted = [r for r in results if r["halted"]]
    for r in halted:
        print(f"\n{r['name']}: training was halted: {r['halted']}")
    return HALTED_EXIT_CODE if halted else 0


if __name__ == "__main__":
    sys.exit(main())
