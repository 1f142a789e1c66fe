"""Spectral math on weight matrices: power iteration, stable rank, the update's spectral norm and the
gradient's alignment with the top singular pair (what a monitor measures every step).

Shapes: a *stack* is ``(B, m, n)``: ``B`` weight matrices of the same shape, each ``m x n``; its left
and right vectors are ``(B, m)`` and ``(B, n)``. Everything runs in float32 on the weights' device and
returns device tensors: callers move the few scalars they need to the host once per logging step.

The rest of the spectral math lives beside it and is imported from here under its usual names: which
weights and how each is read as a matrix (:mod:`~lightning_stability.ops.spectral_weights`), the
interventions (:mod:`~lightning_stability.ops.spectral_edit`) and full spectra
(:mod:`~lightning_stability.ops.spectrum`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_stability.ops.spectral_edit import (  # noqa: F401  (imported from here by callers)
    PSSFunction,
    SpectralUpdateClip,
    inverse_sqrt_newton_schulz,
    pss_delta,
    pss_factors,
    randomized_svd,
    smooth_values,
    soft_spectral_clip,
    spectral_cap_delta,
)
from lightning_stability.ops.spectral_weights import EPS as _EPS
from lightning_stability.ops.spectral_weights import (  # noqa: F401
    WeightMatrix,
    as_matrix,
    find_weight_matrices,
    matrix_view,
    spectral_weights,
)
from lightning_stability.ops.spectrum import (  # noqa: F401
    PowerLawFit,
    SpectrumStats,
    analyze_model,
    analyze_spectrum,
    decay_exponent,
    fit_power_law,
    full_spectrum,
    marchenko_pastur_spikes,
    singular_values,
)


# -- power iteration -------------------------------------------------------------------------------
def _normalize(x: Tensor) -> Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(_EPS)


# Row-sharded weights (FSDP2): each rank holds rows of W, so left vectors (length m) are sharded like
# them and right vectors (length n) are whole on every rank. ``reduce`` sums a tensor over the ranks
# (an all-reduce): W^T x and every squared norm of a left vector are sums of per-rank parts. Without
# it (one device, DDP) the functions below compute exactly what they did before it existed.
Reduce = Callable[[Tensor], Tensor]


def _row_norm(x: Tensor, reduce: Reduce | None) -> Tensor:
    """``||x||`` over the last dim of a left (row-sharded) vector: local squares, summed over ranks."""
    if reduce is None:
        return torch.linalg.vector_norm(x, dim=-1)
    return reduce(x.pow(2).sum(-1)).sqrt()


def normalize_rows(x: Tensor, reduce: Reduce | None = None) -> Tensor:
    """A left vector (B, m) made unit, its norm summed over the ranks' rows with ``reduce``."""
    return x / _row_norm(x, reduce).clamp_min(_EPS).unsqueeze(-1)


# Products with the weights are taken with the vectors as rows (``x^T W^T`` for ``W x``): on CPU a
# batched product whose small operand is a row block runs several times faster than one whose small
# operand is a column block (measured with torch 2.13: 33 against 265 us for a (4, 512, 128) stack);
# on GPUs both forms are the same GEMM with different transpose flags.
def _mv(w: Tensor, x: Tensor) -> Tensor:
    return torch.bmm(x.unsqueeze(1), w.transpose(1, 2)).squeeze(1)  # W x: (B, m, n), (B, n) -> (B, m)


def _tmv(w: Tensor, x: Tensor) -> Tensor:
    return torch.bmm(x.unsqueeze(1), w).squeeze(1)  # W^T x: (B, m, n), (B, m) -> (B, n)


def _mm(w: Tensor, x: Tensor) -> Tensor:
    return torch.bmm(x.transpose(1, 2).contiguous(), w.transpose(1, 2)).transpose(1, 2)  # W X: (B, n, k) -> (B, m, k)


def _tmm(w: Tensor, x: Tensor) -> Tensor:
    return torch.bmm(x.transpose(1, 2).contiguous(), w).transpose(1, 2)  # W^T X: (B, m, k) -> (B, n, k)


