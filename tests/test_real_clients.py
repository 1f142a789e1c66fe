"""The real-client matrix: every callback at its defaults on models, batches, schedulers and precisions
that users have, with faults injected.

Each run: ``GradientSpikeGuard``, ``InMemoryRollback``, ``SpectralMonitor``, ``SoftmaxSaturationMonitor``
and ``StabilityPanels`` with a TensorBoard logger, all at their defaults; one fault at step 40 of 50.
"""

from __future__ import annotations

import re
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_stability import (
    GradientSpikeGuard,
    InMemoryRollback,
    SoftmaxSaturationMonitor,
    SpectralMonitor,
    StabilityPanels,
    get_event_log,
)
from tests.clients.models import ATTENTION_LAYERS, MODELS, SCHEDULERS, Client, loader
from tests.conftest import MemoryLogger

pytest.importorskip("transformers")
STEPS, FAULT_AT = 50, 40


class Faults(pl.Callback):
    """One fault at ``step``: a NaN gradient, a NaN written into a weight every forward uses (the last
    parameter: the head or its bias), or every gradient times 1000."""

    def __init__(self, kind: str | None, step: int = FAULT_AT) -> None:
        self.kind, self.step = kind, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.kind == "weight_nan" and trainer.global_step == self.step:
            with torch.no_grad():
                list(pl_module.parameters())[-1].view(-1)[0] = float("nan")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step != self.step or self.kind not in ("grad_nan", "grad_spike"):
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        with torch.no_grad():
            if self.kind == "grad_nan":
                grads[0].view(-1)[0] = float("nan")
            else:
                for g in grads:
                    g.mul_(1000.0)


class LrProbe(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def stability_callbacks() -> list[pl.Callback]:
    return [GradientSpikeGuard(), InMemoryRollback(nonfinite_patience=1), SpectralMonitor(), SoftmaxSaturationMonitor(), StabilityPanels()]


def fit(tmp_path, model: Client, data, callbacks: list[pl.Callback], steps: int = STEPS, **kw: Any) -> tuple[pl.Trainer, MemoryLogger]:
    memory = MemoryLogger()
    kw.setdefault("logger", [TensorBoardLogger(tmp_path, name="tb"), memory])
    kw.setdefault("enable_checkpointing", False)
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_steps=steps, callbacks=callbacks, accelerator="cpu", devices=1,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10, **kw,
    )
    trainer.fit(model, data)
    return trainer, memory


def layers_logged(memory: MemoryLogger, family: str, stat: str) -> set[str]:
    pattern = re.compile(rf"stability/{family}/(.+)/{stat}$")
    return {m.group(1) for _, metrics in memory.records for k in metrics if (m := pattern.match(k))}


def events(trainer: pl.Trainer, *kinds: str) -> list[Any]:
    return [e for e in get_event_log(trainer) if e.kind in kinds]


def untracked_weights(model: Client, tracked: set[str]) -> list[str]:
    """The 2-D weights no tracked layer covers (a tied weight is covered under any of its names)."""
    aliases: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if p.ndim == 2:
            aliases.setdefault(id(p), []).append(n)

    def covers(layer: str, param: str) -> bool:
        return param == layer or param.startswith(layer + ".") or param.startswith(layer + "_")

    return sorted(names[0] for names in aliases.values() if not any(covers(t, n) for t in tracked for n in names))


def check_run(trainer: pl.Trainer, model: Client, memory: MemoryLogger, fault: str | None, fault_step: int = FAULT_AT) -> None:
    name, problems = model.name, []
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        problems.append("weights are not finite")
    tracked = layers_logged(memory, "spectral", "sigma_max")
    if missing := untracked_weights(model, tracked):
        problems.append(f"2-D weights not tracked: {missing} (tracked {sorted(tracked)})")
    attention = layers_logged(memory, "attention", "entropy_min")
    if len(attention) != ATTENTION_LAYERS[name]:
        problems.append(f"attention captured in {sorted(attention)}, expected {ATTENTION_LAYERS[name]} layers")
    detections = [(e.step, e.kind) for e in get_event_log(trainer) if e.source.startswith("GradientSpikeGuard") and e.severity != "info"]
    at = {kind for step, kind in detections if step == fault_step}
    if fault in ("grad_nan", "weight_nan") and "nonfinite" not in at:
        problems.append(f"{fault} at {fault_step} not detected: {detections}")
    if fault == "grad_spike" and not at & {"grad_spike", "element_spike"}:
        problems.append(f"spike at {fault_step} not detected: {detections}")
    # the rollback happens at the end of the step it was asked for in, so its event has the next step
    if fault == "weight_nan" and [e.step for e in events(trainer, "rollback")] != [fault_step + 1]:
        problems.append(f"NaN weight not rolled back at {fault_step}: {[(e.step, e.kind) for e in events(trainer, 'rollback')]}")
    assert not problems, f"{name}: " + "; ".join(problems)


