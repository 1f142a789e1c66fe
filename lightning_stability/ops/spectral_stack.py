"""Weights measured together: a stack ``(B, m, n)`` on one device, its power-iteration state, and
how the weights of a model are grouped into stacks. Pure torch, no Lightning.

A group holds, per matrix, the right block of the subspace iteration, the top singular pair, the
update's singular pair (in two generations, see :class:`SpectralGroup`) and the probes taken with the
old weights; :class:`~lightning_stability.ops.spectral_tracker.SpectralTracker` drives the groups.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor, nn

from lightning_stability.ops.sharded import all_reduce_sum_, held_rows, is_row_sharded, local
from lightning_stability.ops.spectral import matrix_view, power_iteration, subspace_iteration

VECTORS = ("basis", "u", "v", "du", "dv", "du_next", "dv_next")  # per-layer tracking state
LEFT = frozenset({"u", "du", "du_next"})  # the vectors of length m; the others have length n
# Small weights of different shapes share one zero-padded stack (block=1, unsharded only): on a small
# model each stack costs ~100 operator calls a step whatever its size, so fewer stacks are faster.
# Shapes merge while the padded stack holds at most MERGE_RATIO times the real elements and at most
# MERGE_MAX_ELEMENTS in all; larger models, whose cost is the products' FLOPs, keep one stack a shape.
MERGE_RATIO = 3.0
MERGE_MAX_ELEMENTS = 1 << 22
GroupKey = tuple[int, int, torch.device, tuple[int, int] | None]  # (m, n, device, this rank's rows or None)


class TrackedLayer:
    """One weight a tracker measures: its name, the parameter, how it reads as a matrix, and its
    place (``group``, ``slot``) in the stack it is measured in."""

    def __init__(self, name: str, param: nn.Parameter, embedding: bool, transposed: bool = False) -> None:
        self.name = name
        self.param = param
        self.embedding = embedding
        # stored (in, out) (transformers' Conv1D): measured and edited through the (out, in) view, so
        # u, v, the cap, PSS and the update estimate are exactly a Linear's of the same layer
        self.transposed = transposed
        self.group: SpectralGroup | None = None
        self.slot = 0
        self.loaded_probes: list[Tensor] | None = None  # from a checkpoint, until the groups take them

    def matrix(self, t: Tensor) -> Tensor:
        """The ``(out, in)`` matrix view of the weight ``t`` (or of its gradient, or a shard of either)."""
        return matrix_view(t, self.transposed)

    def own_rows(self, left: Tensor) -> Tensor:
        """This rank's rows of a left vector saved whole (a checkpoint's, under row sharding); a vector
        of this rank's own length (a snapshot's) as it is."""
        g = self.group
        if g is None or left.ndim != 1 or left.shape[0] != self.param.shape[0]:
            return left
        return g.own_rows(left)


class SpectralGroup:
    """Weights on one device measured together as a stack ``(B, m, n)``: of one matrix shape, or of
    several shapes zero-padded to the largest ``m`` and ``n`` (``sizes`` holds each one's own).

    Padding a matrix with zeros, ``[[W, 0], [0, 0]]``, leaves its nonzero singular values and its top
    singular pair as they are, with zeros in the padded entries of the vectors. The padded entries of
    every vector start at zero and stay there (``W^T u`` and ``W v`` are zero where ``W`` is padded),
    so the stack computes exactly what one stack per shape does.
    """

    def __init__(
        self, layers: list[TrackedLayer], m: int, n: int, r: int, device: torch.device, rows: tuple[int, int] | None = None,
        sizes: list[tuple[int, int]] | None = None,
    ) -> None:
        self.layers = layers
        self.m, self.n, self.device = m, n, device
        self.sizes = sizes if sizes is not None else [(m, n)] * len(layers)  # each matrix's own (m, n)
        # Row-sharded weights (FSDP2): ``m`` is this rank's rows ``rows`` of the full matrices; left
        # vectors hold those rows, right vectors are whole, and every sum over rows is all-reduced.
        self.rows = rows
        self.reduce = all_reduce_sum_ if rows is not None else None
        b = len(layers)
        # A padded stack lives in a persistent zeroed buffer: each step copies the weights (and the
        # gradients) into their corners with one fused copy, and the padding stays zero.
        self.padded = any(size != (m, n) for size in self.sizes)
        self._weights = torch.zeros(b, m, n, device=device) if self.padded else None
        self._grads = torch.zeros(b, m, n, device=device) if self.padded else None
        self._weight_views = corners(self._weights, self.sizes)
        self._grad_views = corners(self._grads, self.sizes)
        shapes: dict[tuple[int, int], list[int]] = {}
        for slot, size in enumerate(self.sizes):
            shapes.setdefault(size, []).append(slot)
        # what iterates together on checks: the matrices of one shape, as in a stack of one shape
        self.parts: list[tuple[tuple[int, int], list[int]] | None] = list(shapes.items()) if self.padded else [None]
        zeros = torch.zeros(b, device=device)
        self.basis = torch.zeros(b, n, r, device=device)  # right block of the subspace iteration
        self.u = torch.zeros(b, m, device=device)  # the top pair, from the block
        self.v = torch.zeros(b, n, device=device)
        # The update's singular pair, in two generations: (du, dv) are measured at the next step against
        # probes (W_old dv, W_old^T du) taken at this one; (du_next, dv_next) come from the last update
        # and get their probes at the next step, when they take over (one product per side serves all).
        self.du = torch.zeros(b, m, device=device)
        self.dv = torch.zeros(b, n, device=device)
        self.du_next = torch.zeros(b, m, device=device)
        self.dv_next = torch.zeros(b, n, device=device)
        self.probes: tuple[Tensor, Tensor] | None = None  # (W_old dv, W_old^T du)
        self.stale: set[int] = set()  # slots of a padded stack whose probes are void (as ``probes=None``)
        self.sigma, self.ratio, self.residual = zeros.clone(), zeros.clone(), zeros.clone()
        self.align = zeros.clone()  # largest alignment since the last check
        self.align_last = zeros.clone()

    def reseed(self, b: int, v: Tensor) -> None:
        """Put ``v`` first in matrix ``b``'s block (after an exact decomposition or an intervention)."""
        basis, vec = self.vector("basis", b), self.vector("v", b)
        block = torch.cat([v.reshape(-1, 1).to(basis), basis[:, 1:]], dim=1)
        basis.copy_(torch.linalg.qr(block).Q)
        vec.copy_(v / torch.linalg.vector_norm(v).clamp_min(1e-12))

    def drop_probes(self, b: int) -> None:
        """Void matrix ``b``'s probes (its weight was changed): its update estimate restarts, and in a
        padded stack so do those of its shape alone, as in a stack of that shape."""
        if not self.padded:
            self.probes = None
            return
        for part in self.parts:
            if part is not None and b in part[1]:
                self.stale.update(part[1])

    def vector(self, key: str, b: int) -> Tensor:
        """Matrix ``b``'s entry of the per-matrix state ``key`` (``VECTORS``) at its own size: a view."""
        m, n = self.sizes[b]
        return getattr(self, key)[b, : m if key in LEFT else n]

    def clear_padding(self, b: int) -> None:
        """Zero matrix ``b``'s padded entries of every per-matrix vector. A non-finite weight turns
        them NaN (``0 * NaN``); restoring the vectors at their own size leaves the padding alone, so it
        is cleared here, or the NaN would come back through the next product."""
        m, n = self.sizes[b]
        for key in VECTORS:
            getattr(self, key)[b, m if key in LEFT else n:] = 0.0

    def own_rows(self, x: Tensor) -> Tensor:
        """This rank's rows (first dim) of a whole left vector or matrix, for a row-sharded group."""
        return x if self.rows is None else x[self.rows[0]:self.rows[1]]

    def iterate(self, w: Tensor, iters: int, part: tuple[tuple[int, int], list[int]] | None = None) -> Tensor:
        """Warm-started iterations on the stack ``w``: plain power iteration for a block of one
        vector (the cheapest: a few kernels per group), block power iteration otherwise. ``part``
        (of a padded group, ``((m, n), slots)``) iterates those matrices alone, unpadded. Returns
        the iterated matrices' residuals."""
        if part is not None:
            (m, n), slots = part
            idx = torch.tensor(slots, device=self.device)
            u, v, sigma, residual = power_iteration(w[idx, :m, :n], self.u[idx, :m], self.basis[idx, :n, 0], iters)
            self.u[idx, :m], self.v[idx, :n], self.basis[idx, :n, 0] = u, v, v
            self.sigma[idx], self.residual[idx] = sigma, residual
            return residual
        if self.basis.shape[-1] == 1:
            self.u, self.v, self.sigma, self.residual = power_iteration(w, self.u, self.basis[..., 0], iters, self.reduce)
            self.basis = self.v.unsqueeze(-1)
        else:
            self.u, self.v, self.sigma, self.basis, self.residual = subspace_iteration(w, self.basis, iters)
        return self.residual

    def stable_rank(self) -> Tensor:
        """``||W||_F^2 / sigma^2`` from the weights as they are now and the tracked sigma_max (read only
        on checks, so no step pays for the Frobenius norms; one fused kernel per group)."""
        fro = torch.stack(torch._foreach_norm([local(layer.param.detach()) for layer in self.layers])).float()
        fro2 = fro.pow(2).to(self.sigma.device)
        if self.reduce is not None:
            fro2 = self.reduce(fro2)  # the ranks' rows: one all-reduce, on checks only
        return fro2 / self.sigma.pow(2).clamp_min(1e-24)

    def stack(self) -> Tensor:
        if self._weights is not None:
            with torch.no_grad():  # the parameters themselves, no detached views: one op in all
                torch._foreach_copy_(self._weight_views, [layer.matrix(layer.param) for layer in self.layers])
            return self._weights
        ws = [layer.matrix(local(layer.param.detach())) for layer in self.layers]  # this rank's rows, sharded
        return torch.stack(ws).float()  # (B, m, n)

    def grad_stack(self, grads: list[Tensor | None]) -> Tensor:
        """The gradients as a stack ``(B, m, n)``, zeros for a matrix without one."""
        if self._grads is None:
            return torch.stack([
                layer.matrix(local(g)) if g is not None else torch.zeros(self.m, self.n, device=self.device)
                for layer, g in zip(self.layers, grads)
            ])
        dst, src = [], []
        for view, layer, g in zip(self._grad_views, self.layers, grads):
            if g is None:
                view.zero_()
            else:
                dst.append(view)
                src.append(layer.matrix(g))
        torch._foreach_copy_(dst, src)
        return self._grads


def merge_shapes(
    by_shape: dict[GroupKey, list[TrackedLayer]], merge: bool
) -> list[tuple[GroupKey, list[TrackedLayer], list[tuple[int, int]]]]:
    """The groups: one per shape, with small unsharded shapes on one device merged (when ``merge``)
    into zero-padded stacks while a stack stays within ``MERGE_RATIO`` times its real elements and
    ``MERGE_MAX_ELEMENTS`` in all; the cheapest merge (least padding per real element) first.

    Returns ``((m, n, device, rows), layers, sizes)`` per group, ``sizes`` each layer's own (m, n)."""
    clusters = [[key] for key in by_shape]

    def cost(keys: list[GroupKey]) -> tuple[int, int]:
        count = sum(len(by_shape[k]) for k in keys)
        real = sum(len(by_shape[k]) * k[0] * k[1] for k in keys)
        return count * max(k[0] for k in keys) * max(k[1] for k in keys), real

    while merge:
        best: tuple[float, int, int] | None = None
        for i, a in enumerate(clusters):
            for j in range(i + 1, len(clusters)):
                b = clusters[j]
                if a[0][2] != b[0][2] or a[0][3] is not None or b[0][3] is not None:
                    continue  # another device, or sharded rows
                padded, real = cost(a + b)
                fits = padded <= MERGE_RATIO * real and padded <= MERGE_MAX_ELEMENTS
                if fits and (best is None or padded / real < best[0]):
                    best = (padded / real, i, j)
        if best is None:
            break
        _, i, j = best
        clusters[i] = clusters[i] + clusters.pop(j)
    out = []
    for keys in clusters:
        layers = [layer for k in keys for layer in by_shape[k]]
        sizes = [(k[0], k[1]) for k in keys for _ in by_shape[k]]
        m, n = max(k[0] for k in keys), max(k[1] for k in keys)
        out.append(((m, n, keys[0][2], keys[0][3]), layers, sizes))
    return out


def corners(stack: Tensor | None, sizes: list[tuple[int, int]]) -> list[Tensor]:
    """Views of each matrix's own ``(m, n)`` corner of a padded stack (none without one)."""
    return [] if stack is None else [stack[b, :m, :n] for b, (m, n) in enumerate(sizes)]


def sharded_rows(owner: str, name: str, param: Tensor) -> tuple[int, int] | None:
    """The rows of a row-sharded weight this rank holds; ``None`` for a whole one (plain or replicated)."""
    try:
        rows = held_rows(param)
    except NotImplementedError:
        raise NotImplementedError(
            f"{owner}: layer {name!r} is a DTensor with placements {param.placements} on a mesh of "  # type: ignore[attr-defined]
            f"{param.device_mesh.ndim} dims; only FSDP2's row sharding (Shard(0) on one mesh dim) or full "  # type: ignore[attr-defined]
            f"replication is measured. Leave it out with exclude=[{name!r}]."
        ) from None
    return rows if is_row_sharded(param) else None


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A host generator seeded from the layer's name: the same numbers on every rank, whatever the
    other layers are."""
    return torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
