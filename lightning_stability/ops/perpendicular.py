"""The gradient's component along the weight: how far an update only scales the weights up (naive loss
minimisation, the road to Softmax Collapse), and the perpendicular gradient that removes it (the
grokking-at-the-edge work), whole or on each rank's shards. Pure torch, no Lightning."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from lightning_stability.ops.sharded import local


@torch.no_grad()
def nlm_alignment(weight: Tensor, grad: Tensor) -> Tensor:
    """``cos(-g, w)``: how far the update direction points along the weights themselves. Near 1 the
    optimizer mostly scales the weights up (naive loss minimisation, the road to Softmax Collapse)."""
    w, g = weight.detach().float().reshape(-1), grad.detach().float().reshape(-1)
    denom = (torch.linalg.vector_norm(w) * torch.linalg.vector_norm(g)).clamp_min(1e-30)
    return -(w @ g) / denom


@torch.no_grad()
def perpendicular_grad_(params: Iterable[torch.nn.Parameter], eps: float = 1e-30) -> None:
    """Project each parameter's gradient orthogonal to the parameter, then rescale it to its original
    norm (the perpendicular gradient of the grokking-at-the-edge work): ``g <- ||g|| g_perp /
    ||g_perp||`` with ``g_perp = g - (w.g / w.w) w``. The update then cannot just scale the weights up.
    In place and without a host sync; parameters without a gradient are skipped, and a zero weight or
    a gradient parallel to the weight leaves the gradient as it was."""
    for p in params:
        g = p.grad
        if g is None:
            continue
        w = p.detach().float()
        gf = g.float()
        ww = (w * w).sum()
        perp = gf - (w * gf).sum() / ww.clamp_min(eps) * w
        perp_norm = torch.linalg.vector_norm(perp)
        out = perp * (torch.linalg.vector_norm(gf) / perp_norm.clamp_min(eps))
        keep = (ww <= eps) | (perp_norm <= eps)
        g.copy_(torch.where(keep, gf, out).to(g.dtype))


@torch.no_grad()
def sharded_nlm_and_perp_sums(params: Sequence[torch.nn.Parameter], reduce: Callable[[Tensor], Tensor]) -> Tensor:
    """``(k, 3)``: ``w.g``, ``w.w``, ``g.g`` of each parameter with a gradient, summed over the ranks'
    shards with one ``reduce`` (an all-reduce): the whole tensors' sums, from which both
    :func:`nlm_alignment` and the perpendicular gradient follow without gathering."""
    rows = []
    for p in params:
        w, g = local(p.detach()).float(), local(p.grad).float()  # type: ignore[arg-type]
        rows.append(torch.stack([(w * g).sum(), (w * w).sum(), (g * g).sum()]))
    return reduce(torch.stack(rows))


def nlm_from_sums(sums: Tensor) -> Tensor:
    """:func:`nlm_alignment` of each row of :func:`sharded_nlm_and_perp_sums`, ``(k,)``."""
    return -sums[:, 0] / (sums[:, 1].sqrt() * sums[:, 2].sqrt()).clamp_min(1e-30)


@torch.no_grad()
def sharded_perpendicular_grad_(params: Sequence[torch.nn.Parameter], sums: Tensor, eps: float = 1e-30) -> None:
    """:func:`perpendicular_grad_` on each rank's shards, from the whole tensors' sums (the rows of
    :func:`sharded_nlm_and_perp_sums`): ``||g_perp||^2 = g.g - (w.g)^2 / w.w``, so every rank rescales
    its rows by the same factor."""
    for p, (wg, ww, gg) in zip(params, sums):
        g = local(p.grad)  # type: ignore[arg-type]
        w, gf = local(p.detach()).float(), g.float()
        coef = wg / ww.clamp_min(eps)
        perp_norm = (gg - wg * coef).clamp_min(0.0).sqrt()
        out = (gf - coef * w) * (gg.sqrt() / perp_norm.clamp_min(eps))
        keep = (ww <= eps) | (perp_norm <= eps)
        g.copy_(torch.where(keep, gf, out).to(g.dtype))
