"""Run by test_ddp.py as its own program: counts the torch.distributed collectives of every step under DDP.

Every collective of ``torch.distributed`` called from Python is wrapped; each call is attributed to the
step it happened in and to the stability class whose code called it (the innermost frame of
``lightning_stability`` that belongs to a method of one of its classes), to DDP's Python side (its
broadcast of module buffers before every forward), or to Lightning otherwise. DDP's gradient
all-reduce runs in its C++ reducer, not through these Python functions, so it is not counted. Two fits run in one launch: every callback and the FP8 plugin at their
defaults with a TensorBoard logger and the panels, and the same fit without them. The first also
records which files each rank opened for writing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import Precision

import lightning_stability
from lightning_stability import (
    FP8Precision,
    GradientSpikeGuard,
    InMemoryRollback,
    SoftmaxSaturationMonitor,
    SpectralMonitor,
    StabilityPanels,
    get_event_log,
)
from lightning_stability.demos import TinyGPT, make_dataloader
from tests.callbacks.ddp_guard_script import OnOneRank

COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast", "broadcast_object_list",
    "barrier", "monitored_barrier", "reduce", "gather", "gather_object", "scatter", "scatter_object_list",
    "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "all_reduce_coalesced",
    "_broadcast_coalesced",  # DDP's broadcast of module buffers at every forward (and of the weights at start)
)
PACKAGE_DIR = os.path.dirname(lightning_stability.__file__)
STEPS = 101  # sampled steps at the defaults (every 50 steps, the logger's cadence of 50) fall inside


class Counter:
    """The collectives called since ``reset``, as (step, name, elements, caller) records."""

    def __init__(self) -> None:
        self.step: Any = "setup"
        self.records: list[tuple[Any, str, int, str]] = []
        self._depth = 0  # an object collective calls tensor collectives inside: count the outer call only

    def install(self) -> None:
        for name in COLLECTIVES:
            original = getattr(c10d, name, None) or getattr(dist, name, None)
            if original is None:
                continue
            wrapper = self._wrap(name, original)
            for module in (c10d, dist):
                if getattr(module, name, None) is original:
                    setattr(module, name, wrapper)

    def _wrap(self, name: str, original: Any) -> Any:
        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self._depth == 0:
                self.records.append((self.step, name, _elements(name, args, kwargs), _caller()))
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        return wrapper


def _elements(name: str, args: tuple, kwargs: dict) -> int:
    """Elements this rank contributes (-1 for a collective of pickled objects, 0 for a barrier)."""
    if name.endswith("_object") or name.endswith("_object_list"):
        return -1
    if name == "_broadcast_coalesced":  # (process_group, tensors, bucket_size, src)
        return sum(t.numel() for t in args[1])
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if name == "all_gather" and tensors:  # all_gather(list_of_outputs, input)
        return tensors[0].numel()
    return tensors[0].numel() if tensors else 0


def _caller() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.endswith(os.path.join("nn", "parallel", "distributed.py")):
            return "DDP"  # DistributedDataParallel's own Python side (its gradient all-reduce is in C++)
        if frame.f_code.co_filename.startswith(PACKAGE_DIR):
            # the public object the user attached (a callback or a precision plugin), not the helper
            # piece inside it that made the call
            owner = frame.f_locals.get("self")
            if isinstance(owner, (pl.Callback, Precision)) and type(owner).__module__.startswith("lightning_stability"):
                return type(owner).__name__
        frame = frame.f_back
    return "lightning"


class Clock(pl.Callback):
    """Marks the step each collective belongs to: from one batch's start to the next."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.counter.step = trainer.global_step

    def on_train_end(self, trainer, pl_module):
        self.counter.step = "end"