# -- models x faults, every callback at its defaults ---------------------------------------------------
@pytest.mark.parametrize("fault", ["grad_nan", "weight_nan", "grad_spike"])
@pytest.mark.parametrize("name", MODELS)
def test_every_callback_on_user_models(tmp_path, name, fault):
    pl.seed_everything(0, verbose=False)
    model = Client(name, max_steps=STEPS)
    trainer, memory = fit(tmp_path, model, loader(name), [Faults(fault), *stability_callbacks()])
    check_run(trainer, model, memory, fault)


# -- batches, precision, accumulation, where the model is built --------------------------------------------
@pytest.mark.parametrize(
    ("name", "batch_type", "precision", "accumulate", "build_in"),
    [
        ("nanogpt", "tuple", "32-true", 1, "init"),
        ("nanogpt", "list", "bf16-mixed", 2, "configure_model"),
        ("nanogpt", "batch_encoding", "32-true", 2, "init"),
        ("nanogpt", "dataclass", "bf16-mixed", 1, "init"),
        ("gpt2", "tuple", "bf16-mixed", 2, "configure_model"),
        ("llama", "dataclass", "32-true", 2, "configure_model"),
        ("bert", "list", "bf16-mixed", 1, "configure_model"),
        ("vit", "tuple", "32-true", 2, "configure_model"),
        ("lightning_transformer", "batch_encoding", "bf16-mixed", 2, "configure_model"),
        ("litgpt", "list", "32-true", 1, "configure_model"),
    ],
)
def test_batches_precisions_accumulation_and_configure_model(tmp_path, name, batch_type, precision, accumulate, build_in):
    pl.seed_everything(0, verbose=False)
    model = Client(name, build_in=build_in, max_steps=STEPS)
    trainer, memory = fit(tmp_path, model, loader(name, batch_type), [Faults("weight_nan"), *stability_callbacks()],
                          precision=precision, accumulate_grad_batches=accumulate)
    check_run(trainer, model, memory, "weight_nan")
    assert trainer.global_step == STEPS


# -- schedulers: the LR of every step equals the plain run's --------------------------------------------
@pytest.mark.parametrize("scheduler", [s for s in SCHEDULERS if s != "none"])
def test_schedulers_keep_their_lr_with_every_callback(tmp_path, scheduler):
    from lightning_stability import LowBitOptimizer

    lrs = []
    for callbacks in ([], [*stability_callbacks(), LowBitOptimizer()]):
        pl.seed_everything(0, verbose=False)
        probe = LrProbe()
        fit(tmp_path, Client("nanogpt", scheduler=scheduler, max_steps=40), loader("nanogpt"), [*callbacks, probe], steps=40)
        lrs.append(probe.lrs)
    plain, ours = lrs
    assert len(plain) == len(ours) == 40
    assert len(set(plain)) > 3  # the schedule moves
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(plain), rtol=1e-9, atol=0.0)


# -- resume from a ModelCheckpoint ------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["32-true", "fp8-emulated", "adamw8bit", "fp8-emulated+adamw8bit"])
def test_resume_with_every_callback(tmp_path, flag):
    from lightning_stability import resolve_precision

    def run(steps: int, ckpt_path: str | None = None) -> tuple[pl.Trainer, Client]:
        pl.seed_everything(0, verbose=False)
        setup = resolve_precision(flag)
        model = Client("nanogpt", max_steps=40)
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=20, save_top_k=-1)
        trainer = pl.Trainer(
            default_root_dir=tmp_path, max_steps=steps, accelerator="cpu", devices=1, logger=False,
            enable_progress_bar=False, enable_model_summary=False,
            callbacks=[*stability_callbacks(), ckpt, *setup.pop("callbacks")], **setup,
        )
        trainer.fit(model, loader("nanogpt"), ckpt_path=ckpt_path)
        return trainer, model

    first, _ = run(20)
    path = str(tmp_path / "ckpt" / "epoch=0-step=20.ckpt")
    saved = torch.load(path, weights_only=False)
    resumed, model = run(40, ckpt_path=path)
    assert resumed.global_step == 40
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for cb in resumed.callbacks:
        if isinstance(cb, (GradientSpikeGuard, InMemoryRollback, SpectralMonitor, SoftmaxSaturationMonitor)):
            assert cb.state_key in saved["callbacks"], f"{cb.state_key} saved no state"
