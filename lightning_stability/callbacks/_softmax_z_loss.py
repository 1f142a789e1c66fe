"""The ``z_loss`` remedy: PaLM's z-loss added as its exact gradient on the logits, the user's loss untouched."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_stability.callbacks._softmax_remedy import SoftmaxRemedy
from lightning_stability.core.lightning import grad_scaler
from lightning_stability.ops.saturation import z_loss_grad


class ZLoss(SoftmaxRemedy):
    """A gradient hook on the logits adds ``2 c log Z softmax(z) / rows``, the gradient of ``c
    mean((log Z)^2)``, ``c`` ramped from 0 to ``z_loss_coef`` over ``z_loss_ramp`` steps, divided by
    ``accumulate_grad_batches`` and carrying the AMP loss scale under ``16-mixed``, as the gradient it
    joins does."""

    name = "z_loss"
    needs_head = True

    def __init__(self, monitor: Any) -> None:
        super().__init__(monitor)
        self.factor = 1.0  # 1 / accumulate_grad_batches, as Lightning scales the loss
        self.scaler: Any = None  # the AMP GradScaler of 16-mixed, whose scale the loss's gradient carries

    def coef(self) -> float:
        if self.since is None:
            return 0.0
        ramp = self.monitor.z_loss_ramp
        if ramp == 0:
            return float(self.monitor.z_loss_coef)
        return float(self.monitor.z_loss_coef * min(1.0, max(0.0, (self.monitor._step_now - self.since + 1) / ramp)))

    def event_metrics(self) -> dict[str, float]:
        return {"z_loss_coef": self.monitor.z_loss_coef}

    def sample_metrics(self) -> dict[str, float]:
        return {"stability/softmax/z_loss_coef": self.coef()}

    def batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, training: bool) -> None:
        if training:
            self.factor = 1.0 / trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1.0
            self.scaler = grad_scaler(trainer)

    def on_logits(self, logits: Tensor) -> None:
        coef = self.coef()
        if coef > 0 and logits.requires_grad:
            # the hook holds a detached alias, not ``logits`` itself: a hook that refers to its own tensor
            # makes a cycle that keeps every step's logits alive
            z = logits.detach()
            logits.register_hook(lambda grad: grad + z_loss_grad(z, coef, scale=self._scale(grad)).to(grad.dtype))

    def _scale(self, grad: Tensor) -> float | Tensor:
        """``1 / accumulate_grad_batches``, times the AMP loss scale under ``16-mixed``
        (``GradScaler.scale``: a device tensor, no host read)."""
        if self.scaler is None:
            return self.factor
        return self.scaler.scale(torch.full((), self.factor, dtype=torch.float32, device=grad.device))
