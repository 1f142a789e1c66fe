"""Output-softmax statistics: the log-partition, the top probability and the collapse headroom.

Pure torch, no Lightning. Every statistic is computed in float32 (or float64 where the input is)
from the logits, on their device, and returned as device tensors: callers move the few scalars
they log to the host once per logging step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_LN2 = math.log(2.0)


def significand_bits(dtype: torch.dtype) -> int:
    """Bits of precision of a floating-point dtype, the implicit bit included: float64 53, float32 24,
    float16 11, bfloat16 8 (``1 - log2(eps)``)."""
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    return int(round(1.0 - math.log2(torch.finfo(dtype).eps)))


def _rows(logits: Tensor) -> Tensor:
    """The logits as ``(rows, classes)`` in at least float32."""
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a class dimension, got shape {tuple(logits.shape)}")
    z = logits.detach().reshape(-1, logits.shape[-1])
    return z if z.dtype == torch.float64 else z.float()


@torch.no_grad()
def collapse_headroom(logits: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Per row, how far the softmax is from rounding to exactly one-hot, in nats.

    ``h = p ln 2 + log sum_{j != top} exp(z_j - z_top)``, ``p`` the significand bits of ``dtype`` (the
    dtype the loss is computed in; default the logits'). The top probability is ``1 / (1 + S)`` with
    ``S`` the sum; it rounds to 1 once ``S`` is below ``2^-p``, that is ``h <= 0``. Computed in the log
    domain, so it stays exact however large the gap (a float32 ``exp`` would underflow first).
    Returns ``(rows,)``; a row with one class has ``-inf`` (nothing to compete with the top).
    """
    z = _rows(logits)
    bits = significand_bits(dtype or logits.dtype)
    top, idx = z.max(dim=-1, keepdim=True)
    rest = z.scatter(-1, idx, float("-inf"))
    log_s = torch.logsumexp(rest - top, dim=-1)
    return bits * _LN2 + log_s


@torch.no_grad()
def softmax_row_stats(logits: Tensor, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Per row of ``logits (..., classes)``, the numbers :func:`softmax_stats` reduces, as ``(rows,)``
    float32 (or float64) device tensors: ``lse`` (``logsumexp``), ``top`` (the largest logit) and
    ``headroom`` (:func:`collapse_headroom` in ``dtype``, default the logits'). Far smaller than the
    logits, so the rows of several micro-batches can be kept and reduced once per optimizer step."""
    z = _rows(logits)
    return {
        "lse": torch.logsumexp(z, dim=-1),
        "top": z.max(dim=-1).values,
        "headroom": collapse_headroom(z, dtype or logits.dtype),
    }


@torch.no_grad()
def reduce_softmax_rows(parts: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """:func:`softmax_stats` of the rows of several :func:`softmax_row_stats` results (micro-batches of
    one optimizer step), as if their logits had come in one batch."""
    if not parts:
        raise ValueError("reduce_softmax_rows needs at least one part")
    lse = torch.cat([p["lse"] for p in parts])
    top = torch.cat([p["top"] for p in parts])
    head = torch.cat([p["headroom"] for p in parts])
    finite = torch.where(torch.isfinite(head), head, torch.full_like(head, -1e30))
    return {
        "logz_mean": lse.mean(),
        "logz_std": lse.std(unbiased=False) if lse.numel() > 1 else torch.zeros_like(lse[0]),
        "logz_max": lse.max(),
        "max_logit": top.max(),
        "pmax_mean": torch.exp(top - lse).mean(),
        "sc_frac": (head <= 0).float().mean(),
        "sc_headroom_p01": torch.quantile(finite, 0.01),
    }


@torch.no_grad()
def softmax_stats(logits: Tensor, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The output-softmax statistics of a batch of logits ``(..., classes)``, as 0-d device tensors.

    ``logz_mean``, ``logz_std``, ``logz_max``: the log-partition ``logsumexp(z)`` per row;
    ``max_logit``; ``pmax_mean``: the mean top probability; ``sc_frac``: the fraction of rows whose
    softmax is exactly one-hot in ``dtype`` (headroom ``<= 0``); ``sc_headroom_p01``: the 1st
    percentile of the collapse headroom (nats; :func:`collapse_headroom`).
    """
    return reduce_softmax_rows([softmax_row_stats(logits, dtype)])


@torch.no_grad()
def zero_loss_counts(logits: Tensor, targets: Tensor, dtype: torch.dtype | None = None, ignore_index: int = -100) -> Tensor:
    """``(2,)``: how many samples have a cross-entropy, computed in ``dtype`` (default the logits'), of
    exactly zero, and how many samples count (targets not ``ignore_index``). Sums of several batches
    give their joint :func:`zero_loss_fraction`."""
    z = logits.detach().reshape(-1, logits.shape[-1]).to(dtype or logits.dtype)
    t = targets.detach().reshape(-1)
    if t.numel() != z.shape[0]:
        raise ValueError(
            f"targets must hold one class per logits row: {t.numel()} targets for {z.shape[0]} rows"
        )
    keep = t != ignore_index
    if not bool(keep.any()):
        return torch.zeros(2, device=z.device)
    loss = F.cross_entropy(z[keep], t[keep], reduction="none")
    return torch.stack([(loss == 0).float().sum(), keep.float().sum()])


def zero_loss_fraction(logits: Tensor, targets: Tensor, dtype: torch.dtype | None = None, ignore_index: int = -100) -> Tensor:
    """The fraction of samples whose cross-entropy, computed in ``dtype`` (default the logits'), is
    exactly zero: rows that have stopped contributing any gradient (Softmax Collapse)."""
    counts = zero_loss_counts(logits, targets, dtype, ignore_index)
    return counts[0] / counts[1].clamp_min(1.0)
