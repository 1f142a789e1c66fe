"""Gradient spike statistics and the spike-aware clipping of SPAM.

Everything here stays on the gradients' device and returns device tensors: the caller moves the few
scalars it needs to the host once per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

DEFAULT_THETA = 5000.0


@torch.no_grad()
def grad_norms(grads: Sequence[Tensor]) -> Tensor:
    """Each gradient's L2 norm in float32, ``(len(grads),)`` on the first one's device, in their order:
    one foreach pass per device."""
    if len(grads) == 0:
        return torch.zeros(0, dtype=torch.float32)
    device = grads[0].device
    by_device: dict[torch.device, list[int]] = {}
    for i, g in enumerate(grads):
        by_device.setdefault(g.device, []).append(i)
    if len(by_device) == 1:
        return torch.stack(torch._foreach_norm(list(grads), 2, dtype=torch.float32))
    out = torch.empty(len(grads), dtype=torch.float32, device=device)
    for idx in by_device.values():
        out[idx] = torch.stack(torch._foreach_norm([grads[i] for i in idx], 2, dtype=torch.float32)).to(device)
    return out


@torch.no_grad()
def global_grad_norm(grads: Sequence[Tensor]) -> Tensor:
    """The L2 norm of all gradients together, in float32 (non-finite if any element is)."""
    if len(grads) == 0:
        return torch.zeros((), dtype=torch.float32)
    return torch.linalg.vector_norm(grad_norms(grads))


@torch.no_grad()
def element_spike_mask(grad: Tensor, second_moment: Tensor, theta: float = DEFAULT_THETA) -> Tensor:
    """SPAM's spike rule, per element: ``g^2 > theta * v`` where ``v > 0``.

    ``v`` is the optimizer's second moment from the previous step, without bias correction (SPAM,
    sec. 3.2). Elements with ``v == 0`` have no history (a row of an embedding never seen before), so
    they are not called spikes: SPAM's own rule would flag and clip them to zero.
    """
    g = grad.float()
    v = second_moment.float()
    return (g * g > theta * v) & (v > 0)


@torch.no_grad()
def count_element_spikes(
    grads: Sequence[Tensor], second_moments: Sequence[Tensor | None], theta: float = DEFAULT_THETA
) -> tuple[Tensor, int]:
    """The number of spiking elements (a device tensor) and the number of elements checked.

    Same rule as :func:`element_spike_mask`, computed with a fixed number of foreach kernels whatever
    the number of tensors (a per-tensor loop costs several kernel launches per parameter). Callers
    bound the temporary memory (two float32 copies of the gradients passed) by passing chunks.
    """
    pairs = [(g, v) for g, v in zip(grads, second_moments) if v is not None]
    if not pairs:
        device = grads[0].device if grads else None
        return torch.zeros((), dtype=torch.float32, device=device), 0
    gs = [g.float() for g, _ in pairs]
    vs = [v.float() for _, v in pairs]
    excess = torch._foreach_mul(gs, gs)  # g^2
    torch._foreach_mul_(excess, 1.0 / theta)
    torch._foreach_sub_(excess, vs)  # g^2 / theta - v: positive where g^2 > theta v
    torch._foreach_mul_(excess, torch._foreach_sign(vs))  # v == 0 -> 0: never a spike
    torch._foreach_sign_(excess)
    torch._foreach_clamp_min_(excess, 0.0)  # 1 where spiking, else 0
    counts = torch._foreach_norm(excess, 1)
    device = pairs[0][0].device
    total = torch.stack([c.to(device) for c in counts]).sum()
    return total, sum(g.numel() for g, _ in pairs)


@torch.no_grad()
def max_spike_excess(grads: Sequence[Tensor], second_moments: Sequence[Tensor | None], theta: float = DEFAULT_THETA) -> Tensor:
    """``max(g^2 - theta * v)`` over every element with a moment (``-inf`` if none), as a device scalar.

    A cheap screen for :func:`count_element_spikes`: no element can spike where this is ``<= 0``.
    It may be positive without a spike (an element with ``v == 0`` and ``g != 0``); the exact
    count then decides. Non-finite gradients give a non-finite result.
    """
    pairs = [(g, v) for g, v in zip(grads, second_moments) if v is not None]
    if not pairs:
        return torch.full((), -math.inf, device=grads[0].device if grads else None)
    gs = [g if g.dtype == torch.float32 else g.float() for g, _ in pairs]
    excess = torch._foreach_mul(gs, gs)
    torch._foreach_add_(excess, [v if v.dtype == torch.float32 else v.float() for _, v in pairs], alpha=-theta)
    maxima = list(torch._foreach_max(excess))
    device = pairs[0][0].device
    if any(m.device != device for m in maxima):
        maxima = [m.to(device) for m in maxima]
    return torch.stack(maxima).max()


def chunk_by_numel(items: Sequence[Tensor], budget: int) -> list[list[int]]:
    """Indices of ``items`` in consecutive chunks of at most ``budget`` elements (one item may exceed it)."""
    chunks: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, t in enumerate(items):
        if current and size + t.numel() > budget:
            chunks.append(current)
            current, size = [], 0
        current.append(i)
        size += t.numel()
    if current:
        chunks.append(current)
    return chunks


@torch.no_grad()
def clip_element_spikes_(
    grads: Sequence[Tensor], second_moments: Sequence[Tensor | None], theta: float = DEFAULT_THETA
) -> None:
    """In place: clamp spiking elements to ``sign(g) * sqrt(theta * v)`` (SPAM, sec. 3.2: keep the sign)."""
    for g, v in zip(grads, second_moments):
        if v is None:
            continue
        mask = element_spike_mask(g, v, theta)
        limit = (theta * v.float()).sqrt().to(g.dtype)
        g.copy_(torch.where(mask, torch.sign(g) * limit, g))


@torch.no_grad()
def scale_grads_(grads: Sequence[Tensor], factor: float | Tensor) -> None:
    """In place: multiply every gradient by ``factor`` (a float, or a scalar tensor on their device)."""
    if grads:
        torch._foreach_mul_(list(grads), factor)
