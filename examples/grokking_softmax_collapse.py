"""Grokking at the edge of numerical stability: modular addition, Softmax Collapse, and two fixes.

    python examples/grokking_softmax_collapse.py                  # two runs, under two minutes on 2 CPU cores
    python examples/grokking_softmax_collapse.py --stablemax      # and a third run with StableMax

Modular addition ``(a + b) mod 113`` learned by an MLP from 40% of all pairs, full batch, AdamW with no
weight decay (the grokking-at-the-edge work's setting). Runs from the same seed:

- ``cross-entropy``: the plain loss. The model memorises the training pairs; then its logits scale up
  until the float32 softmax of the top class is exactly 1 (Softmax Collapse): the loss and gradient
  of those rows are exactly 0 and test accuracy stays low. ``SoftmaxSaturationMonitor`` watches it with
  its remedies off and reports the collapse fraction and headroom.
- ``perp_grad``: the same, with the monitor's default remedy for softmax collapse on from the start: the
  gradient is projected orthogonal to the weights (the update cannot just scale them up).
- ``stablemax`` (with ``--stablemax``): ``lightning_stability.stablemax_cross_entropy`` instead of
  cross-entropy. The monitor's statistics are those of the softmax, which this loss does not use, so
  its collapse figures say nothing about this run.

It prints the train and test accuracy of each run and the monitor's collapse statistics, and writes a
plot to ``runs/grokking/grokking.png`` (with matplotlib).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_stability import (
    SoftmaxSaturationMonitor,
    get_event_log,
    resolve_precision,
    stablemax_cross_entropy,
)

P = 113


class ModularAddition(pl.LightningModule):
    def __init__(self, loss: str, train: torch.Tensor, test: torch.Tensor, width: int = 200) -> None:
        super().__init__()
        self.loss_name = loss
        self.train_pairs, self.test_pairs = train, test
        self.net = nn.Sequential(nn.Linear(2 * P, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.head = nn.Linear(width, P)
        self.history: list[tuple[int, float, float, float]] = []  # step, loss, train acc, test acc

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        x = torch.cat([F.one_hot(pairs[:, 0], P), F.one_hot(pairs[:, 1], P)], dim=1).float()
        return self.head(self.net(x))

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        pairs = self.train_pairs
        targets = (pairs[:, 0] + pairs[:, 1]) % P
        logits = self(pairs)
        if self.loss_name == "stablemax":
            loss = stablemax_cross_entropy(logits, targets)
        else:
            loss = F.cross_entropy(logits, targets)
        if self.global_step % 20 == 0:
            with torch.no_grad():
                train_acc = (logits.argmax(-1) == targets).float().mean()
                test = self.test_pairs
                test_acc = (self(test).argmax(-1) == (test[:, 0] + test[:, 1]) % P).float().mean()
            self.history.append((self.global_step, float(loss), float(train_acc), float(test_acc)))
        return {"loss": loss, "logits": logits, "targets": targets}

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-25, weight_decay=0.0)


def split(seed: int, fraction: float = 0.4) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = torch.cartesian_prod(torch.arange(P), torch.arange(P))
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
    n = int(fraction * len(pairs))
    return pairs[order[:n]], pairs[order[n:]]


def run(name: str, steps: int, seed: int, root: str, precision: str = "32-true") -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    train, test = split(seed)
    model = ModularAddition("stablemax" if name == "stablemax" else "cross-entropy", train, test)
    remedies = {"softmax_collapse": ("perp_grad",)} if name == "perp_grad" else {"softmax_collapse": ("advise",)}
    monitor = SoftmaxSaturationMonitor(every_n_steps=20, attention=False, remedies=remedies)
    if name == "perp_grad":
        monitor.load_state_dict({"remedy_on": {"perp_grad": 0}})  # on from the first step
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(1)), batch_size=1)
    setup = resolve_precision(precision)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, callbacks=[monitor, *setup.pop("callbacks")], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, **setup,
    )
    start = time.perf_counter()
    trainer.fit(model, loader)
    events = [e for e in get_event_log(trainer) if e.source == monitor.source]
    return {
        "name": name,
        "history": model.history,
        "seconds": time.perf_counter() - start,
        "sc_frac": monitor.last_stats.get("sc_frac", float("nan")),
        "zero_loss_frac": monitor.last_stats.get("zero_loss_frac", float("nan")),
        "headroom": monitor.last_stats.get("sc_headroom_p01", float("nan")),
        "first_collapse": next((e.step for e in events if e.kind == "softmax_collapse"), None),
        "first_low": next((e.step for e in events if e.kind == "collapse_headroom_low"), None),
    }


def plot(results: list[dict[str, Any]], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    colors = {"cross-entropy": "tab:red", "perp_grad": "tab:blue", "stablemax": "tab:green"}
    for r in results:
        steps = [h[0] for h in r["history"]]
        ax.plot(steps, [h[2] for h in r["history"]], color=colors[r["name"]], ls="--", lw=1)
        ax.plot(steps, [h[3] for h in r["history"]], color=colors[r["name"]], lw=1.5, label=f"{r['name']} (test)")
    ax.set_xlabel("optimizer step (full batch)")
    ax.set_ylabel("accuracy (dashed: train)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--stablemax", action="store_true", help="add a run with stablemax_cross_entropy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/grokking")
    parser.add_argument("--precision", default="32-true", help="a precision flag: bf16-mixed, fp8, fp8-emulated, adamw8bit, fp8+adamw8bit, ... (lightning-stability doctor)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*softmax_collapse.*")
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    names = ("cross-entropy", "perp_grad") + (("stablemax",) if args.stablemax else ())
    results = [run(name, args.steps, args.seed, args.out, args.precision) for name in names]
    print(f"\nModular addition mod {P}, 40% of pairs for training, {args.steps} full-batch steps, seed {args.seed}\n")
    print(f"{'run':14s} {'train acc':>9s} {'test acc':>9s} {'sc_frac':>8s} {'zero-loss':>9s} {'headroom p01':>13s} "
          f"{'headroom low at':>16s} {'collapse at':>12s} {'seconds':>8s}")
    for r in results:
        _, _, train_acc, test_acc = r["history"][-1]
        flagged = "-" if r["first_collapse"] is None else str(r["first_collapse"])
        low = "-" if r["first_low"] is None else str(r["first_low"])
        print(f"{r['name']:14s} {train_acc:9.3f} {test_acc:9.3f} {r['sc_frac']:8.3f} {r['zero_loss_frac']:9.3f} "
              f"{r['headroom']:13.2f} {low:>16s} {flagged:>12s} {r['seconds']:8.1f}")
    path = os.path.join(args.out, "grokking.png")
    if plot(results, path):
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
