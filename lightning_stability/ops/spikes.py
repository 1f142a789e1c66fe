"""Gradient spike statistics and the spike-aware clipping of SPAM.

Everything here stays on the gradients' device and returns device tensors: the caller moves the few
scalars it needs to the host once per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

DEFAULT_THETA = 5000.0


@torch.no_grad()
def global_grad_norm(grads: Sequence[Tensor]) -> Tensor:
    """The L2 norm of all gradients together, in float32 (non-finite if any element is)."""
    if len(grads) == 0:
        return torch.zeros((), dtype=torch.float32)
    by_device: dict[torch.device, list[Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    device = grads[0].device
    partial = []
    for dev_grads in by_device.values():
        norms = torch._foreach_norm(dev_grads, 2, dtype=torch.float32)
        partial.append(torch.linalg.vector_norm(torch.stack(norms)).to(device))
    return torch.linalg.vector_norm(torch.stack(partial))


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
    """The number of spiking elements (a device tensor) and the number of elements checked."""
    total = None
    checked = 0
    for g, v in zip(grads, second_moments):
        if v is None:
            continue
        n = element_spike_mask(g, v, theta).sum()
        total = n if total is None else total + n.to(total.device)
        checked += g.numel()
    if total is None:
        total = torch.zeros((), dtype=torch.int64, device=grads[0].device if grads else None)
    return total, checked


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
def scale_grads_(grads: Sequence[Tensor], factor: float) -> None:
    """In place: multiply every gradient by ``factor``."""
    if grads:
        torch._foreach_mul_(list(grads), factor)


@torch.no_grad()
def any_nonfinite(values: Sequence[Tensor]) -> Tensor:
    """A boolean device tensor: is any element of any tensor NaN or infinite?"""
    flags = [~torch.isfinite(v).all() for v in values]
    if not flags:
        return torch.zeros((), dtype=torch.bool)
    return torch.stack(flags).any()
