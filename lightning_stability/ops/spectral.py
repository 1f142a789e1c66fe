"""Spectral math on weight matrices: power iteration, stable rank, spectral interventions, full spectra.

Shapes: a *stack* is ``(B, m, n)``: ``B`` weight matrices of the same shape, each ``m x n``; its left
and right vectors are ``(B, m)`` and ``(B, n)``. Everything runs in float32 on the weights' device and
returns device tensors: callers move the few scalars they need to the host once per logging step.

A weight of more than two dimensions (a convolution kernel ``(out, in, *k)``) is read as the matrix
``(out, in * prod(k))``. That matrix's singular values are not those of the convolution operator
(which depend on the input size); they are what WeightWatcher and spectral-norm papers track.
"""

from __future__ import annotations

import fnmatch
import math
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from lightning_stability.ops.sharded import all_reduce_sum_, is_row_sharded, local

_EPS = 1e-12


# -- which weights ---------------------------------------------------------------------------------
class WeightMatrix(NamedTuple):
    """One weight matrix a monitor tracks.

    ``name`` is the owning module's qualified name for a module's ``weight`` (``"blocks.0.mlp"``) and
    the parameter's qualified name otherwise (``"attn.in_proj_weight"``, ``"lstm.weight_hh_l0"``).
    ``transposed``: the weight is stored ``(in, out)`` (transformers' ``Conv1D``); :func:`matrix_view`
    then reads it as the ``(out, in)`` matrix an ``nn.Linear`` of the same layer would hold, so that
    the left singular vectors live in the output space for every layer type. ``embedding``: an
    ``nn.Embedding`` holds it (under any of its names).
    """

    name: str
    param: nn.Parameter
    transposed: bool
    embedding: bool


def _conv1d_type() -> type | None:
    # transformers' Conv1D (GPT-2 and its family: weight (in, out), forward x @ W + b); looked up only
    # where transformers is already imported, so this module never imports it
    utils = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(utils, "Conv1D", None)
    return cls if isinstance(cls, type) else None


_RNN_WEIGHT = re.compile(r"weight_(ih|hh|hr)_l\d+(_reverse)?")
_LAYER_TYPES = (
    "Linear, Conv1d/2d/3d, transformers' Conv1D, Embedding, MultiheadAttention (in_proj_weight or "
    "q/k/v_proj_weight), RNN/LSTM/GRU (weight_ih/hh/hr), or a module with in_features/out_features and "
    "a weight of shape (out_features, in_features)"
)


def _classify(mod: nn.Module, pname: str, p: Tensor, conv1d: type | None) -> tuple[bool, str | None]:
    """``(transposed, None)`` for a weight matrix of a known layer type, ``(False, reason)`` for any
    other parameter of two or more dimensions."""
    if not p.is_floating_point():
        return False, f"a {p.dtype} weight (quantised): power iteration and the interventions need floats"
    if pname == "weight":
        if conv1d is not None and isinstance(mod, conv1d):
            nx, nf = getattr(mod, "nx", None), getattr(mod, "nf", None)
            if p.dim() == 2 and tuple(p.shape) == (nx, nf):
                return True, None
            return False, (
                f"a transformers Conv1D whose weight {tuple(p.shape)} is not (nx, nf) = ({nx}, {nf}): its (in, out) "
                "layout has changed, so its orientation is unknown"
            )
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return False, None
        if isinstance(mod, (nn.Linear, nn.Embedding)) and p.dim() == 2:
            return False, None
        out_f, in_f = getattr(mod, "out_features", None), getattr(mod, "in_features", None)
        if isinstance(out_f, int) and isinstance(in_f, int) and tuple(p.shape) == (out_f, in_f):
            return False, None  # a Linear-like layer of another library (TE, quantised Linear wrappers)
        if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            return False, "a transposed-convolution kernel (in, out / groups, *k): no (out, in) reading"
    if isinstance(mod, nn.MultiheadAttention) and pname in ("in_proj_weight", "q_proj_weight", "k_proj_weight",
                                                              "v_proj_weight") and p.dim() == 2:
        return False, None  # (3E, E) or (E, kdim / vdim): used as F.linear(x, W), Linear's orientation
    if isinstance(mod, nn.RNNBase) and _RNN_WEIGHT.fullmatch(pname) and p.dim() == 2:
        return False, None  # (gates * hidden, in): F.linear's orientation
    return False, (
        f"a {p.dim()}-D parameter of {type(mod).__name__}, which is not one of the layer types measured ({_LAYER_TYPES}): "
        "its (out, in) orientation is unknown"
    )


