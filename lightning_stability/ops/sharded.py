"""Sharded tensors: local shards, the reductions that turn their partial sums into global ones.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``, Lightning's ``ModelParallelStrategy``) every
parameter, gradient and optimizer-state tensor is a ``DTensor``: rank ``r`` holds the rows
``row_range(t)`` of a ``Shard(0)`` placement (``torch.chunk`` semantics: ``ceil(m / world)`` rows a
rank, the last ranks fewer, possibly none). Everything here works on the local shards with plain
torch ops and sums their partial results with explicit all-reduces, so that the number of
collectives is the caller's choice (and the same on every rank) instead of one implicit collective
per DTensor operation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # torch.distributed is not built into this torch
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (a view: in-place writes reach the parameter), else ``t``."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def replicas(t: Tensor) -> int:
    """On how many ranks each element of ``t``'s local shard also lives (1 for a plain tensor).

    A sum over ranks of local sums, divided by this, counts every element once. Partial placements
    (values that are themselves unreduced sums) have no such reading and are refused.
    """
    if not is_dtensor(t):
        return 1
    count = 1
    for dim, placement in enumerate(t.placements):  # type: ignore[attr-defined]
        if isinstance(placement, Partial):
            raise ValueError(
                f"a DTensor with placements {t.placements} holds partial sums: reduce it (redistribute to "  # type: ignore[attr-defined]
                "Shard or Replicate) before measuring it"
            )
        if isinstance(placement, Replicate):
            count *= t.device_mesh.size(dim)  # type: ignore[attr-defined]
    return count


def is_row_sharded(t: Tensor) -> bool:
    """A ``DTensor`` on a one-dimensional mesh, sharded by rows (FSDP2's layout)."""
    if not is_dtensor(t):
        return False
    placements = t.placements  # type: ignore[attr-defined]
    return len(placements) == 1 and isinstance(placements[0], Shard) and placements[0].dim == 0


def row_range(t: Tensor) -> tuple[int, int]:
    """``[start, stop)``: the rows of the full tensor that this rank's shard of a row-sharded ``t`` holds."""
    mesh = t.device_mesh  # type: ignore[attr-defined]
    rows, world, rank = t.shape[0], mesh.size(0), mesh.get_local_rank(0)
    chunk = -(-rows // world)  # torch.chunk: ceil(rows / world) a rank
    start = min(rank * chunk, rows)
    stop = min(start + chunk, rows)
    if stop - start != local(t).shape[0]:
        raise ValueError(
            f"a row-sharded DTensor of {rows} rows on {world} ranks holds {local(t).shape[0]} rows on rank "
            f"{rank}; expected {stop - start} (torch.chunk layout)"
        )
    return start, stop


def held_rows(t: Tensor) -> tuple[int, int]:
    """``[start, stop)``: the rows of the whole tensor this rank holds: all of a plain or replicated one,
    its shard's of a row-sharded one. Other layouts raise ``NotImplementedError``."""
    if is_row_sharded(t):
        return row_range(t)
    if is_dtensor(t) and not all(type(p).__name__ == "Replicate" for p in t.placements):  # type: ignore[attr-defined]
        raise NotImplementedError(
            f"a DTensor with placements {t.placements} holds no whole rows: only row sharding (Shard(0) on "  # type: ignore[attr-defined]
            "one mesh dimension) or replication is supported"
        )
    return 0, t.shape[0]


def full(t: Tensor) -> Tensor:
    """The whole tensor on every rank: an all-gather for a ``DTensor`` (one tensor at a time), else ``t``."""
    return t.full_tensor() if is_dtensor(t) else t  # type: ignore[attr-defined]


def all_reduce_sum_(x: Tensor) -> Tensor:
    """Sum ``x`` over all ranks, in place (nothing outside a distributed run); returns ``x``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def local_squares(tensors: Sequence[Tensor]) -> Tensor:
    """This rank's share of each ``||t||^2`` (float32, ``(len(tensors),)`` on the device): the squares
    of its local shards, each divided by its replica count. Summed over ranks (one all-reduce) they
    are the whole tensors' squared norms."""
    if not tensors:
        return torch.zeros(0)
    shards = [local(t) for t in tensors]
    device = shards[0].device
    norms = torch.stack(torch._foreach_norm(shards, 2, dtype=torch.float32)).to(device)  # (len,)
    weights = [1.0 / replicas(t) for t in tensors]
    if all(w == 1.0 for w in weights):
        return norms.pow(2)
    return norms.pow(2) * torch.tensor(weights, device=device)


@torch.no_grad()
def local_sum_of_squares(tensors: Sequence[Tensor]) -> Tensor:
    """This rank's share of ``sum ||t||^2`` over ``tensors`` (a 0-dim device tensor,
    :func:`local_squares` summed); summed over ranks, the global sum of squares."""
    if not tensors:
        return torch.zeros(())
    return local_squares(tensors).sum()


__all__ = [
    "all_reduce_sum_",
    "held_rows",
    "full",
    "is_dtensor",
    "is_row_sharded",
    "local",
    "local_squares",
    "local_sum_of_squares",
    "replicas",
    "row_range",
]
