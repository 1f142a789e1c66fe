"""FP8 and narrower: train the tiny GPT with its linear layers in ever fewer bits and watch FP8 health.

    python examples/fp8_precision_sweep.py                 # six runs, about a minute on 2 CPU cores
    python examples/fp8_precision_sweep.py --fallback      # the same with per-layer fallback to bf16 on

``FP8Precision(backend="emulated")`` quantises every linear layer FP8 can take (the first, the last and
the head stay in high precision) to a format with ``e`` exponent and ``m`` mantissa bits, with
per-tensor delayed scaling as Transformer Engine does: FP8's E4M3 forward / E5M2 gradients, then
narrower IEEE-like formats. ``FP8Precision`` watches each layer's overflow and underflow fractions and
warns (``fp8_unhealthy``) when a layer stays past its limits; with ``--fallback`` such a layer runs in
bf16 for a while instead. The reference runs at ``--precision`` (default float32).

It prints each run's final loss against the reference, the first warning and the worst layer's
underflow fraction, and writes a plot to ``runs/fp8_sweep/fp8_sweep.png`` (with matplotlib).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_stability import FP8Precision, get_event_log, resolve_precision
from lightning_stability.demos import TinyGPT, make_dataloader
from lightning_stability.ops.fp8 import E4M3, E5M2, FP8Format

FORMATS: dict[str, tuple[FP8Format, FP8Format]] = {
    "e4m3/e5m2": (E4M3, E5M2),
    "e3m2": (FP8Format.custom(3, 2),) * 2,
    "e3m1": (FP8Format.custom(3, 1),) * 2,
    "e2m1": (FP8Format.custom(2, 1),) * 2,
    "e2m0": (FP8Format.custom(2, 0),) * 2,
}


class Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))


def run(name: str, steps: int, fallback: bool, precision: str = "32-true") -> dict[str, Any]:
    loader, dataset = make_dataloader(block_size=64, batch_size=16, n_samples=16 * steps)
    pl.seed_everything(0, verbose=False)
    model = TinyGPT(len(dataset.vocab), block_size=64, d_model=64, n_layer=2, n_head=4, max_steps=steps)
    losses = Losses()
    plugin = None
    if name == "reference":
        setup = resolve_precision(precision)
    else:
        plugin = FP8Precision(backend="emulated", formats=FORMATS[name], fallback=fallback, health_every_n_steps=10)
        setup = {"plugins": [plugin], "callbacks": []}
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, callbacks=[losses, *setup.pop("callbacks")], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **setup,
    )
    start = time.perf_counter()
    trainer.fit(model, loader)
    events = [e for e in get_event_log(trainer) if e.source == "FP8Precision"]
    health = plugin.last_health if plugin is not None else {}
    return {
        "name": name,
        "losses": losses.losses,
        "final": sum(losses.losses[-20:]) / min(20, len(losses.losses)),
        "first_warning": min((e.step for e in events if e.kind in ("fp8_unhealthy", "fp8_fallback")), default=None),
        "fallbacks": sum(e.kind == "fp8_fallback" for e in events),
        "underflow": max((v for k, v in health.items() if k.endswith("underflow_frac")), default=0.0),
        "seconds": time.perf_counter() - start,
    }


def plot(results: list[dict[str, Any]], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for r in results:
        smooth = [sum(r["losses"][max(0, i - 19): i + 1]) / (i + 1 - max(0, i - 19)) for i in range(len(r["losses"]))]
        ax.plot(smooth, lw=1.6 if r["name"] == "reference" else 1.1, color="black" if r["name"] == "reference" else None,
                label=r["name"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (20-step mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--fallback", action="store_true", help="let unhealthy layers fall back to bf16")
    parser.add_argument("--precision", default="32-true", help="the reference run's precision flag")
    parser.add_argument("--out", default="runs/fp8_sweep")
    args = parser.parse_args()
    for pattern in (".*does not have many workers.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", pattern)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    results = [run(name, args.steps, args.fallback, args.precision) for name in ("reference", *FORMATS)]
    base = results[0]["final"]
    print(f"\nTiny GPT, {args.steps} steps; FP8 health every 10 steps, fallback {'on' if args.fallback else 'off'}\n")
    print(f"{'run':11s} {'final loss':>10s} {'vs. reference':>13s} {'first warning':>13s} {'fallbacks':>9s} "
          f"{'worst underflow':>15s} {'seconds':>8s}")
    for r in results:
        warn = "-" if r["first_warning"] is None else str(r["first_warning"])
        print(f"{r['name']:11s} {r['final']:10.3f} {r['final'] / base:12.2f}x {warn:>13s} {r['fallbacks']:9d} "
              f"{r['underflow']:15.3f} {r['seconds']:8.1f}")
    path = os.path.join(args.out, "fp8_sweep.png")
    if plot(results, path):
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