class WriteAudit:
    """Paths under ``root`` opened for writing by this process (Python's audit events)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self.paths: set[str] = set()
        self.on = False
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if not self.on or event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path, mode, flags = args
        writing = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        path = os.path.realpath(os.fsdecode(path))
        if writing and path.startswith(self.root):
            self.paths.add(os.path.relpath(path, self.root))


class PerSampleGPT(TinyGPT):
    """A step that returns each sample's loss beside the mean, under ``"sample_losses"``."""

    def training_step(self, batch, batch_idx):
        logits = self(batch["input_ids"])
        per_sample = F.cross_entropy(logits.transpose(1, 2), batch["targets"], reduction="none").mean(1)
        loss = per_sample.mean()
        self.log("train/loss", loss)
        return {"loss": loss, "sample_losses": per_sample}


def fit(out: str, counter: Counter, ours: bool, audit: WriteAudit | None = None) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    loader, ds = make_dataloader(block_size=16, batch_size=8, n_samples=8 * 2 * STEPS, seed=0)
    model = PerSampleGPT(len(ds.vocab), block_size=16, d_model=32, n_layer=1, n_head=2, max_steps=STEPS, warmup_steps=10)
    # rank 1 alone: a NaN loss at step 70 (a rollback to the snapshot of step 0) and a gradient
    # corrupted after the all-reduce at step 85 (the guard skips it): events with numbers in them
    callbacks: list[pl.Callback] = [Clock(counter)]
    plugins: list[Any] = []
    if ours:
        callbacks += [OnOneRank(1, {70: ("loss_nan", None), 85: ("grad_scale", 1000.0)}), GradientSpikeGuard(),
                      SpectralMonitor(), SoftmaxSaturationMonitor(), InMemoryRollback(nonfinite_patience=1), StabilityPanels()]
        plugins = [FP8Precision(backend="emulated")]
    logger = TensorBoardLogger(os.path.join(out, "tb"), name="run") if ours else False
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=STEPS, callbacks=callbacks, plugins=plugins,
        logger=logger, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=out,
    )
    counter.step, counter.records = "setup", []
    if audit is not None:
        audit.on = True
    trainer.fit(model, loader)
    if audit is not None:
        audit.on = False
    result: dict[str, Any] = {"collectives": list(counter.records)}
    if ours:
        by_type = {type(cb).__name__: cb for cb in trainer.callbacks}
        guard, rollback = by_type["GradientSpikeGuard"], by_type["InMemoryRollback"]
        spectral, softmax = by_type["SpectralMonitor"], by_type["SoftmaxSaturationMonitor"]
        # the steps each one samples at its defaults (a detection under way adds more)
        logging = [s for s in range(STEPS) if (s + 1) % trainer.log_every_n_steps == 0]
        checks = [s for s in range(STEPS) if spectral._check_at.due(s)]  # its own cadence, not the logger's
        result["sampled"] = {
            "GradientSpikeGuard": list(range(STEPS)) if guard.window else [],
            "SpectralMonitor": sorted(set(checks) | set(logging)),
            "SoftmaxSaturationMonitor": [s for s in range(STEPS) if s % softmax.every_n_steps == 0],
            "FP8Precision": [s for s in range(STEPS) if s % plugins[0].health_every_n_steps == 0],
            "InMemoryRollback": [s for s in range(STEPS) if (s + 1) % rollback.every_n_steps == 0],
            "StabilityPanels": [],
        }
        assert spectral.full_every_n_steps is None or spectral.full_every_n_steps > 0
        result["events"] = [e.to_dict() for e in get_event_log(trainer)]
        result["rollbacks"] = [(r["step"], r["restored_step"]) for r in rollback.rollbacks]
        result["log_dir"] = trainer.log_dir
        result["written"] = sorted(audit.paths) if audit is not None else []
        result["buffer_elements"] = sum(b.numel() for b in model.buffers())  # the FP8 emulator's scales
    result["digest"] = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    result["rank"] = trainer.global_rank
    return result


def main(out: str) -> None:
    warnings.filterwarnings("ignore")
    counter = Counter()
    counter.install()
    audit = WriteAudit(out)
    with_ours = fit(out, counter, ours=True, audit=audit)
    without = fit(os.path.join(out, "plain"), counter, ours=False)
    with open(f"{out}/rank{with_ours['rank']}.json", "w") as fh:
        json.dump({"ours": with_ours, "plain": without, "pid": os.getpid()}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
