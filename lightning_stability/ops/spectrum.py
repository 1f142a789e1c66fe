"""Full spectra of single weight matrices: all singular values, the power-law fit of the
eigenvalue density, and the WeightWatcher-style metrics built on them (the empirical spectral
density, ESD, that a monitor computes for each layer now and then, not every step)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_stability.ops.spectral_weights import EPS as _EPS
from lightning_stability.ops.spectral_weights import as_matrix, spectral_weights


@torch.no_grad()
def singular_values(w: Tensor) -> Tensor:
    """All singular values of one matrix in float32, descending, from the eigenvalues of the smaller
    Gram matrix (several times faster than an SVD; tiny values lose relative accuracy, which none of
    the fits below use)."""
    a = as_matrix(w).float()
    gram = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    eig = torch.linalg.eigvalsh(gram).clamp_min(0.0)
    return eig.flip(0).sqrt()


@torch.no_grad()
def full_spectrum(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """All singular values (descending, float32) and the exact top pair ``(u, v)`` of one matrix,
    from one eigen-decomposition of the smaller Gram matrix."""
    a = as_matrix(w).float()
    wide = a.shape[0] <= a.shape[1]
    eig, vec = torch.linalg.eigh(a @ a.T if wide else a.T @ a)
    sv = eig.clamp_min(0.0).flip(0).sqrt()
    top = vec[:, -1]
    other = a.T @ top if wide else a @ top
    other = other / torch.linalg.vector_norm(other).clamp_min(_EPS)
    return (sv, top, other) if wide else (sv, other, top)


@dataclass(frozen=True)
class PowerLawFit:
    alpha: float  # exponent of the density p(x) ~ x^-alpha above x_min
    x_min: float
    ks: float  # Kolmogorov-Smirnov distance of the fit on the tail
    n_tail: int


@torch.no_grad()
def fit_power_law(values: Tensor, max_candidates: int = 256, min_tail: int = 10) -> PowerLawFit:
    """Power-law fit of a density by maximum likelihood, ``x_min`` chosen by the smallest KS distance.

    For a candidate ``x_min = x_i`` (values sorted ascending), the MLE is
    ``alpha_i = 1 + n_i / sum_{j >= i} ln(x_j / x_i)`` (Clauset, Shalizi, Newman 2009, eq. 3.1): every
    candidate's exponent comes from one suffix sum. The KS distance of each candidate's tail is then
    evaluated for at most ``max_candidates`` candidates spread evenly over the ranks that leave
    ``min_tail`` values in the tail, all at once: ``O(N log N)`` for the sort plus ``O(C N)`` for the
    distances, instead of one fit per candidate in a Python loop (``O(N^2)``). With ``N <=
    max_candidates`` every value is a candidate, as in WeightWatcher and ``powerlaw``.
    """
    x = values.detach().double().reshape(-1)
    x = torch.sort(x[torch.isfinite(x) & (x > 0)]).values
    n = x.numel()
    if n < max(min_tail, 2):
        return PowerLawFit(math.nan, math.nan, math.nan, int(n))
    logx = torch.log(x)
    suffix = torch.flip(torch.cumsum(torch.flip(logx, [0]), 0), [0])  # sum_{j >= i} ln x_j
    last = n - min_tail  # last candidate index
    count = last + 1
    idx = (
        torch.arange(count)
        if count <= max_candidates
        else torch.unique(torch.linspace(0, last, max_candidates).round().long())
    )
    n_tail = (n - idx).double()
    denom = suffix[idx] - n_tail * logx[idx]
    alpha = 1.0 + n_tail / denom.clamp_min(1e-300)
    # KS on each candidate's tail, (C, N): columns before the candidate are masked out.
    j = torch.arange(n)
    rank = (j.unsqueeze(0) - idx.unsqueeze(1)).double()  # position in the tail
    in_tail = rank >= 0
    emp_hi = (rank + 1) / n_tail.unsqueeze(1)
    emp_lo = rank / n_tail.unsqueeze(1)
    fit = 1.0 - torch.exp((1.0 - alpha).unsqueeze(1) * (logx.unsqueeze(0) - logx[idx].unsqueeze(1)))
    gap = torch.maximum((emp_hi - fit).abs(), (emp_lo - fit).abs())
    ks = torch.where(in_tail, gap, torch.zeros_like(gap)).amax(dim=1)
    ks = torch.where(torch.isfinite(alpha) & (denom > 0), ks, torch.full_like(ks, math.inf))
    best = int(torch.argmin(ks))
    return PowerLawFit(float(alpha[best]), float(x[idx[best]]), float(ks[best]), int(n_tail[best]))


@torch.no_grad()
def decay_exponent(sv: Tensor) -> float:
    """``beta`` in ``sigma_k ~ k^-beta``: the least-squares slope of ``log sigma_k`` on ``log k``."""
    s = sv.detach().double().reshape(-1)
    s = s[s > 0]
    if s.numel() < 2:
        return math.nan
    logk = torch.log(torch.arange(1, s.numel() + 1, dtype=torch.float64))
    logs = torch.log(s)
    kc = logk - logk.mean()
    return float(-(kc * (logs - logs.mean())).sum() / (kc * kc).sum())


@torch.no_grad()
def marchenko_pastur_spikes(sv: Tensor, m: int, n: int) -> tuple[int, float]:
    """Eigenvalues of ``W^T W / N`` above the Marchenko-Pastur bulk edge, and the edge.

    For an ``m x n`` matrix with i.i.d. entries of variance ``s2`` and ``N = max(m, n)``,
    ``M = min(m, n)``, the eigenvalues of ``W^T W / N`` fill ``[s2 (1 - sqrt(M/N))^2,
    s2 (1 + sqrt(M/N))^2]``. ``s2`` is estimated as the mean eigenvalue (``||W||_F^2 / (m n)``), which
    large spikes inflate a little, so the count errs on the low side.
    """
    big, small = max(m, n), min(m, n)
    eig = sv.detach().double().pow(2) / big
    s2 = float(eig.sum()) / small
    edge = s2 * (1.0 + math.sqrt(small / big)) ** 2
    return int((eig > edge).sum()), edge


@dataclass(frozen=True)
class SpectrumStats:
    """The full-spectrum metrics of one weight matrix."""

    sigma_max: float
    stable_rank: float
    alpha: float  # power-law exponent of the eigenvalue (sigma^2) density
    alpha_weighted: float  # alpha * log10(lambda_max)
    log_norm: float  # log10 of the sum of eigenvalues (the squared Frobenius norm)
    decay: float  # beta in sigma_k ~ k^-beta
    mp_spikes: int  # eigenvalues above the Marchenko-Pastur bulk edge
    ks: float  # KS distance of the power-law fit
    n: int  # number of singular values

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


@torch.no_grad()
def analyze_spectrum(w: Tensor, sv: Tensor | None = None, max_candidates: int = 256) -> SpectrumStats:
    """Every full-spectrum metric of one weight (its singular values computed unless given)."""
    a = as_matrix(w)
    s = singular_values(a) if sv is None else sv
    lam = s.double().pow(2)
    top = float(lam[0]) if lam.numel() else math.nan
    total = float(lam.sum())
    fit = fit_power_law(lam, max_candidates=max_candidates)
    spikes, _ = marchenko_pastur_spikes(s, a.shape[0], a.shape[1])
    return SpectrumStats(
        sigma_max=math.sqrt(top) if top > 0 else 0.0,
        stable_rank=total / top if top > 0 else math.nan,
        alpha=fit.alpha,
        alpha_weighted=fit.alpha * math.log10(top) if top > 0 else math.nan,
        log_norm=math.log10(total) if total > 0 else math.nan,
        decay=decay_exponent(s),
        mp_spikes=spikes,
        ks=fit.ks,
        n=int(s.numel()),
    )


def analyze_model(
    module: nn.Module, include: Sequence[str] | None = None, exclude: Iterable[str] = ()
) -> dict[str, SpectrumStats]:
    """:func:`analyze_spectrum` of every weight :func:`spectral_weights` selects, by module name."""
    return {name: analyze_spectrum(w) for name, w in spectral_weights(module, include, tuple(exclude))}
