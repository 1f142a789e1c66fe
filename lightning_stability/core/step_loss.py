"""The optimizer step's loss, accumulated once for every consumer.

Lightning hands each micro-batch's loss to ``on_before_backward`` already divided by
``accumulate_grad_batches`` (and, under fp16 AMP, multiplied by the loss scale). Their sum over the
micro-batches of one optimizer step is the step's mean loss times the scale; :class:`StepLoss` keeps
that sum on the device (no host read) and divides the scale out when it is read.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor


class StepLoss:
    """The sum of the losses back-propagated since the last optimizer step, detached, on the device.

    Several callbacks may feed the same loss (each sees it in its own ``on_before_backward``): a
    tensor already added is not added again. ``step`` is the optimizer step the losses belong to;
    the first loss of a new step starts a new sum. ``added`` counts the losses added so far: a
    consumer that remembers it can tell whether a loss has come since it last looked.
    """

    def __init__(self) -> None:
        self.step = -1
        self._sum: Tensor | None = None
        self._last: Any = None  # a weak reference to the last loss added
        self.added = 0

    def add(self, loss: Tensor, step: int) -> None:
        last = self._last() if self._last is not None else None
        if last is loss and step == self.step:
            return  # another consumer's copy of the same micro-batch
        value = loss.detach().float()
        if value.numel() != 1:
            value = value.mean()
        if step != self.step:
            self.step, self._sum = step, None
        self._sum = value if self._sum is None else self._sum + value
        self._last = weakref.ref(loss)
        self.added += 1

    def value(self, step: int, scale: float = 1.0) -> Tensor | None:
        """The step's loss (divided by the AMP ``scale``), or ``None`` when nothing was back-propagated
        for ``step``. A 0-d tensor on the loss's device."""
        if self._sum is None or step != self.step:
            return None
        return self._sum / scale if scale != 1.0 else self._sum

    def clear(self) -> None:
        self.step, self._sum, self._last = -1, None, None


def as_scalar(value: Tensor | float) -> Tensor:
    """``value`` as a 0-d float tensor (a Python float on the CPU)."""
    return value.float().reshape(()) if isinstance(value, Tensor) else torch.tensor(float(value))
