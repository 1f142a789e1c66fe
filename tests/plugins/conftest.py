"""The Transformer Engine fake shared by the plugin tests (TE mocked the way Lightning's own tests mock it),
and the real torchao on this CPU."""

from __future__ import annotations

import importlib.util
import pickle
import sys
from contextlib import contextmanager
from types import SimpleNamespace
from unittest.mock import Mock

import pytest
import torch
from torch import nn

from lightning_stability.plugins import _te, _torchao


class FakeTELinear(nn.Linear):
    """``te.Linear``'s constructor and parameters, delayed-scaling metadata with known scales, and TE's
    checkpoint format: the FP8 metadata pickled into a uint8 tensor by ``get_extra_state`` (an empty one
    before any FP8 step), read back by ``set_extra_state``, so the module's state_dict holds an
    ``_extra_state`` entry as ``te.Linear``'s does. A training forward inside the (mocked) FP8 autocast
    rolls the input's amax into the history, as TE's delayed scaling does; the scales stay the known ones."""

    autocast_stack: list[bool] = []  # the enabled flags of the mocked FP8 autocasts entered, innermost last

    def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=params_dtype)
        self.fp8_meta = {
            "scaling_fwd": SimpleNamespace(amax_history=torch.ones(4, 3), scale=torch.tensor([2.0, 4.0, 1.0])),
            "scaling_bwd": SimpleNamespace(amax_history=torch.ones(4, 2), scale=torch.tensor([8.0, 1.0])),
        }
        self.fp8_steps = 0
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x):
        if x.numel() // x.shape[-1] % 8:  # TE's rule for FP8 GEMMs
            raise AssertionError(f"FP8 execution requires the token count divisible by 8, got shape {tuple(x.shape)}")
        self.shapes.append(tuple(x.shape))
        if self.training and self.autocast_stack and self.autocast_stack[-1]:
            self.fp8_steps += 1
            fwd = self.fp8_meta["scaling_fwd"]
            fwd.amax_history = torch.roll(fwd.amax_history, 1, 0)
            fwd.amax_history[0, 0] = x.detach().abs().amax()
        return super().forward(x)

    def get_extra_state(self):
        if not self.fp8_steps:
            return torch.empty(0, dtype=torch.uint8)
        state = {key: {"amax_history": meta.amax_history.clone(), "scale": meta.scale.clone()}
                 for key, meta in self.fp8_meta.items()}
        state["fp8_steps"] = self.fp8_steps
        return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)

    def set_extra_state(self, state):
        if state is None or state.numel() == 0:
            return
        state = pickle.loads(state.numpy().tobytes())
        self.fp8_steps = state.pop("fp8_steps")
        for key, values in state.items():
            self.fp8_meta[key] = SimpleNamespace(**values)


@pytest.fixture
def fake_te(monkeypatch):
    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed: the GPU tests cover it")
    te = Mock(name="transformer_engine")
    recipe = Mock(name="transformer_engine.common.recipe")
    te.common.recipe = recipe
    te.pytorch.Linear = FakeTELinear
    @contextmanager
    def autocast(enabled, **kwargs):
        FakeTELinear.autocast_stack.append(enabled)
        try:
            yield
        finally:
            FakeTELinear.autocast_stack.pop()

    te.pytorch.autocast.side_effect = autocast
    te.pytorch.fp8_autocast.side_effect = autocast
    monkeypatch.setitem(sys.modules, "transformer_engine", te)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", te.pytorch)
    monkeypatch.setitem(sys.modules, "transformer_engine.common", te.common)
    monkeypatch.setitem(sys.modules, "transformer_engine.common.recipe", recipe)
    monkeypatch.setattr(_te, "TE_AVAILABLE", True)
    sm = {"value": (9, 0)}
    monkeypatch.setattr(_te, "device_capability", lambda: sm["value"])
    return SimpleNamespace(te=te, recipe=recipe, sm=sm)


@pytest.fixture
def real_torchao(monkeypatch):
    """The real torchao, on this CPU: its float8 training runs through torch's CPU ``torch._scaled_mm``,
    so its conversion, casts and GEMMs are the library's own. Only the hardware check is told it has an
    SM 9.0 GPU (the speed is a GPU's question: tests/plugins/test_fp8_gpu.py)."""
    pytest.importorskip("torchao.float8", reason="torchao is not installed")
    monkeypatch.setattr(_torchao, "device_capability", lambda: (9, 0))
    monkeypatch.setattr(_te, "TE_AVAILABLE", False)


def fit_llama(tmp_path, name: str, plugins: list, steps: int = 12):
    """Hugging Face's Llama (tests/clients: GQA, narrower k and v projections) fitted ``steps`` steps with
    ``plugins``, the same seed and batches every call; the module and its last training loss."""
    import lightning.pytorch as pl

    from tests.clients.models import Client, loader
    from tests.conftest import make_trainer

    pl.seed_everything(0, verbose=False)
    model = Client("llama", max_steps=steps)
    trainer = make_trainer(tmp_path / name, steps, [], plugins=plugins)
    trainer.fit(model, loader("llama", n=8 * steps))
    return model, float(trainer.callback_metrics["train_loss"])
