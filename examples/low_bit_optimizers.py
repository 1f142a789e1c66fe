"""8-bit optimizer state: the same training with torch's AdamW and with bitsandbytes' AdamW8bit.

    python examples/low_bit_optimizers.py                       # three runs, under a minute on 2 CPU cores
    python examples/low_bit_optimizers.py --precision bf16-mixed

``LowBitOptimizer`` swaps the model's optimizer for its 8-bit equivalent at fit start, keeping the
parameter groups and the learning-rate schedule; the embeddings, the output head and the norms keep
32-bit state by default (``keep_32bit=()`` makes every large tensor 8-bit). It prints the optimizer
state in bytes per parameter, the final loss and the step time of each run. ``--precision`` sets the
precision of all three runs (a Lightning string or an FP8 flag: ``fp8-emulated``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_stability import LowBitOptimizer, resolve_precision
from lightning_stability.demos import TinyGPT, make_dataloader

RUNS = {  # the callbacks of each run, made fresh for every fit
    "AdamW": lambda: [],
    "AdamW8bit": lambda: [LowBitOptimizer()],
    "AdamW8bit, all 8-bit": lambda: [LowBitOptimizer(keep_32bit=())],
}


class Record(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.seconds: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.seconds.append(time.perf_counter() - self._t)
        self.losses.append(float(outputs["loss"]))


def run(name: str, steps: int, precision: str = "32-true") -> dict[str, Any]:
    setup = resolve_precision(precision)
    if setup["callbacks"]:
        raise SystemExit(f"--precision {precision!r}: give a precision only; this example chooses the optimizers")
    loader, dataset = make_dataloader(block_size=64, batch_size=16, n_samples=16 * steps)
    pl.seed_everything(0, verbose=False)
    model = TinyGPT(len(dataset.vocab), block_size=64, d_model=128, n_layer=2, n_head=4, max_steps=steps)
    record = Record()
    setup.pop("callbacks")
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, callbacks=[*RUNS[name](), record], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **setup,
    )
    trainer.fit(model, loader)
    opt = trainer.optimizers[0]
    params = sum(p.numel() for g in opt.param_groups for p in g["params"])
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return {
        "name": name,
        "optimizer": type(opt).__name__,
        "bytes": state / params,
        "final": sum(record.losses[-20:]) / min(20, len(record.losses)),
        "ms": statistics.median(record.seconds[5:] or record.seconds) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--precision", default="32-true", help="a precision flag for all runs (bf16-mixed, fp8-emulated, ...)")
    args = parser.parse_args()
    for pattern in (".*does not have many workers.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", pattern)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    results = [run(name, args.steps, args.precision) for name in RUNS]
    base = results[0]
    print(f"\nTiny GPT (width 128, 2 layers), {args.steps} steps, precision {args.precision}\n")
    print(f"{'run':22s} {'optimizer':12s} {'state bytes/param':>17s} {'final loss':>10s} {'vs. AdamW':>9s} {'ms/step':>8s}")
    for r in results:
        print(f"{r['name']:22s} {r['optimizer']:12s} {r['bytes']:17.2f} {r['final']:10.4f} "
              f"{r['final'] / base['final']:8.4f}x {r['ms']:8.1f}")


if __name__ == "__main__":
    main()