def init_vectors(
    b: int, m: int, n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Random unit starting vectors ``u (B, m)`` and ``v (B, n)``, drawn on the host from ``generator``
    (so that every rank of a data-parallel run, seeded alike, starts from the same vectors)."""
    u = _normalize(torch.randn(b, m, generator=generator, dtype=torch.float32))
    v = _normalize(torch.randn(b, n, generator=generator, dtype=torch.float32))
    return u.to(device), v.to(device)


@torch.no_grad()
def power_iteration(
    w: Tensor, u: Tensor, v: Tensor, iters: int = 1, reduce: Reduce | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``iters`` warm-started power iterations on a stack ``w (B, m, n)``.

    With ``reduce``, ``w`` and ``u`` are this rank's rows of row-sharded matrices: two all-reduces per
    iteration (``W^T u``, then ``||W v||^2``), and ``v``, ``sigma``, ``residual`` the same on every rank.

    Returns ``(u, v, sigma, residual)``. ``sigma = ||W v||`` with ``v`` a unit vector, a lower bound
    of sigma_max that rises to it as the pair converges. ``residual = ||W^T u / ||W^T u|| - v||`` for
    the pair that entered the last iteration: it costs no extra product (``W^T u`` starts the
    iteration) and is 0 exactly at a singular pair.
    """
    sigma = torch.zeros(w.shape[0], device=w.device, dtype=torch.float32)
    residual = torch.full_like(sigma, math.inf)
    for _ in range(max(int(iters), 1)):
        z = _tmv(w, u)  # W^T u, (B, n)
        if reduce is not None:
            z = reduce(z)  # the sum of the ranks' W_r^T u_r
        v_next = _normalize(z)
        # at a singular pair W^T u = sigma v: the residual is how far v still moves
        residual = torch.linalg.vector_norm(v_next - v, dim=-1)
        v = v_next
        wv = _mv(w, v)  # (B, m)
        sigma = _row_norm(wv, reduce)
        u = wv / sigma.clamp_min(_EPS).unsqueeze(-1)
    return u, v, sigma, residual


@torch.no_grad()
def subspace_iteration(w: Tensor, basis: Tensor, iters: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``iters`` warm-started block power iterations on a stack ``w (B, m, n)`` with a right basis
    ``basis (B, n, r)`` (Rayleigh-Ritz on the block; ``r = 1`` is plain power iteration).

    Each iteration is one product with ``W`` and one with ``W^T`` (``r`` columns each: the weights are
    read once, as for a single vector) plus QR and SVD factorisations of ``r``-column blocks. Tracking
    a block makes the estimate robust where two top singular values cross during training, which a
    single vector follows only slowly (its error shrinks by ``(sigma_2 / sigma_1)^2`` per iteration;
    the block's by ``(sigma_{r+1} / sigma_1)^2``).

    Returns ``(u (B, m), v (B, n), sigma (B,), basis (B, n, r), residual (B,))``: the top Ritz pair,
    ``sigma = u^T W v`` (a lower bound of sigma_max), the rotated basis (its first column is ``v``)
    to pass back next time, and ``residual = sin`` of the angle ``v`` moved in the last iteration
    (0 at convergence).
    """
    u = v = sigma = residual = torch.empty(0)
    for _ in range(max(int(iters), 1)):
        left = torch.linalg.qr(_mm(w, basis)).Q  # (B, m, r)
        u, v, sigma, basis, residual = _ritz(left, _tmm(w, left), basis[..., 0])
    return u, v, sigma, basis, residual


def _ritz(left: Tensor, wt_left: Tensor, v_prev: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Rayleigh-Ritz on an orthonormal left block ``U`` given ``W^T U``: the top pair, the rotated
    right basis and how far ``v`` moved from ``v_prev`` (see :func:`subspace_iteration`)."""
    right, r = torch.linalg.qr(wt_left)  # W^T U = V' R: U^T W V' = R^T
    p, s, qh = torch.linalg.svd(r)  # R = P S Q^T, so (U Q)^T W (V' P) = S
    basis = torch.bmm(right, p)  # (B, n, r), Ritz vectors in order
    u = torch.bmm(left, qh.transpose(1, 2))[..., 0]
    v, sigma = basis[..., 0], s[..., 0]
    cos = (v * v_prev).sum(-1).abs().clamp(max=1.0)
    return u, v, sigma, basis, torch.sqrt(1.0 - cos * cos)


class Tracked(NamedTuple):
    """What :func:`tracking_step` returns."""

    u: Tensor  # (B, m) the top left singular vector's estimate
    v: Tensor  # (B, n) the top right one's
    sigma: Tensor  # (B,) a lower bound of sigma_max that rises to it
    basis: Tensor  # (B, n, r) the right block to pass back next time
    residual: Tensor  # (B,) how far v moved in the last iteration (0 at convergence)
    w_right: Tensor  # (B, m, k) W @ right
    wt_left: Tensor  # (B, n, k) W^T @ left


@torch.no_grad()
def tracking_step(
    w: Tensor, u: Tensor, basis: Tensor, left: Tensor, right: Tensor, iters: int = 1, reduce: Reduce | None = None
) -> Tracked:
    """``iters`` warm-started iterations for the top singular pair of every matrix of a stack
    ``w (B, m, n)`` that, in the same two products, also applies the weights to extra vectors:
    ``W @ right`` for ``right (B, n, k)`` and ``W^T @ left`` for ``left (B, m, k)``.

    A product with a few columns reads the weights once, as one with a single vector does, so the
    extra vectors (the update's probes of :func:`update_power_step`) come almost for free. With a
    block of one vector this is :func:`power_iteration` started from ``u``; with a block of ``r > 1``
    it is :func:`subspace_iteration` started from ``basis``. Iterations after the first apply only
    to the top pair.

    With ``reduce`` (row-sharded ``w``, ``u`` and ``left``; a block of one vector only) the two products
    cost one all-reduce each, extra columns included; ``W @ right`` stays sharded by rows.
    """
    r = basis.shape[-1]
    if reduce is not None and r != 1:
        raise ValueError(f"tracking_step(reduce=...): row-sharded weights need a block of one vector, got {r}")
    if r == 1:
        z = _tmm(w, torch.cat([u.unsqueeze(-1), left], dim=-1))  # W^T [u | left]: (B, n, 1 + k)
        if reduce is not None:
            z = reduce(z)
        v = _normalize(z[..., 0])
        residual = torch.linalg.vector_norm(v - basis[..., 0], dim=-1)
        y = _mm(w, torch.cat([v.unsqueeze(-1), right], dim=-1))  # W [v | right]: (B, m, 1 + k)
        sigma = _row_norm(y[..., 0], reduce)
        u = y[..., 0] / sigma.clamp_min(_EPS).unsqueeze(-1)
        if iters > 1:
            u, v, sigma, residual = power_iteration(w, u, v, iters - 1, reduce)
        return Tracked(u, v, sigma, v.unsqueeze(-1), residual, y[..., 1:], z[..., 1:])
    y = _mm(w, torch.cat([basis, right], dim=-1))  # W [basis | right]: (B, m, r + k)
    block = torch.linalg.qr(y[..., :r]).Q
    z = _tmm(w, torch.cat([block, left], dim=-1))  # W^T [block | left]: (B, n, r + k)
    u, v, sigma, basis, residual = _ritz(block, z[..., :r], basis[..., 0])
    if iters > 1:
        u, v, sigma, basis, residual = subspace_iteration(w, basis, iters - 1)
    return Tracked(u, v, sigma, basis, residual, y[..., r:], z[..., r:])


@torch.no_grad()
def tracking_step_rows(
    w: Tensor, u: Tensor, v_prev: Tensor, left: Sequence[Tensor], right: Sequence[Tensor], iters: int = 1
) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """:func:`tracking_step` with a block of one vector (``v_prev``, the last ``v``) on whole weights,
    the extra vectors given one by one: ``left`` of ``(B, m)``, ``right`` of ``(B, n)``.

    The same products on the same operands, so the same numbers, in about half the operator calls:
    the vectors are stacked straight into the row blocks the products take, and the results split
    with one call. Where the weights are small, those calls are the cost.

    Returns ``(u, v, sigma, residual, W @ right, W^T @ left)``, the last two tuples of vectors.
    """
    z, *wt_left = torch.bmm(torch.stack([u, *left], dim=1), w).unbind(1)  # W^T [u | left] as rows: (B, 1 + k, n)
    v = _normalize(z)
    residual = torch.linalg.vector_norm(v - v_prev, dim=-1)
    y, *w_right = torch.bmm(torch.stack([v, *right], dim=1), w.transpose(1, 2)).unbind(1)  # W [v | right]: (B, 1 + k, m)
    sigma = torch.linalg.vector_norm(y, dim=-1)
    u = y / sigma.clamp_min(_EPS).unsqueeze(-1)
    if iters > 1:
        u, v, sigma, residual = power_iteration(w, u, v, iters - 1)
    return u, v, sigma, residual, tuple(w_right), tuple(wt_left)


@torch.no_grad()
def stable_rank(w: Tensor, sigma: Tensor) -> Tensor:
    """``||W||_F^2 / sigma_max^2`` per matrix of a stack (between 1 and the rank)."""
    fro2 = torch.linalg.vector_norm(w.float(), dim=(-2, -1)).pow(2)
    return fro2 / sigma.float().pow(2).clamp_min(_EPS)


@torch.no_grad()
def alignment(grad: Tensor, u: Tensor, v: Tensor, reduce: Reduce | None = None) -> Tensor:
    """PSS's dominant-direction energy ``(u^T G v)^2 / ||G||_F^2`` per matrix of a stack, in [0, 1].

    With ``reduce`` (row-sharded ``grad`` and ``u``): both sums over rows in one all-reduce."""
    g = grad.float()
    proj = (u * _mv(g, v)).sum(-1)  # u^T G v, (B,)
    if reduce is None:
        return proj.pow(2) / torch.linalg.vector_norm(g, dim=(-2, -1)).pow(2).clamp_min(_EPS)
    proj, fro2 = reduce(torch.stack([proj, g.pow(2).sum(dim=(-2, -1))]))
    return proj.pow(2) / fro2.clamp_min(_EPS)


@torch.no_grad()
def update_power_step(
    w_dv: Tensor, wt_du: Tensor, old_w_dv: Tensor, old_wt_du: Tensor, du: Tensor, dv: Tensor,
    reduce: Reduce | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One power-iteration step on the update ``D = W_new - W_old`` without a copy of ``W_old``.

    ``old_w_dv = W_old dv`` and ``old_wt_du = W_old^T du`` were taken before the update, ``w_dv = W_new
    dv`` and ``wt_du = W_new^T du`` after it (both as extra columns of :func:`tracking_step`), so
    ``D dv`` and ``D^T du`` are differences. Returns ``(du', dv', sigma)`` with ``du' ~ D dv``, ``dv' ~
    D^T du`` and ``sigma`` the larger of the two norms, a lower bound of ``||D||_2``. Where the update
    is zero along the vectors (a skipped step) the old vectors are kept, so the iteration never dies on
    a zero vector. Across steps this is a power iteration on ``D D^T`` (and ``D^T D``), which converges
    as far as consecutive updates share their top direction.
    """
    d_v = w_dv - old_w_dv  # D dv, (B, m): row-sharded with ``reduce`` (one all-reduce for its norm)
    d_tu = wt_du - old_wt_du  # D^T du, (B, n)
    a = _row_norm(d_v, reduce).unsqueeze(-1)
    b = torch.linalg.vector_norm(d_tu, dim=-1, keepdim=True)
    du_next = torch.where(a > _EPS, d_v / a.clamp_min(_EPS), du)
    dv_next = torch.where(b > _EPS, d_tu / b.clamp_min(_EPS), dv)
    return du_next, dv_next, torch.maximum(a, b).squeeze(-1)
