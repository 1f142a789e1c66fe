"""Spectral interventions on weight matrices and their updates: the rank-one cap, parametric
singularity smoothing (PSS) through a randomized partial SVD, and SPECTRA's soft spectral clip of
updates by coupled Newton-Schulz.

Shapes as in :mod:`lightning_stability.ops.spectral`: a stack is ``(B, m, n)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import Tensor

from lightning_stability.ops.sharded import all_reduce_sum_, is_row_sharded, local
from lightning_stability.ops.spectral_weights import EPS as _EPS
from lightning_stability.ops.spectral_weights import as_matrix


@torch.no_grad()
def spectral_cap_delta(u: Tensor, v: Tensor, sigma: Tensor, cap: Tensor | float) -> Tensor:
    """The rank-one change ``(min(sigma, cap) - sigma) u v^T`` per matrix, ``(B, m, n)``.

    Added to a matrix whose top singular pair is ``(u, sigma, v)``, it sets that singular value to
    ``min(sigma, cap)`` and leaves every other singular value as it is; matrices already under the cap
    get a zero change, so it can run every step with no host decision.
    """
    cap_t = torch.as_tensor(cap, dtype=torch.float32, device=sigma.device)
    delta = torch.minimum(sigma, cap_t) - sigma  # (B,), <= 0
    return delta[:, None, None] * u.unsqueeze(-1) * v.unsqueeze(1)


@torch.no_grad()
def randomized_svd(
    w: Tensor, rank: int, oversample: int = 8, niter: int = 4, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Top ``rank`` singular triplets ``(U (m, r), S (r,), V (n, r))`` of one matrix, by a randomized
    range finder with ``niter`` power iterations (Halko, Martinsson, Tropp 2011, alg. 4.4).

    The test matrix is drawn on the host from ``generator``; pass one (as :class:`SpectralMonitor`
    does) to leave the training run's random stream alone and give every data-parallel rank the same
    result. With ``None`` it comes from the global RNG.
    """
    a = w.float()
    m, n = a.shape
    q = min(rank + oversample, m, n)
    omega = torch.randn(n, q, generator=generator, dtype=torch.float32).to(a.device)
    basis = torch.linalg.qr(a @ omega).Q  # (m, q)
    for _ in range(niter):
        basis = torch.linalg.qr(a @ torch.linalg.qr(a.T @ basis).Q).Q
    ub, s, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)  # (q, q), (q,), (q, n)
    r = min(rank, q)
    return (basis @ ub)[:, :r], s[:r], vh[:r].T


PSSFunction = Literal["clip", "log"]


def smooth_values(s: Tensor, level: Tensor, fn: PSSFunction) -> Tensor:
    """The smoothing function of PSS, applied to the top singular values ``s`` above ``level``:
    ``clip``: ``min(s, level)``; ``log``: ``level * (1 + ln(s / level))`` (slope 1 at the level, so the
    spectrum stays continuous, and logarithmic above it). Values at or below the level are unchanged."""
    if fn == "clip":
        out = torch.minimum(s, level)
    elif fn == "log":
        out = torch.where(s > level, level * (1 + torch.log(s / level.clamp_min(_EPS))), s)
    else:
        raise ValueError(f"smooth_values(fn={fn!r}): expected 'clip' or 'log'")
    return out


