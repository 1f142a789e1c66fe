"""One contract for every exported callback: defaults construct, fit twice, state round-trips."""

from __future__ import annotations

import inspect

import lightning.pytorch as pl
import pytest
import torch

import lightning_stability
from lightning_stability.callbacks._base import StabilityCallback
from tests.conftest import make_trainer, tiny_gpt

EXPORTED_CALLBACKS = [
    obj for name in lightning_stability.__all__
    if inspect.isclass(obj := getattr(lightning_stability, name)) and issubclass(obj, pl.Callback)
]


def test_every_exported_callback_is_covered():
    assert [c.__name__ for c in EXPORTED_CALLBACKS] == [
        "GradientSpikeGuard", "InMemoryRollback", "LowBitOptimizer", "SkipQuarantined", "SoftmaxSaturationMonitor",
        "SpectralMonitor", "StabilityPanels",
    ]


@pytest.mark.parametrize("cls", EXPORTED_CALLBACKS, ids=lambda c: c.__name__)
def test_contract(tmp_path, cls):
    callback = cls()
    for run in range(2):  # the same instance survives a second fit
        model, loader = tiny_gpt(60, seed=run)
        trainer = make_trainer(tmp_path / str(run), 45, [callback])
        trainer.fit(model, loader)
        assert trainer.global_step == 45
        assert all(torch.isfinite(p).all() for p in model.parameters())
    state = callback.state_dict()
    if not isinstance(callback, StabilityCallback):
        # StabilityPanels shows what the event log holds (which the stability callbacks checkpoint);
        # LowBitOptimizer's state is the optimizer's, which Lightning checkpoints
        assert state == {}
        return
    assert state, "a stateful callback must have something to save"
    fresh = cls()
    assert fresh.state_dict() != state
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    fresh.load_state_dict({})  # an empty (very old) state must not crash
