"""GPU validation on an SM 8.9+ GPU (H100/H200): real FP8 with Transformer Engine against bf16 and the
emulator, bitsandbytes' 8-bit optimizers on CUDA, and the monitors' cost and host synchronisations.

    python -m benchmarks.gpu                 # the full run; prints the tables (docs/gpu.md holds them)
    python -m benchmarks.gpu --quick         # a few steps of each part
    python -m benchmarks.gpu --part fp8      # one part: fp8, throughput, optim, monitors, syncs

Needs CUDA; the FP8 parts need Transformer Engine (``pip install "lightning-stability[fp8]"``) and the
optimizer part bitsandbytes. Ratios are measured side by side in one process, runs interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_stability import (
    FP8Precision,
    GradientSpikeGuard,
    InMemoryRollback,
    LowBitOptimizer,
    SoftmaxSaturationMonitor,
    SpectralMonitor,
)
from lightning_stability.demos import TinyGPT, make_dataloader

# (name, d_model, n_layer, n_head): GPT-style models around 125 M and 350 M parameters, and a wide one
SIZES = {"gpt-125m": (768, 12, 12), "gpt-350m": (1024, 24, 16), "d2048-L8": (2048, 8, 16)}
BLOCK, BATCH = 512, 16


class Timer(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.seconds: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._t)
        self.losses.append(float(outputs["loss"]))


def fit(size: str, steps: int, precision: Any = "bf16-mixed", callbacks: list[Callback] | None = None,
        seed: int = 0) -> tuple[pl.Trainer, Timer]:
    d, layers, heads = SIZES[size]
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        loader, dataset = make_dataloader(block_size=BLOCK, batch_size=BATCH, n_samples=BATCH * steps)
        pl.seed_everything(seed, verbose=False)
        model = TinyGPT(len(dataset.vocab), block_size=BLOCK, d_model=d, n_layer=layers, n_head=heads,
                        max_steps=steps, lr=6e-4, warmup_steps=min(100, steps // 10 + 1))
        timer = Timer()
        kwargs: dict[str, Any] = {"plugins": [precision]} if isinstance(precision, FP8Precision) else {"precision": precision}
        trainer = pl.Trainer(accelerator="gpu", devices=1, max_steps=steps, default_root_dir=root,
                             callbacks=[*(callbacks or []), timer], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, **kwargs)
        torch.cuda.reset_peak_memory_stats()
        trainer.fit(model, loader)
    return trainer, timer


def _tokens_per_s(timer: Timer, warmup: int) -> float:
    return BLOCK * BATCH / statistics.median(timer.seconds[warmup:])


def part_fp8(steps: int, progress: Callable[[str], None]) -> list[str]:
    """FP8 (TE) against bf16 and the emulator: loss curves and tokens per second."""
    rows = ["| model | arm | final loss (last 20) | gap vs. bf16 | tokens/s | vs. bf16 |", "|---|---|---:|---:|---:|---:|"]
    for size in ("gpt-125m", "gpt-350m"):
        results = {}
        for arm, prec in (("bf16", "bf16-mixed"), ("fp8 (TE, delayed)", FP8Precision(backend="te")),
                          ("fp8 (TE, current)", FP8Precision(backend="te", recipe="current")),
                          ("fp8 (emulated)", FP8Precision(backend="emulated"))):
            _, timer = fit(size, steps, prec)
            results[arm] = (sum(timer.losses[-20:]) / 20, _tokens_per_s(timer, 10))
            progress(f"{size} {arm}: loss {results[arm][0]:.4f}, {results[arm][1]:.0f} tokens/s")
        base_loss, base_tps = results["bf16"]
        for arm, (loss, tps) in results.items():
            rows.append(f"| {size} | {arm} | {loss:.4f} | {abs(loss - base_loss) / base_loss:.2%} | {tps:.0f} | {tps / base_tps:.2f}x |")
    return rows


def part_throughput(steps: int, progress: Callable[[str], None]) -> list[str]:
    rows = ["| model | bf16 tokens/s | FP8 (TE) tokens/s | ratio (goal >= 1.3x) |", "|---|---:|---:|---:|"]
    for size in ("d2048-L8",):
        bf16 = [_tokens_per_s(fit(size, steps, "bf16-mixed")[1], 5) for _ in range(2)]
        fp8 = [_tokens_per_s(fit(size, steps, FP8Precision(backend="te"))[1], 5) for _ in range(2)]
        ratio = statistics.median(fp8) / statistics.median(bf16)
        progress(f"{size}: FP8/bf16 throughput {ratio:.2f}x")
        rows.append(f"| {size} | {statistics.median(bf16):.0f} | {statistics.median(fp8):.0f} | {ratio:.2f}x |")
    return rows


def part_optim(steps: int, progress: Callable[[str], None]) -> list[str]:
    rows = ["| optimizer | peak GPU memory (GiB) | vs. AdamW | final loss | vs. AdamW |", "|---|---:|---:|---:|---:|"]
    results = {}
    for name, callbacks in (("AdamW (fp32 state)", []), ("AdamW8bit", [LowBitOptimizer()]),
                            ("PagedAdamW8bit", [LowBitOptimizer(paged=True)])):
        _, timer = fit("gpt-350m", steps, "bf16-mixed", callbacks)
        results[name] = (torch.cuda.max_memory_allocated() / 2**30, sum(timer.losses[-20:]) / 20)
        progress(f"{name}: {results[name][0]:.2f} GiB, loss {results[name][1]:.4f}")
    mem0, loss0 = results["AdamW (fp32 state)"]
    for name, (mem, loss) in results.items():
        rows.append(f"| {name} | {mem:.2f} | {mem / mem0:.3f}x | {loss:.4f} | {loss / loss0:.4f}x |")
    return rows


MONITORS: dict[str, Callable[[], list[Callback]]] = {
    "none": lambda: [],
    "GradientSpikeGuard": lambda: [GradientSpikeGuard()],
    "SpectralMonitor": lambda: [SpectralMonitor()],
    "SoftmaxSaturationMonitor": lambda: [SoftmaxSaturationMonitor()],
    "InMemoryRollback": lambda: [InMemoryRollback(every_n_steps=100)],
    "all": lambda: [GradientSpikeGuard(), SpectralMonitor(), SoftmaxSaturationMonitor(), InMemoryRollback(every_n_steps=100)],
}


def part_monitors(steps: int, repeats: int, progress: Callable[[str], None]) -> list[str]:
    times: dict[str, list[float]] = {k: [] for k in MONITORS}
    for repeat in range(repeats):
        for name, make in MONITORS.items():
            _, timer = fit("gpt-125m", steps, "bf16-mixed", make())
            times[name].append(statistics.median(timer.seconds[40:]))
            progress(f"monitors {name} repeat {repeat}: {times[name][-1] * 1e3:.1f} ms/step")
    base = statistics.median(times["none"])
    rows = ["| callbacks | ms/step | vs. none (goal <= 1.02x) |", "|---|---:|---:|"]
    rows += [f"| {k} | {statistics.median(v) * 1e3:.1f} | {statistics.median(v) / base:.3f}x |" for k, v in times.items()]
    return rows


class SyncCounter(Callback):
    """Counts host synchronisations (CUDA sync debug mode warnings) in steps no monitor samples."""

    def __init__(self, quiet_steps: set[int]) -> None:
        self.quiet_steps, self.counts = quiet_steps, {}
        self._ctx: Any = None
        self._caught: list[Any] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step in self.quiet_steps:
            self._ctx = warnings.catch_warnings(record=True)
            self._caught = self._ctx.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._ctx is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._ctx.__exit__(None, None, None)
            self.counts[trainer.global_step - 1] = sum("synchroniz" in str(w.message) for w in self._caught)
            self._ctx = None


def part_syncs(progress: Callable[[str], None]) -> list[str]:
    """Steps 61..69: no logging step (every 50), no softmax sample (every 50), no rollback snapshot."""
    quiet = set(range(61, 70))
    rows = ["| callbacks | host synchronisations per quiet step (median) |", "|---|---:|"]
    for name in ("none", "GradientSpikeGuard", "SpectralMonitor", "SoftmaxSaturationMonitor", "all"):
        counter = SyncCounter(quiet)
        fit("gpt-125m", 72, "bf16-mixed", [*MONITORS[name](), counter])
        median = statistics.median(counter.counts.values()) if counter.counts else float("nan")
        progress(f"syncs {name}: {counter.counts}")
        rows.append(f"| {name} | {median:g} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", choices=("fp8", "throughput", "optim", "monitors", "syncs", "all"), default="all")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.gpu: needs a CUDA GPU (SM 8.9+ for FP8); none here.", file=sys.stderr)
        return 2
    progress = lambda line: print(line, flush=True)  # noqa: E731
    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    print(f"GPU: {name} (SM {major}.{minor}); torch {torch.__version__}", flush=True)
    steps = 20 if args.quick else 300
    parts = {
        "fp8": lambda: part_fp8(steps, progress),
        "throughput": lambda: part_throughput(10 if args.quick else 60, progress),
        "optim": lambda: part_optim(10 if args.quick else 200, progress),
        "monitors": lambda: part_monitors(60 if args.quick else 140, 1 if args.quick else 3, progress),
        "syncs": lambda: part_syncs(progress),
    }
    for key, run in parts.items():
        if args.part in (key, "all"):
            print(f"\n### {key}\n")
            print("\n".join(run()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
