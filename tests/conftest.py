from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger

from lightning_stability.demos import TinyGPT, make_dataloader

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")


@pytest.fixture(autouse=True)
def _seed_and_threads() -> Iterator[None]:
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _reset_bnb_manager() -> Iterator[None]:
    # bitsandbytes' GlobalOptimManager is a singleton keyed by id(param): reset it between tests.
    yield
    import sys

    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None:
        bnb.optim.GlobalOptimManager.get_instance().initialize()


def tiny_gpt(
    steps: int = 100, optimizer: str = "adamw", lr: float = 3e-3, seed: int = 0, batches: int | None = None, **kw: Any
):
    """A very small TinyGPT and its loader (``batches`` per epoch, default ``steps``): ~5 ms a step on CPU."""
    pl.seed_everything(seed, verbose=False)
    loader, ds = make_dataloader(block_size=16, batch_size=8, n_samples=8 * (batches or steps), seed=seed)
    model = TinyGPT(len(ds.vocab), block_size=16, d_model=32, n_layer=1, n_head=2, lr=lr,
                    max_steps=steps, optimizer=optimizer, warmup_steps=10, **kw)
    return model, loader


def make_trainer(tmp_path, steps: int, callbacks: list, **kw: Any) -> pl.Trainer:
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=steps,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        **kw,
    )


class MemoryLogger(Logger):
    """A logger that keeps every ``log_metrics`` call as ``(step, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def metrics_at(self, step: int) -> dict[str, float]:
        """Everything logged at ``step``, merged."""
        out: dict[str, float] = {}
        for s, metrics in self.records:
            if s == step:
                out.update(metrics)
        return out


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """GPU-marked tests run where CUDA is; elsewhere they are skipped with the reason."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
