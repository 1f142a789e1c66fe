"""torchao's float8 training as far as ``FP8Precision`` sees it, for machines without CUDA: a fake
``torchao.float8`` module whose conversion swaps each filtered ``nn.Linear`` for an ``nn.Linear``
subclass (the weights kept) that counts its forwards. Used by the mocked tests and the FSDP2 script."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

import torch.nn.functional as F
from torch import nn

from lightning_stability.plugins import _te, _torchao


class FakeFloat8Linear(nn.Linear):
    """torchao's Float8Linear: an nn.Linear subclass whose forward runs the FP8 GEMM (here the plain
    one, counted)."""

    calls: dict[int, int] = {}

    def forward(self, x):
        FakeFloat8Linear.calls[id(self)] = FakeFloat8Linear.calls.get(id(self), 0) + 1
        return F.linear(x, self.weight, self.bias)


def install(setattr_: Callable[[Any, str, Any], None], setitem: Callable[[Any, str, Any], None]) -> SimpleNamespace:
    """Put the fake in place with ``setattr_``/``setitem`` (a monkeypatch's, or plain ones in a script);
    returns what it saw: the recipes asked for, the layers filtered in, and the SM it reports (settable)."""
    seen = SimpleNamespace(recipes=[], filtered=[], sm={"value": (9, 0)})

    class Float8LinearConfig:
        @staticmethod
        def from_recipe_name(name):
            seen.recipes.append(name)
            return SimpleNamespace(recipe=name)

    def convert_to_float8_training(module, config, module_filter_fn):
        for fqn, mod in list(module.named_modules()):
            if type(mod) is nn.Linear and module_filter_fn(mod, fqn):
                seen.filtered.append(fqn)
                mod.__class__ = FakeFloat8Linear  # torchao swaps in its own subclass, the weights kept
        return module

    torchao, float8 = ModuleType("torchao"), ModuleType("torchao.float8")
    float8.Float8LinearConfig, float8.convert_to_float8_training = Float8LinearConfig, convert_to_float8_training
    torchao.float8 = float8
    setitem(sys.modules, "torchao", torchao)
    setitem(sys.modules, "torchao.float8", float8)
    setattr_(_torchao, "TORCHAO_AVAILABLE", True)
    setattr_(_torchao, "device_capability", lambda: seen.sm["value"])
    setattr_(_te, "TE_AVAILABLE", False)  # auto's second choice: torchao
    FakeFloat8Linear.calls = {}
    return seen
