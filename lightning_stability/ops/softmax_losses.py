"""Losses and logit transforms that keep a softmax away from saturation: PaLM's z-loss, Gemma 2's
soft-cap, and StableMax (the grokking-at-the-edge work). Pure torch, no Lightning."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Reduction = Literal["mean", "sum", "none"]


def _reduce(x: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    if reduction == "none":
        return x
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def z_loss(logits: Tensor, coef: float = 1e-4, reduction: Reduction = "mean") -> Tensor:
    """PaLM's auxiliary loss ``coef * (log Z)^2`` per row, ``log Z = logsumexp`` over the last dim
    (computed in at least float32). Add it to the task loss."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    lse = torch.logsumexp(z, dim=-1)
    return _reduce(coef * lse.pow(2), reduction)


@torch.no_grad()
def z_loss_grad(logits: Tensor, coef: float, rows: int | None = None, scale: float | Tensor = 1.0) -> Tensor:
    """The gradient of ``coef * mean((log Z)^2)`` with respect to ``logits``:
    ``2 coef log Z softmax(z) / rows`` (``rows`` defaults to the number of logit rows, the mean's
    denominator), times ``scale`` (a float or a device tensor: ``1 / accumulate_grad_batches``, an AMP
    loss scale), applied in float32 before the cast, so a small gradient scaled up for float16 is not
    flushed to zero first. Returned in the logits' dtype and shape."""
    z = logits.detach()
    zf = z if z.dtype == torch.float64 else z.float()
    lse = torch.logsumexp(zf, dim=-1, keepdim=True)
    n = rows if rows is not None else max(1, zf.numel() // max(1, zf.shape[-1]))
    return (2.0 * coef / n * lse * torch.softmax(zf, dim=-1) * scale).to(z.dtype)


def softcap(x: Tensor, cap: float) -> Tensor:
    """Logit soft-capping ``cap * tanh(x / cap)`` (Gemma 2): smooth, odd, bounded by ``cap``."""
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap!r}")
    return cap * torch.tanh(x / cap)


def _stablemax_s(x: Tensor) -> Tensor:
    return torch.where(x >= 0, x + 1.0, 1.0 / (1.0 - x.clamp(max=0.0)))


def _log_stablemax_s(x: Tensor) -> Tensor:
    return torch.where(x >= 0, torch.log1p(x.clamp(min=0.0)), -torch.log1p(-x.clamp(max=0.0)))


def stablemax(logits: Tensor, dim: int = -1) -> Tensor:
    """StableMax probabilities ``s(x_i) / sum_j s(x_j)`` with ``s(x) = x + 1`` for ``x >= 0`` and
    ``1 / (1 - x)`` for ``x < 0``: no exponential, so no top class absorbs the rest in float32."""
    s = _stablemax_s(logits)
    return s / s.sum(dim=dim, keepdim=True)


def log_stablemax(logits: Tensor, dim: int = -1) -> Tensor:
    """``log`` of :func:`stablemax`, computed from ``log s`` (``log1p``) for accuracy."""
    return _log_stablemax_s(logits) - torch.log(_stablemax_s(logits).sum(dim=dim, keepdim=True))


def stablemax_cross_entropy(
    logits: Tensor, targets: Tensor, reduction: Reduction = "mean", ignore_index: int = -100
) -> Tensor:
    """Cross-entropy under StableMax (the grokking-at-the-edge work's log-StableMax loss):
    ``-log stablemax(z)[target]``, a drop-in for ``F.cross_entropy`` on ``(N, C)`` or ``(..., C)``
    logits with matching integer targets. Stable in float32 (no exponential)."""
    z = logits.reshape(-1, logits.shape[-1])
    z = z if z.dtype == torch.float64 else z.float()
    t = targets.reshape(-1)
    if t.numel() != z.shape[0]:
        raise ValueError(f"targets must hold one class per logits row: {t.numel()} targets for {z.shape[0]} rows")
    keep = t != ignore_index
    safe = torch.where(keep, t, torch.zeros_like(t))
    nll = -log_stablemax(z).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    nll = torch.where(keep, nll, torch.zeros_like(nll))
    if reduction == "mean":
        return nll.sum() / keep.sum().clamp_min(1)
    out = _reduce(nll, reduction)
    return out if reduction == "sum" else out.reshape(targets.shape)
