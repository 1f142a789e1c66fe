"""The ``softcap`` remedy: the output head's logits soft-capped, ``softcap tanh(z / softcap)``."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_stability.callbacks._softmax_remedy import SoftmaxRemedy
from lightning_stability.ops.saturation import softcap


class OutputSoftcap(SoftmaxRemedy):
    """A forward hook on the head, put first so every other hook sees the capped logits."""

    name = "softcap"
    needs_head = True

    def __init__(self, monitor: Any) -> None:
        super().__init__(monitor)
        self.handle: Any = None

    def event_metrics(self) -> dict[str, float]:
        return {"softcap": self.monitor.softcap}

    def engage(self) -> None:
        head = self.monitor._head_module
        if self.handle is None and head is not None:
            cap = self.monitor.softcap
            self.handle = head.register_forward_hook(
                lambda module, args, out: softcap(out, cap) if isinstance(out, Tensor) else out, prepend=True
            )

    def release(self) -> None:
        if self.handle is not None:
            self.handle.remove()
        self.handle = None
