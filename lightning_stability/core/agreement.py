"""Statistics and flags agreed between ranks: one collective for everything a decision needs.

Under DDP each rank measures its own data (and its own replica of the weights); every rank must
take the same decision in the same step, so the decision is taken from values combined across the
ranks: the worst rank's extreme, the mean of means, a flag set if set anywhere. :func:`agree` packs
any number of such values into one tensor and gathers it once; the combination per value is named
by the caller.

``gather`` is a function that stacks a tensor from every rank along a new first dimension (Lightning's
``strategy.all_gather``, Fabric's ``fabric.all_gather``); ``None`` means a single process.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

Combine = Literal["max", "min", "mean", "sum", "any"]
Gather = Callable[[Tensor], Tensor]


def combine(how: Combine, values: Tensor) -> Tensor:
    """Combine one statistic's per-rank ``values`` (a 1-D tensor). ``max`` and ``min`` keep a NaN."""
    if how == "max" or how == "any":
        return values.amax(0) if how == "max" else (values > 0).any(0).to(values.dtype)
    if how == "min":
        return values.amin(0)
    if how == "mean":
        return values.mean(0)
    if how == "sum":
        return values.sum(0)
    raise ValueError(f"combine(how={how!r}): expected one of 'max', 'min', 'mean', 'sum', 'any'")


def agree_tensors(
    values: Mapping[str, Tensor | float],
    how: Mapping[str, Combine] | Callable[[str], Combine],
    gather: Gather | None,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """Each value combined across ranks (``how`` per key), as 0-d tensors on the device: one
    all-gather of ``len(values)`` numbers, no host read. Keys are taken in sorted order, the same on
    every rank, and every rank must pass the same keys."""
    keys = sorted(values)
    if not keys:
        return {}
    if device is None:
        device = next((v.device for v in values.values() if isinstance(v, Tensor)), torch.device("cpu"))
    vec = torch.stack([
        v.to(device=device, dtype=dtype).reshape(()) if isinstance(v, Tensor)
        else torch.tensor(float(v), device=device, dtype=dtype)
        for v in (values[k] for k in keys)
    ])
    if gather is not None:
        table = gather(vec).reshape(-1, len(keys))  # (world, keys)
        rule = how if callable(how) else how.__getitem__
        vec = torch.stack([combine(rule(k), table[:, i]) for i, k in enumerate(keys)])
    return dict(zip(keys, vec.unbind(0)))


def agree(
    values: Mapping[str, Tensor | float],
    how: Mapping[str, Combine] | Callable[[str], Combine],
    gather: Gather | None,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """:func:`agree_tensors`, on the host: one all-gather and one device-to-host read."""
    agreed = agree_tensors(values, how, gather, device, dtype)
    if not agreed:
        return {}
    return dict(zip(agreed, torch.stack(list(agreed.values())).cpu().tolist()))


def gather_by_all_reduce(x: Tensor) -> Tensor:
    """A gather (``(world, *x.shape)``) made of one all-reduce: each rank writes its values into its
    own row of zeros, and the rows are summed. Where every other collective of a step is an
    all-reduce (row-sharded weights), the check's agreement stays one too."""
    table = torch.zeros(dist.get_world_size(), *x.shape, dtype=x.dtype, device=x.device)
    table[dist.get_rank()] = x
    dist.all_reduce(table, op=dist.ReduceOp.SUM)
    return table
