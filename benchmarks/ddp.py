"""Distributed training (DDP): what the stability monitors at their defaults cost a DDP step, on two CPU
processes (gloo), against the same fit without them.

    python -m benchmarks.ddp            # rewrites the Distributed training (DDP) section of docs/benchmarks.md
    python -m benchmarks.ddp --quick    # the CI smoke test: a few steps, prints, writes nothing

One launch of two ranks runs every fit, arms interleaved (their order alternating between repeats), so
both arms see the same machine; the step time is rank 0's wall time from one batch's start to the next.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from lightning_stability import (
    GradientSpikeGuard,
    InMemoryRollback,
    SoftmaxSaturationMonitor,
    SpectralMonitor,
)
from lightning_stability.demos import TinyGPT, make_dataloader

SECTION = "## Distributed training (DDP)"
ARMS = ("no callbacks", "our monitors")
RANKS = 2


@dataclass(frozen=True)
class Settings:
    d_model: int
    n_layer: int
    block: int
    batch: int  # per rank
    warmup: int  # untimed steps at the start of every fit
    steps: int  # timed steps
    repeats: int


# 150 timed steps from step 20 hold the monitors' sampled steps at their defaults: the softmax sample and
# the spectral check every 50 steps, a rollback snapshot at step 100
FULL = Settings(d_model=64, n_layer=2, block=64, batch=16, warmup=20, steps=150, repeats=5)
QUICK = Settings(d_model=32, n_layer=1, block=16, batch=8, warmup=3, steps=12, repeats=1)


def monitors() -> list[Callback]:
    return [GradientSpikeGuard(), SpectralMonitor(), SoftmaxSaturationMonitor(), InMemoryRollback()]


class StepTimer(Callback):
    """Wall time from one training batch's start to the next (the whole step: forward, backward, DDP's
    gradient all-reduce, the optimizer, every callback)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last is not None and trainer.global_step > self.warmup:
            self.times.append(now - self._last)
        self._last = now

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._last is not None:
            self.times.append(time.perf_counter() - self._last)


def fit(arm: str, settings: Settings, root: str) -> list[float]:
    """One DDP fit of ``warmup + steps`` steps; the timed steps' seconds (on this rank)."""
    pl.seed_everything(0, verbose=False)
    total = settings.warmup + settings.steps
    loader, ds = make_dataloader(block_size=settings.block, batch_size=settings.batch,
                                 n_samples=settings.batch * RANKS * (total + 1), seed=0)
    model = TinyGPT(len(ds.vocab), block_size=settings.block, d_model=settings.d_model, n_layer=settings.n_layer,
                    n_head=2, max_steps=total, warmup_steps=10)
    timer = StepTimer(settings.warmup)
    callbacks = [timer, *(monitors() if arm == "our monitors" else [])]
    trainer = pl.Trainer(
        accelerator="cpu", devices=RANKS, strategy="ddp", max_steps=total, callbacks=callbacks,
        logger=CSVLogger(root, name=arm.replace(" ", "_")), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root,
    )
    trainer.fit(model, loader)
    return timer.times


def worker(out: str, settings: Settings) -> None:
    """Rank ``LOCAL_RANK`` of the launch (Lightning starts rank 1 by running this command again)."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(settings.repeats):
            for arm in ARMS if repeat % 2 == 0 else ARMS[::-1]:
                results.append({"repeat": repeat, "arm": arm, "times": fit(arm, settings, root)})
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump(results, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(settings: Settings, progress: Callable[[str], None]) -> dict[str, Any]:
    """Launch the two ranks (a fresh process, so that this one stays out of the process group)."""
    progress(f"DDP on {RANKS} CPU processes: {settings.repeats} repeats of {len(ARMS)} arms, {settings.steps} timed steps each")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port()),
               "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "benchmarks.ddp", "--worker", out, json.dumps(asdict(settings))]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"the DDP launch failed (exit code {proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(out) as f:
            results = json.load(f)
    for r in results:
        progress(f"  repeat {r['repeat']}, {r['arm']}: median {statistics.median(r['times']) * 1e3:.1f} ms/step")
    return {"results": results, "cores": os.cpu_count() or 1}


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm the median over repeats of each fit's median and mean step time; per repeat the ratios."""
    by = {(r["repeat"], r["arm"]): r["times"] for r in results}
    repeats = sorted({r["repeat"] for r in results})
    med = {arm: [statistics.median(by[(i, arm)]) for i in repeats] for arm in ARMS}
    mean = {arm: [statistics.fmean(by[(i, arm)]) for i in repeats] for arm in ARMS}
    ratios = [med[ARMS[1]][i] / med[ARMS[0]][i] for i in range(len(repeats))]
    mean_ratios = [mean[ARMS[1]][i] / mean[ARMS[0]][i] for i in range(len(repeats))]
    return {"median": {a: statistics.median(v) for a, v in med.items()},
            "mean": {a: statistics.median(v) for a, v in mean.items()},
            "ratios": ratios, "mean_ratios": mean_ratios,
            "ratio": statistics.median(ratios), "mean_ratio": statistics.median(mean_ratios)}


def render_section(settings: Settings, result: dict[str, Any], seconds: float, machine: str) -> str:
    s = summarise(result["results"])
    rows = "\n".join(
        f"| {arm} | {s['median'][arm] * 1e3:.1f} | {s['mean'][arm] * 1e3:.1f} |" for arm in ARMS
    )
    per_repeat = ", ".join(f"{r:.3f}" for r in s["ratios"])
    per_repeat_mean = ", ".join(f"{r:.3f}" for r in s["mean_ratios"])
    return f"""
{SECTION}

```bash
python -m benchmarks.ddp   # rewrites this section only ({seconds / 60:.1f} minutes for the run below)
```

{machine} Two DDP ranks on this CPU (gloo, one thread each).

The tiny GPT (d_model {settings.d_model}, layers {settings.n_layer}, block {settings.block}), {settings.batch}
sequences a rank, Lightning's `strategy="ddp"` on `devices={RANKS}`; *our monitors*: `GradientSpikeGuard()`,
`SpectralMonitor()`, `SoftmaxSaturationMonitor()`, `InMemoryRollback()` at their defaults, both arms with a
`CSVLogger`. Each fit runs {settings.warmup} untimed and {settings.steps} timed steps; repeats:
{settings.repeats}, the arms interleaved. The median step is a step without sampling; the mean spreads the sampled
steps (the softmax sample and the spectral check every 50 steps, a snapshot every 100) over all.

| arm | median step (ms) | mean step (ms) |
|---|---:|---:|
{rows}

- Ratio of the median steps, ours over none: **{s['ratio']:.3f}** (per repeat: {per_repeat}).
- Ratio of the mean steps: **{s['mean_ratio']:.3f}** (per repeat: {per_repeat_mean}).
- Collectives the monitors add on a step without sampling: one all-gather of 7 numbers (the guard's 4,
  carrying the rollback's 3 flags); see [Distributed training](distributed.md) for the counts.
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1], Settings(**json.loads(argv[2])))
        return 0
    from benchmarks.__main__ import run_section

    return run_section(argv, "python -m benchmarks.ddp", __doc__.splitlines()[0], SECTION, QUICK, FULL, run,
                       render_section)


if __name__ == "__main__":
    sys.exit(main())