@torch.no_grad()
def pss_delta(
    w: Tensor, k: int, fn: PSSFunction = "log", generator: torch.Generator | None = None, niter: int = 4
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Parametric singularity smoothing of one matrix: ``W* = W + U_k (f(S_k) - S_k) V_k^T``.

    The top ``k`` singular values are smoothed towards the level of the ``(k+1)``-th, the largest one
    left alone, by ``fn`` (:func:`smooth_values`); the rest of the spectrum is untouched (up to the
    accuracy of the randomized SVD). Returns ``(delta (m, n), new top values (k,), u_1, v_1)``; the
    pair re-seeds the power iteration of the smoothed weight.
    """
    (u, change, v), new = pss_factors(w, k, fn, generator, niter)
    return (u * change) @ v.T, new, u[:, 0], v[:, 0]


def pss_factors(
    w: Tensor, k: int, fn: PSSFunction = "log", generator: torch.Generator | None = None, niter: int = 4
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
    """:func:`pss_delta`'s change as its factors ``(U_k (m, k), f(S_k) - S_k (k,), V_k (n, k))``, and
    the new top values: the change is ``U_k diag(c) V_k^T``, kept small to be undone later."""
    m, n = w.shape
    k = max(1, min(int(k), min(m, n) - 1))
    u, s, v = randomized_svd(w, k + 1, generator=generator, niter=niter)
    new = smooth_values(s[:k], s[k], fn)
    return (u[:, :k], new - s[:k], v[:, :k]), new


@torch.no_grad()
def inverse_sqrt_newton_schulz(a: Tensor, scale: Tensor, iters: int) -> Tensor:
    """``A^{-1/2}`` of a symmetric positive-definite stack ``(B, k, k)`` by coupled Newton-Schulz.

    Iterates ``Y <- Y T, Z <- T Z, T = (3I - Z Y) / 2`` from ``Y = A / scale, Z = I``; ``Z`` converges
    to ``(A / scale)^{-1/2}`` when the eigenvalues of ``A / scale`` lie in (0, 1], which a cheap upper
    bound ``scale >= lambda_max`` (a Frobenius norm) guarantees with no host decision.
    """
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype).expand_as(a)
    y = a / scale[:, None, None]
    z = eye.clone()
    for _ in range(iters):
        t = 0.5 * (3.0 * eye - z @ y)
        y = y @ t
        z = t @ z
    return z / scale.sqrt()[:, None, None]


@torch.no_grad()
def soft_spectral_clip(x: Tensor, c: float, iters: int = 40, reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """SPECTRA's soft spectral clip: each singular value ``s -> s / sqrt(1 + s^2 / c^2)`` (the
    singular vectors kept), computed as ``(I + X X^T / c^2)^{-1/2} X`` on the smaller Gram matrix with
    coupled Newton-Schulz (no SVD, no host sync). ``x`` is one matrix or a stack ``(B, m, n)``.

    Values far below ``c`` pass almost unchanged; large ones approach ``c``.

    ``reduce`` (sum over ranks, in place) makes ``x`` one rank's rows of a row-sharded matrix: the
    result is ``X (I + X^T X / c^2)^{-1/2}``, the same clip, with the ``n x n`` Gram summed over ranks
    (one all-reduce) and each rank's rows multiplied by its inverse square root.

    Computed in float64: a spike with ``s / c`` above ~4000 makes ``s^2 / c^2`` swamp the identity in
    float32 (``1 / eps``), and the iteration then diverges instead of clipping. The smallest
    eigenvalue of ``A / scale`` is ``~ c^2 / ||X||_F^2``; coupled Newton-Schulz multiplies it by about
    9/4 an iteration, so 40 iterations cover ``||X||_F / c`` up to ~1e6 (the Gram matrices are
    ``min(m, n)`` square: small next to the weights).
    """
    squeeze = x.dim() == 2
    xs = (x.unsqueeze(0) if squeeze else x).double()
    wide = reduce is None and xs.shape[-2] <= xs.shape[-1]
    gram = xs @ xs.transpose(-2, -1) if wide else xs.transpose(-2, -1) @ xs  # (B, k, k), k = min(m, n)
    if reduce is not None:
        gram = reduce(gram)  # every rank's rows: X^T X = sum over ranks of X_r^T X_r
    eye = torch.eye(gram.shape[-1], device=xs.device, dtype=xs.dtype)
    a = eye + gram / (c * c)
    # lambda_max(A) <= 1 + ||X||_F^2 / c^2: a bound from the trace of the Gram, no eigen-solve
    scale = 1.0 + gram.diagonal(dim1=-2, dim2=-1).sum(-1) / (c * c)
    inv = inverse_sqrt_newton_schulz(a, scale, iters)
    out = inv @ xs if wide else xs @ inv
    return (out.squeeze(0) if squeeze else out).to(x.dtype)


class SpectralUpdateClip:
    """Soft spectral clipping of the updates an optimizer makes to matrix parameters (SPECTRA).

    Wraps any torch optimizer (and bitsandbytes ones) through its step hooks: before ``step()`` the
    selected parameters are copied; after it, each update ``D = W_new - W_old`` is replaced by
    ``lr * clip(D / lr)`` with :func:`soft_spectral_clip` at level ``c``. Dividing by the learning
    rate makes ``c`` a property of the optimizer's direction, not of the schedule (an Adam update
    divided by its LR has entries of order one; ``c = 10`` is SPECTRA's typical value).

    Costs one copy of the selected weights during the step. ``remove()`` detaches it. Row-sharded
    weights (FSDP2) are clipped on each rank's rows, with one all-reduce of an ``n x n`` Gram matrix
    per weight and step.

    Example::

        clip = SpectralUpdateClip(optimizer, c=10.0)  # every parameter with two or more dimensions
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        c: float = 10.0,
        params: Iterable[Tensor] | None = None,
        iters: int = 40,
    ) -> None:
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0:
            raise ValueError(f"SpectralUpdateClip(c={c!r}): expected a finite float > 0")
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"SpectralUpdateClip(iters={iters!r}): expected an int >= 1")
        self.optimizer = optimizer
        self.c = float(c)
        self.iters = iters
        wanted = None if params is None else {id(p) for p in params}
        self.targets: list[tuple[Tensor, dict]] = [
            (p, group)
            for group in optimizer.param_groups
            for p in group["params"]
            if p.dim() >= 2 and (wanted is None or id(p) in wanted)
        ]
        self._before: list[tuple[Tensor, dict, Tensor]] = []
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        # Every target, gradient or not: with a closure (Lightning's automatic optimization) the
        # pre-hook runs before the closure's backward, when ``.grad`` is still the previous step's
        # (``None`` on the first step and after a skipped one), not this step's.
        self._before = [(p, g, local(p.detach()).clone()) for p, g in self.targets]

    @torch.no_grad()
    def _post_step(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        before, self._before = self._before, []
        for p, group, old in before:
            lr = float(group["lr"])
            if lr <= 0 or p.grad is None:  # no gradient now: the optimizer left it as it was
                continue
            shard = local(p.detach())  # this rank's rows of a row-sharded weight, else the weight
            delta = as_matrix(shard.float() - old.float()) / lr
            reduce = all_reduce_sum_ if is_row_sharded(p) else None
            clipped = soft_spectral_clip(delta, self.c, self.iters, reduce) * lr
            shard.copy_((as_matrix(old.float()) + clipped).reshape(shard.shape))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._before = []