def find_weight_matrices(
    module: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] = ()
) -> tuple[list[WeightMatrix], dict[str, str]]:
    """Every weight matrix of ``module`` to track, and every other parameter of two or more dimensions
    with the reason it is not tracked (``{name: reason}``).

    Tracked: the weights of ``nn.Linear`` (and Linear-like modules: ``in_features``/``out_features``
    with a weight ``(out_features, in_features)``), ``nn.Embedding``, ``nn.Conv1d/2d/3d``,
    transformers' ``Conv1D`` (``transposed``), ``nn.MultiheadAttention``'s ``in_proj_weight`` (or its
    ``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ) and the RNN/LSTM/GRU weight matrices.

    ``include``/``exclude`` are shell-style patterns on the names (``"blocks.*.attn.*"``); for a
    parameter of a module other than its ``weight`` the owning module's name matches too. A weight
    is kept if one of its names matches an include pattern (all, when ``include`` is ``None``) and
    no exclude pattern. A weight shared by several modules (tied embeddings) is listed once, under
    its first name that passes the filters.
    """
    conv1d = _conv1d_type()
    candidates: list[tuple[str, str, nn.Parameter, bool, str | None]] = []  # (name, module name, p, transposed, reason)
    embeddings: set[int] = set()
    for mod_name, mod in module.named_modules():
        for pname, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            if p.dim() < 2:
                continue
            if isinstance(mod, nn.Embedding) and pname == "weight":
                embeddings.add(id(p))
            name = mod_name if pname == "weight" else (f"{mod_name}.{pname}" if mod_name else pname)
            transposed, reason = _classify(mod, pname, p, conv1d)
            candidates.append((name, mod_name, p, transposed, reason))

    def passes(name: str, mod_name: str) -> bool:
        names = {name, mod_name}
        if include is not None and not any(fnmatch.fnmatchcase(n, pat) for n in names for pat in include):
            return False
        return not any(fnmatch.fnmatchcase(n, pat) for n in names for pat in exclude)

    tracked: list[WeightMatrix] = []
    seen: set[int] = set()
    reasons: dict[int, tuple[str, str]] = {}  # id(p) -> (first name, reason) of the untracked ones
    for name, mod_name, p, transposed, reason in candidates:
        if id(p) in seen:
            continue
        if reason is None and passes(name, mod_name):
            seen.add(id(p))
            tracked.append(WeightMatrix(name, p, transposed, id(p) in embeddings))
        elif id(p) not in reasons or (reasons[id(p)][1].startswith("left out") and reason is not None):
            reasons[id(p)] = (name, reason if reason is not None else "left out by include/exclude")
    skipped = {name: why for key, (name, why) in reasons.items() if key not in seen}
    return tracked, skipped


def spectral_weights(
    module: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] = ()
) -> list[tuple[str, nn.Parameter]]:
    """``(name, weight)`` of every weight :func:`find_weight_matrices` tracks, filtered the same way.
    Read a ``Conv1D`` weight with ``matrix_view(w, transposed=True)`` for its ``(out, in)`` matrix
    (the singular values are the same either way)."""
    return [(w.name, w.param) for w in find_weight_matrices(module, include, exclude)[0]]


def as_matrix(weight: Tensor) -> Tensor:
    """The ``(out, rest)`` matrix view of a weight (conv kernels flattened over input and kernel dims)."""
    return weight if weight.dim() == 2 else weight.reshape(weight.shape[0], -1)


def matrix_view(weight: Tensor, transposed: bool = False) -> Tensor:
    """The ``(out, in)`` matrix of a weight, a view (in-place writes reach it): :func:`as_matrix`, or
    the transpose of a weight stored ``(in, out)`` (``transposed``, transformers' ``Conv1D``)."""
    return weight.t() if transposed else as_matrix(weight)


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


# -- interventions ---------------------------------------------------------------------------------
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
    m, n = w.shape
    k = max(1, min(int(k), min(m, n) - 1))
    u, s, v = randomized_svd(w, k + 1, generator=generator, niter=niter)
    level = s[k]
    new = smooth_values(s[:k], level, fn)
    delta = (u[:, :k] * (new - s[:k])) @ v[:, :k].T
    return delta, new, u[:, 0], v[:, 0]


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


# -- full spectra ----------------------------------------------------------------------------------
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
