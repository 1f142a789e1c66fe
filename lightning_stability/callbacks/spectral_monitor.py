"""SpectralMonitor: per-layer singular spectra during training, and spectral interventions."""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_stability.callbacks._base import (
    StabilityCallback,
    check_fraction,
    check_int,
    check_on_halt,
    check_positive,
    is_logging_step,
    log_to_loggers,
)
from lightning_stability.events import StabilityEvent
from lightning_stability.ops.ladder import EscalationLadder, validate_ladder
from lightning_stability.ops.optim_state import unwrap_optimizer
from lightning_stability.ops.robust import RollingWindow
from lightning_stability.ops.sharded import (
    all_reduce_sum_,
    full,
    held_rows,
    is_row_sharded,
    local,
)
from lightning_stability.ops.spectral import (
    SpectralUpdateClip,
    alignment,
    analyze_spectrum,
    find_weight_matrices,
    full_spectrum,
    init_vectors,
    matrix_view,
    normalize_rows,
    power_iteration,
    pss_delta,
    spectral_cap_delta,
    subspace_iteration,
    tracking_step,
    tracking_step_rows,
    update_power_step,
)

SPECTRAL_ACTIONS = ("warn", "cap", "pss", "clip_updates", "rollback", "halt")
SPECTRAL_DETECTIONS = (
    "sigma_growth", "rank_collapse", "alignment", "embedding_rank_rise", "intervention_failed", "nonfinite_weight"
)
# Observe by default: in docs/benchmarks.md ("Does it stop a blow-up?") the weight-editing rungs, cap
# and PSS, rescued 0 of 6 learning-rate blow-ups, so nothing edits weights unless the user opts in.
DEFAULT_LADDER = ("warn",)
# What the advice event points to (docs/benchmarks.md: spectral clipping of every update from the
# first step rescued 3 of 3 of those blow-ups; the monitor's own weight edits none).
ADVICE = (
    "SpectralMonitor observes only at its defaults (ladder=('warn',): no weight is edited). To act on a "
    "detection, opt in: SpectralMonitor(ladder=('clip_updates', 'rollback')) clips the flagged layer's update "
    "spectra and asks an attached InMemoryRollback for a rollback if the detection persists; "
    "SpectralUpdateClip(optimizer, c=3.0) clipping every update from the first step rescued 3 of 3 learning-rate "
    "blow-ups in docs/benchmarks.md, where ladder=('cap', 'pss'), which edit the weights, rescued 0 of 6."
)
# Detections that call for a warning only, whatever the ladder (a flattening embedding spectrum under
# low precision is a symptom to look at, not something smoothing repairs).
_WARN_ONLY = frozenset({"embedding_rank_rise"})
_FULL_PRECISION = ("32-true", "64-true", "32", "64")
_CAP_ITERS = 100  # block iterations that converge the top pair before a cap
_MIN_HISTORY = 3  # checks in a layer's history before its detections are armed
# Fresh vectors are iterated until converged, at most this many times (once, when training starts):
# a square random-init matrix has almost no spectral gap and may need a hundred iterations.
_MAX_INIT_ITERS = 300
_VECTORS = ("basis", "u", "v", "du", "dv", "du_next", "dv_next")  # per-layer tracking state
_LEFT = frozenset({"u", "du", "du_next"})  # the vectors of length m; the others have length n
# Small weights of different shapes share one zero-padded stack (block=1, unsharded only): on a small
# model each stack costs ~100 operator calls a step whatever its size, so fewer stacks are faster.
# Shapes merge while the padded stack holds at most _MERGE_RATIO times the real elements and at most
# _MERGE_MAX_ELEMENTS in all; larger models, whose cost is the products' FLOPs, keep one stack a shape.
_MERGE_RATIO = 3.0
_MERGE_MAX_ELEMENTS = 1 << 22


class _Group:
    """Weights on one device measured together as a stack ``(B, m, n)``: of one matrix shape, or of
    several shapes zero-padded to the largest ``m`` and ``n`` (``sizes`` holds each one's own).

    Padding a matrix with zeros, ``[[W, 0], [0, 0]]``, leaves its nonzero singular values and its top
    singular pair as they are, with zeros in the padded entries of the vectors. The padded entries of
    every vector start at zero and stay there (``W^T u`` and ``W v`` are zero where ``W`` is padded),
    so the stack computes exactly what one stack per shape does.
    """

    def __init__(
        self, layers: list[_Layer], m: int, n: int, r: int, device: torch.device, rows: tuple[int, int] | None = None,
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
        self._weight_views = _corners(self._weights, self.sizes)
        self._grad_views = _corners(self._grads, self.sizes)
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
        """Matrix ``b``'s entry of the per-matrix state ``key`` (``_VECTORS``) at its own size: a view."""
        m, n = self.sizes[b]
        return getattr(self, key)[b, : m if key in _LEFT else n]

    def clear_padding(self, b: int) -> None:
        """Zero matrix ``b``'s padded entries of every per-matrix vector. A non-finite weight turns
        them NaN (``0 * NaN``); restoring the vectors at their own size leaves the padding alone, so it
        is cleared here, or the NaN would come back through the next product."""
        m, n = self.sizes[b]
        for key in _VECTORS:
            getattr(self, key)[b, m if key in _LEFT else n:] = 0.0

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


class _Layer:
    """What the monitor keeps about one weight on the host."""

    def __init__(
        self, monitor: SpectralMonitor, name: str, param: nn.Parameter, embedding: bool, transposed: bool = False
    ) -> None:
        self.name = name
        self.param = param
        self.embedding = embedding
        # stored (in, out) (transformers' Conv1D): measured and edited through the (out, in) view, so
        # u, v, the cap, PSS and the update estimate are exactly a Linear's of the same layer
        self.transposed = transposed
        self.group: _Group | None = None
        self.slot = 0
        self.growth = RollingWindow(monitor.window)  # per-step log-growth of sigma_max between checks
        self.rank = RollingWindow(monitor.window)  # stable rank at checks
        self.sigmas = RollingWindow(monitor.window)  # sigma_max at checks (the cap's reference)
        self.ladder = EscalationLadder(
            monitor.ladder, monitor.patience, monitor.cooldown, actions=SPECTRAL_ACTIONS,
            detections=SPECTRAL_DETECTIONS, repairs={}, fallback="warn",
        )
        self.last_sigma = math.nan
        self.last_check = -1
        self.clipper: SpectralUpdateClip | None = None
        self.clip_updates = False
        self.warned = False  # a warning-only detection is active
        self.loaded_probes: list[Tensor] | None = None
        self.full: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "growth": self.growth.state_dict(),
            "rank": self.rank.state_dict(),
            "sigmas": self.sigmas.state_dict(),
            "ladder": self.ladder.state_dict(),
            "last_sigma": self.last_sigma,
            "last_check": self.last_check,
            "clip_updates": self.clip_updates,
            "full": dict(self.full),
        }
        g = self.group
        if g is not None:
            # each vector at the layer's own size, whether its group is padded or not
            for key in _VECTORS:
                state[key] = g.vector(key, self.slot).detach().cpu().clone()
            if g.probes is not None and self.slot not in g.stale:
                m, n = g.sizes[self.slot]
                state["probes"] = [g.probes[0][self.slot, :m].detach().cpu().clone(),
                                   g.probes[1][self.slot, :n].detach().cpu().clone()]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.growth.load_state_dict(state.get("growth", {}))
        self.rank.load_state_dict(state.get("rank", {}))
        self.sigmas.load_state_dict(state.get("sigmas", {}))
        self.ladder.load_state_dict(state.get("ladder", {}))
        self.last_sigma = float(state.get("last_sigma", math.nan))
        self.last_check = int(state.get("last_check", -1))
        self.clip_updates = bool(state.get("clip_updates", False))
        self.full = {str(k): float(v) for k, v in dict(state.get("full", {})).items()}
        self.loaded_probes = state.get("probes")
        g = self.group
        if g is not None:
            for key in _VECTORS:
                value = state.get(key)
                if key in _LEFT and isinstance(value, Tensor):
                    value = self.own_rows(value)
                target = g.vector(key, self.slot)
                if isinstance(value, Tensor) and value.shape == target.shape:
                    target.copy_(value)
            g.clear_padding(self.slot)

    def matrix(self, t: Tensor) -> Tensor:
        """The ``(out, in)`` matrix view of the weight ``t`` (or of its gradient, or a shard of either)."""
        return matrix_view(t, self.transposed)

    def own_rows(self, left: Tensor) -> Tensor:
        """This rank's rows of a left vector saved whole (a checkpoint's, under row sharding); a vector
        of this rank's own length (a snapshot's) as it is."""
        g = self.group
        if g is None or left.ndim != 1 or left.shape[0] != self.param.shape[0]:
            return left
        return _own_rows(g, left)


class SpectralMonitor(StabilityCallback):
    r"""Tracks the singular spectrum of every weight matrix during training; intervenes only if asked.

    **Which defaults change training: none.** At its defaults the monitor observes: ``ladder=("warn",)``
    emits each detection as an event and edits nothing (docs/benchmarks.md: capping and PSS after a
    detection rescued 0 of 6 learning-rate blow-ups). Its first detection also emits one
    ``spectral_advice`` event (``info``) and a warning naming the remedies to opt into (``ADVICE``):
    ``ladder=("clip_updates", "rollback")``, or ``SpectralUpdateClip(optimizer, c=3.0)`` from the first
    step. The one request it makes whatever the ladder: a rollback, from an attached
    ``InMemoryRollback``, for a non-finite weight.

    **Which weights.** Every weight matrix of ``nn.Linear`` (and Linear-like modules with
    ``in_features``/``out_features``), ``nn.Embedding``, ``nn.Conv1d/2d/3d`` (kernels read as
    ``(out, in * kernel)`` matrices, whose singular values are not the convolution operator's),
    transformers' ``Conv1D`` (stored ``(in, out)``: measured and edited through its ``(out, in)``
    view, exactly as the equivalent ``nn.Linear``), ``nn.MultiheadAttention`` (``in_proj_weight``, or
    ``q/k/v_proj_weight``) and RNN/LSTM/GRU, selected by shell-style ``include``/``exclude`` patterns
    on the names (a module's name for its ``weight``, ``<module>.<parameter>`` otherwise). Tied weights
    count once. Every other parameter of two or more dimensions is listed with its reason in one
    ``spectral_skipped`` event (``info``) and in ``skipped``. The layers are collected when training
    starts, after ``configure_model``.

    **Every measured step** (``every_n_steps``), all on the weights' device with no host sync:

    - ``sigma_max`` by warm-started block power iteration (``power_iters`` products with ``W`` and
      ``W^T`` per weight, each on a block of ``block`` vectors, so the weight is read once per product;
      weights of one shape batched into one stack, and on a small model weights of several shapes
      into one zero-padded stack, which leaves each one's singular values and top pair as they are:
      fewer stacks, fewer operator calls); the vectors persist in the callback's state and in
      checkpoints, at each weight's own size;
    - the spectral norm of the step's update relative to the weight's (``update_ratio``), by a power
      iteration on the update itself that needs no copy of the old weights (its vectors ride as extra
      columns of the same two products);
    - the alignment ``(u^T G v)^2 / ||G||_F^2`` of the gradient with the top singular pair (PSS's
      dominant-direction energy).

    **Checks** (on logging steps, or every ``check_every_n_steps``): the statistics, with the stable
    rank ``||W||_F^2 / sigma_max^2`` taken then, come to the host in one copy. Where the power iteration has not converged (residual above ``tol``), more iterations
    run at once (up to ``max_power_iters``). Against each layer's own robust history:

    ==========================  ========================================================================
    detection                   rule
    ==========================  ========================================================================
    ``sigma_growth``            per-step log-growth of sigma_max since the last check with a robust
                                z-score >= ``growth_zscore`` and at least ``min_growth``
    ``rank_collapse``           stable rank below ``rank_collapse`` times its median
    ``alignment``               the largest alignment since the last check >= ``alignment_threshold``
                                while sigma_max grows (the gradient feeds the top direction)
    ``embedding_rank_rise``     (embeddings, low precision) stable rank above ``embedding_rank_rise``
                                times its median: a warning only
    ``intervention_failed``     the mean loss per optimizer step (unscaled under AMP, summed over
                                accumulated micro-batches) after an intervention is worse than before
                                it by more than ``loss_tolerance``: asks for a rollback
    ``nonfinite_weight``        a non-finite sigma_max (a NaN or Inf in the weight): asks for a
                                rollback, whatever the ladder
    ==========================  ========================================================================

    **Interventions**, opted into through ``ladder``: per layer, one rung per detection (climbing every
    ``patience`` detections until ``cooldown`` healthy checks pass), each an event:

    ================  =========================================================================
    action            effect
    ================  =========================================================================
    ``warn``          an event only (the default ladder: ``("warn",)``)
    ``cap``           ``W <- W + (min(sigma, cap) - sigma) u v^T`` with the converged pair, ``cap``
                      the median of the layer's sigma_max history times ``cap_factor``
    ``pss``           parametric singularity smoothing: the top ``k`` singular values (``k`` the
                      stable rank, at most ``pss_max_k``) smoothed towards the next one by ``pss_fn``
                      via a randomized partial SVD; the rest of the spectrum is untouched
    ``clip_updates``  soft spectral clipping of the layer's updates (:class:`SpectralUpdateClip`,
                      level ``update_clip``) until the incident ends
    ``rollback``      asks ``InMemoryRollback`` (if attached) to restore a snapshot
    ``halt``          saves a checkpoint and stops the fit with a report
    ================  =========================================================================

    After a ``cap`` or ``pss`` the layer is re-measured (the event carries sigma before and after),
    and the next check compares the loss with the loss before: if worse, a rollback is requested.

    **Full spectra** every ``full_every_n_steps`` (round-robin: each layer once a period, spread over
    its steps, so no step pays for all): exact singular values in float32, exact stable rank, the
    power-law exponent alpha of the eigenvalue density, its KS distance, ``alpha_weighted``,
    ``log_norm``, the decay exponent of sigma_k against k, the count of eigenvalues above the
    Marchenko-Pastur bulk edge; a histogram of singular values (TensorBoard); the power-iteration
    vectors are re-seeded with the exact top pair.

    Logged metrics (``<layer>`` is the module's qualified name):

    ===============================================  =========================================
    key                                              when
    ===============================================  =========================================
    ``stability/spectral/<layer>/sigma_max``         logging steps, and checks with a detection
    ``stability/spectral/<layer>/stable_rank``       logging steps, and checks with a detection
    ``stability/spectral/<layer>/update_ratio``      logging steps, and checks with a detection
    ``stability/spectral/<layer>/alignment``         the same (the step's value)
    ``stability/spectral/<layer>/alpha``             the layer's full-spectrum step (also
                                                     ``alpha_weighted``, ``log_norm``, ``decay``,
                                                     ``mp_spikes``, ``ks``, ``stable_rank_exact``)
    ``stability/spectral/<layer>/singular_values``   histogram, full-spectrum step (TensorBoard)
    ``stability/events/<kind>``                      logging steps
    ===============================================  =========================================

    Example::

        from lightning_stability import InMemoryRollback, SpectralMonitor
        trainer = pl.Trainer(callbacks=[SpectralMonitor(exclude=["lm_head"])])  # observes only
        # opting in: clip a flagged layer's updates, then roll back if it persists
        trainer = pl.Trainer(callbacks=[SpectralMonitor(ladder=("clip_updates", "rollback")), InMemoryRollback()])

    Under DDP every rank measures identical weights and gradients from identically seeded vectors, so
    measured steps need no collective. Each check gathers the per-layer statistics once (the worst
    rank's value), and each rank's mean loss in the same all-gather: every decision reads the worst
    statistics and the rank mean of the loss, the same numbers on every rank. Under ``ModelParallelStrategy`` (FSDP2,
    row-sharded weights) the products run on each rank's rows and their sums are all-reduced, per shape
    group: 4 all-reduces a measured step, no gather (docs/fsdp.md).

    Args:
        include, exclude: shell-style patterns on module names.
        every_n_steps: measure every n optimizer steps (>= 1).
        power_iters: power iterations per measured step (>= 1).
        block: vectors tracked per weight (>= 1): the top singular pair is found by block power
            iteration with Rayleigh-Ritz, which follows two top singular values that cross during
            training (a single vector lags behind then); the weights are read once per product
            whatever the block size.
        init_iters: iterations for fresh vectors (>= 1); torch's ``spectral_norm`` uses 15.
        max_power_iters: the most extra iterations a check adds to an unconverged estimate.
        tol: residual under which an estimate counts as converged.
        check_every_n_steps: steps between checks; ``None`` checks on the logger's steps only.
        window: checks kept in each layer's history (>= 2); a layer's detections arm once it holds
            ``min(3, window)`` checks.
        warmup: optimizer steps before detections are armed (>= 0): spectra change fast and
            legitimately early in training. A layer also needs 3 checks in its history.
        growth_zscore, min_growth: both must be reached for ``sigma_growth``.
        rank_collapse: fraction of the median stable rank under which it has collapsed, in (0, 1).
        alignment_threshold: in (0, 1]; PSS uses 0.8.
        embedding_rank_rise: ratio (> 1) for the embedding warning; ``"auto"`` is 1.5 under a
            precision other than 32/64-bit and off otherwise; ``None`` is off.
        ladder: ordered actions from ``SPECTRAL_ACTIONS``; ``("warn",)`` (observe) by default.
        patience, cooldown: detections per rung; healthy checks that end an incident.
        cap_factor: the cap as a multiple of the layer's median sigma_max (> 0).
        pss_fn: ``"log"`` or ``"clip"``.
        pss_max_k: the most singular values PSS smooths.
        update_clip: SPECTRA's level ``c`` for ``clip_updates``.
        loss_tolerance: relative loss increase after an intervention that asks for a rollback.
        full_every_n_steps: period of the full-spectrum analysis; ``None`` turns it off.
        seed: seeds the starting vectors and PSS's random projections (identical on every rank).
        on_halt: ``"stop"`` or ``"raise"``.
        name: distinguishes several monitors in one trainer.
    """

    def __init__(
        self,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        every_n_steps: int = 1,
        power_iters: int = 1,
        block: int = 1,
        init_iters: int = 15,
        max_power_iters: int = 20,
        tol: float = 1e-2,
        check_every_n_steps: int | None = None,
        window: int = 64,
        warmup: int = 200,
        growth_zscore: float = 6.0,
        min_growth: float = 5e-3,
        rank_collapse: float = 0.5,
        alignment_threshold: float = 0.8,
        embedding_rank_rise: float | Literal["auto"] | None = "auto",
        ladder: Sequence[str] = DEFAULT_LADDER,
        patience: int = 2,
        cooldown: int = 5,
        cap_factor: float = 1.0,
        pss_fn: Literal["log", "clip"] = "log",
        pss_max_k: int = 8,
        update_clip: float = 10.0,
        loss_tolerance: float = 0.1,
        full_every_n_steps: int | None = 500,
        seed: int = 0,
        on_halt: Literal["stop", "raise"] = "stop",
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        cls = type(self).__name__
        self.include = _patterns(cls, "include", include) if include is not None else None
        self.exclude = _patterns(cls, "exclude", exclude)
        self.every_n_steps = check_int(cls, "every_n_steps", every_n_steps, 1)
        self.power_iters = check_int(cls, "power_iters", power_iters, 1)
        self.block = check_int(cls, "block", block, 1)
        self.init_iters = check_int(cls, "init_iters", init_iters, 1)
        self.max_power_iters = check_int(cls, "max_power_iters", max_power_iters, 0)
        self.tol = check_positive(cls, "tol", tol)
        self.check_every_n_steps = (
            None if check_every_n_steps is None else check_int(cls, "check_every_n_steps", check_every_n_steps, 1)
        )
        self.window = check_int(cls, "window", window, 2)
        self.warmup = check_int(cls, "warmup", warmup, 0)
        self.growth_zscore = check_positive(cls, "growth_zscore", growth_zscore)
        self.min_growth = check_positive(cls, "min_growth", min_growth)
        self.rank_collapse = check_fraction(cls, "rank_collapse", rank_collapse)
        self.alignment_threshold = check_fraction(cls, "alignment_threshold", alignment_threshold, closed=True)
        if embedding_rank_rise not in (None, "auto"):
            check_positive(cls, "embedding_rank_rise", embedding_rank_rise, above=1.0)
        self.embedding_rank_rise = embedding_rank_rise
        self.ladder = validate_ladder(ladder, f"{cls}(ladder)", actions=SPECTRAL_ACTIONS)
        self.patience = check_int(cls, "patience", patience, 1)
        self.cooldown = check_int(cls, "cooldown", cooldown, 1)
        self.cap_factor = check_positive(cls, "cap_factor", cap_factor)
        if pss_fn not in ("log", "clip"):
            raise ValueError(f"{cls}(pss_fn={pss_fn!r}): expected 'log' or 'clip'")
        self.pss_fn: Literal["log", "clip"] = pss_fn
        self.pss_max_k = check_int(cls, "pss_max_k", pss_max_k, 1)
        self.update_clip = check_positive(cls, "update_clip", update_clip)
        self.loss_tolerance = check_positive(cls, "loss_tolerance", loss_tolerance)
        self.full_every_n_steps = (
            None if full_every_n_steps is None else check_int(cls, "full_every_n_steps", full_every_n_steps, 1)
        )
        self.seed = check_int(cls, "seed", seed, 0)
        self.on_halt = check_on_halt(cls, on_halt)

        self._layers: dict[str, _Layer] = {}
        self._groups: list[_Group] = []
        self.skipped: dict[str, str] = {}  # matrix-shaped parameters not tracked, with the reason
        self._advised = False  # the observe-only advice was given in this fit
        self._step_loss = False  # a loss was read since the last optimizer step
        self._pending: dict[str, Any] = {}  # per-layer state loaded before the layers exist
        self._rise: float | None = None
        self._loss_sum: Tensor | None = None  # losses since the last check, on the device
        self._loss_count = 0
        self._last_loss = math.nan  # mean loss of the last check interval
        self._loss_before: float | None = None  # the loss before an intervention whose effect is due
        self._weights_moved = False  # restored by someone else: the update estimate restarts
        self._last_check_step = -1
        self._seen_step = -1
        self._optimizer_list: list[torch.optim.Optimizer] = []
        self._unsubscribe: Any = None
        self._halt_report: str | None = None

    # -- state -----------------------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        return list(self._layers)

    def estimates(self) -> dict[str, dict[str, float]]:
        """The latest per-layer statistics on the host, in one copy: ``sigma_max``, ``stable_rank``,
        ``update_ratio``, ``alignment`` (the last step's), ``alignment_max`` (the largest since the
        last check) and ``residual`` (of the power iteration)."""
        keys = ("sigma_max", "stable_rank", "update_ratio", "alignment", "alignment_max", "residual")
        if not self._groups:
            return {}
        device = self._groups[0].device
        rows = torch.cat(
            [torch.stack([g.sigma, g.stable_rank(), g.ratio, g.align_last, g.align, g.residual]).to(device) for g in self._groups],
            dim=1,
        ).cpu().tolist()  # (6, layers)
        layers = [layer for g in self._groups for layer in g.layers]
        return {layer.name: {k: row[i] for k, row in zip(keys, rows)} for i, layer in enumerate(layers)}

    @override
    def state_dict(self) -> dict[str, Any]:
        layers = {name: layer.state_dict() for name, layer in self._layers.items()}
        for name, state in self._pending.items():
            layers.setdefault(name, state)
        return {
            "layers": layers,
            "counts": dict(self._counts),
            "halt_report": self.halt_report,
            "last_loss": self._last_loss,
            "loss_sum": float(self._loss_sum) if self._loss_sum is not None else 0.0,
            "loss_count": self._loss_count,
            "loss_before": self._loss_before,
            "last_check_step": self._last_check_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = {str(k): v for k, v in dict(state_dict.get("layers", {})).items()}
        self._counts = {str(k): int(v) for k, v in dict(state_dict.get("counts", {})).items()}
        self.halt_report = state_dict.get("halt_report")
        self._last_loss = float(state_dict.get("last_loss", math.nan))
        self._loss_count = int(state_dict.get("loss_count", 0))
        self._loss_sum = torch.tensor(float(state_dict.get("loss_sum", 0.0))) if self._loss_count else None
        before = state_dict.get("loss_before")
        self._loss_before = None if before is None else float(before)
        self._last_check_step = int(state_dict.get("last_check_step", -1))
        if self._layers:
            self._apply_pending()

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if isinstance(state, dict) and any(g.rows is not None for g in self._groups):
            self._whole_left_vectors(trainer, state.get("layers", {}))

    def _whole_left_vectors(self, trainer: pl.Trainer, layers: dict[str, Any]) -> None:
        """Under row sharding each rank holds only its rows of a weight's left vectors, and the
        checkpoint's callback state is rank zero's: put every left vector in it whole (one all-reduce
        of them all, on every rank as the save is), so that each rank resumes with its own rows."""
        slots: list[tuple[dict[str, Any], str | int, int, int, int]] = []  # (where, key, start, stop, rows)
        for g in self._groups:
            if g.rows is None:
                continue
            for layer in g.layers:
                state = layers.get(layer.name)
                if state is None:
                    continue
                rows = layer.param.shape[0]
                slots += [(state, key, *g.rows, rows) for key in sorted(_LEFT) if isinstance(state.get(key), Tensor)]
                probes = state.get("probes")
                if isinstance(probes, list) and len(probes) == 2:
                    slots.append((probes, 0, *g.rows, rows))  # type: ignore[arg-type]
        if not slots:
            return
        offsets = [0]
        for *_, rows in slots:
            offsets.append(offsets[-1] + rows)
        whole = torch.zeros(offsets[-1], device=trainer.strategy.root_device)
        for (where, key, start, stop, _), offset in zip(slots, offsets):
            whole[offset + start:offset + stop] = where[key].to(whole.device)  # type: ignore[index]
        whole = all_reduce_sum_(whole).cpu()  # each rank wrote only its own rows
        for (where, key, *_), offset, end in zip(slots, offsets, offsets[1:]):
            where[key] = whole[offset:end].clone()  # type: ignore[index]

    @override
    def restore_snapshot_state(self, state: dict[str, Any]) -> None:
        counts, report = self._counts, self.halt_report
        super().restore_snapshot_state(state)
        self._counts, self.halt_report = counts, report
        self._weights_moved = True

    def _apply_pending(self) -> None:
        for name, state in list(self._pending.items()):
            layer = self._layers.get(name)
            if layer is not None:
                layer.load_state_dict(state)
                del self._pending[name]
        for g in self._groups:
            # the update estimate goes on where every layer of the group brought its probes back
            loaded = [layer.loaded_probes for layer in g.layers]
            # probes at this rank's sizes (a checkpoint from another layout or sharding has others)
            valid = [
                p is not None and len(p) == 2 and (layer.own_rows(p[0]).shape[0], p[1].shape[0]) == size
                for p, layer, size in zip(loaded, g.layers, g.sizes)
            ]
            if g.reduce is not None:  # row shards: every rank takes the same path, or the collectives part
                invalid = g.reduce(torch.tensor([0.0 if v else 1.0 for v in valid], device=g.device))
                valid = [v == 0 for v in invalid.tolist()]
            g.probes, g.stale = None, set()
            if all(valid) or (g.padded and any(valid)):
                left = torch.zeros(len(g.layers), g.m, device=g.device)  # (B, m): W_old dv, zero-padded
                right = torch.zeros(len(g.layers), g.n, device=g.device)  # (B, n): W_old^T du
                for b, (p, (m, n)) in enumerate(zip(loaded, g.sizes)):
                    if valid[b]:
                        left[b, :m], right[b, :n] = g.layers[b].own_rows(p[0]), p[1]  # type: ignore[index]
                    else:
                        g.drop_probes(b)
                g.probes = (left, right)
            for layer in g.layers:
                layer.loaded_probes = None
        for layer in self._layers.values():
            self._set_update_clip(layer, layer.clip_updates)

    # -- hooks -----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy:
            raise NotImplementedError(
                f"{type(self).__name__} cannot measure weights under {strategy}: FSDP1 flattens every module's "
                "weights into one 1-D shard per rank, whose rows are not a matrix's. Use ModelParallelStrategy "
                "(FSDP2, fully_shard in configure_model), whose row-sharded weights it measures without gathering "
                "them, or DDP."
            )
        if "ModelParallel" in strategy and self.block != 1:
            raise ValueError(
                f"{type(self).__name__}(block={self.block}): under {strategy} the weights are sharded by rows and "
                "block power iteration would need a distributed QR of each block; expected block=1"
            )
        for layer in self._layers.values():
            self._set_update_clip(layer, False)
        self._layers, self._groups, self._pending = {}, [], {}
        self.skipped, self._advised, self._step_loss = {}, False, False
        self._counts, self.halt_report = {}, None
        self._loss_sum, self._loss_count, self._last_loss, self._loss_before = None, 0, math.nan, None
        self._last_check_step = -1
        log = self.event_log(trainer)
        if self._unsubscribe is not None:
            self._unsubscribe()
        self._unsubscribe = log.subscribe(self._on_event)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for layer in self._layers.values():  # the optimizer goes back as it was; the state keeps the flag
            if layer.clipper is not None:
                layer.clipper.remove()
                layer.clipper = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._halted = False
        self._halt_report = None
        self._seen_step = -1
        self._optimizer_list = [unwrap_optimizer(o) for o in trainer.optimizers]
        precision = str(trainer.precision)
        if self.embedding_rank_rise == "auto":
            self._rise = None if precision in _FULL_PRECISION else 1.5
        else:
            self._rise = self.embedding_rank_rise
        if not self._layers:
            self._build(trainer, pl_module)
        self._apply_pending()

    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights, self.skipped = find_weight_matrices(pl_module, self.include, self.exclude)
        if not weights:
            rank_zero_warn(f"{type(self).__name__}: no weight matrix matches; nothing to monitor.")
        if self.skipped:
            # one event lists every matrix-shaped parameter left untracked, each with its reason
            self.emit(trainer, "spectral_skipped", "info",
                      {"tracked": float(len(weights)), "skipped": float(len(self.skipped))}, None,
                      "; ".join(f"{name}: {why}" for name, why in self.skipped.items()))
        by_shape: dict[tuple[int, int, torch.device, tuple[int, int] | None], list[_Layer]] = {}
        for name, param, transposed, embedding in weights:
            rows = _rows(type(self).__name__, name, param)
            # row-sharded (FSDP2): the shards hold rows of the stored (in, out) matrix, so a Conv1D is
            # measured as stored (the same singular values; u and v trade places)
            layer = _Layer(self, name, param, embedding, transposed and rows is None)
            self._layers[name] = layer
            m, n = layer.matrix(local(param)).shape
            by_shape.setdefault((m, n, local(param).device, rows), []).append(layer)
        for (m, n, device, rows), layers, sizes in _merge_shapes(by_shape, self.block == 1):
            r = min(self.block, m, n) if rows is None else 1
            group = _Group(layers, m, n, r, device, rows, sizes)
            for b, layer in enumerate(layers):
                layer.group, layer.slot = group, b
                # one generator per layer, seeded from its name: the same vectors on every rank and
                # whatever the other layers are (padded entries stay zero)
                gen = _gen(self.seed, layer.name)
                mb, nb = sizes[b]
                group.vector("basis", b).copy_(torch.linalg.qr(torch.randn(nb, r, generator=gen)).Q)
                du, dv = init_vectors(1, mb, nb, gen, device)
                for key, value in (("du", du), ("dv", dv), ("du_next", du), ("dv_next", dv)):
                    group.vector(key, b).copy_(value[0])
            w = group.stack()
            if rows is None:
                group.u = torch.nn.functional.normalize(torch.bmm(w, group.basis[..., :1]).squeeze(-1), dim=-1)
            else:
                group.u = normalize_rows(torch.bmm(w, group.basis[..., :1]).squeeze(-1), group.reduce)
            self._converge_group(group, self.init_iters, max_iters=_MAX_INIT_ITERS)
            self._groups.append(group)

    def _on_event(self, event: StabilityEvent) -> None:
        if event.kind == "rollback" and event.source != self.source:
            self._weights_moved = True

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        owned = {id(p) for group in unwrap_optimizer(optimizer).param_groups for p in group["params"]}
        for g in self._groups:
            if not any(id(layer.param) in owned and layer.param.grad is not None for layer in g.layers):
                continue
            grads = [layer.param.grad if id(layer.param) in owned else None for layer in g.layers]
            a = alignment(g.grad_stack(grads), g.u, g.v, g.reduce)
            g.align_last = a
            g.align = torch.maximum(g.align, a)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = _batch_loss(outputs)
        if loss is not None:
            # Lightning's own copy of the loss, taken before AMP scales it (on_before_backward sees
            # the scaled one: a GradScaler growth or back-off would read as a loss change) and divided
            # by accumulate_grad_batches: the micro-batches of one optimizer step sum to its loss
            value = loss.detach().float()
            value = value.mean() if value.numel() != 1 else value.reshape(())
            self._loss_sum = value if self._loss_sum is None else self._loss_sum.to(value.device) + value
            self._step_loss = True
        step = trainer.global_step - 1  # the optimizer step that just ran
        if step < 0 or step == self._seen_step or not self._groups:
            return  # accumulating gradients: no optimizer step yet
        self._seen_step = step
        if self._step_loss:
            self._loss_count += 1  # optimizer steps in the sum
            self._step_loss = False
        if step % self.every_n_steps == 0:
            self._measure()
        if self.full_every_n_steps is not None:
            self._full_analysis(trainer, step)
        check = (
            is_logging_step(trainer) if self.check_every_n_steps is None else (step + 1) % self.check_every_n_steps == 0
        )
        if check and not self._halted:
            self._last_check_step = step
            self._check(trainer, pl_module, step)
        if self._halt_report is not None:
            report, self._halt_report = self._halt_report, None
            path = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints",
                                f"spectral-halt-step={trainer.global_step}.ckpt")
            self.halt(trainer, report + f" A checkpoint is at {path}.", path, "spectral_halt", {})

    # -- measuring -------------------------------------------------------------------------------
    def _measure(self) -> None:
        moved, self._weights_moved = self._weights_moved, False
        for g in self._groups:
            w = g.stack()
            # one product with W and one with W^T per group: the top pair, and the update's vectors
            # of both generations (the current against the last probes; the next for its probes)
            if g.reduce is None and g.basis.shape[-1] == 1:  # the same products in fewer operator calls
                g.u, g.v, g.sigma, g.residual, w_right, wt_left = tracking_step_rows(
                    w, g.u, g.basis[..., 0], (g.du, g.du_next), (g.dv, g.dv_next), self.power_iters
                )
                g.basis = g.v.unsqueeze(-1)
            else:
                t = tracking_step(
                    w, g.u, g.basis, torch.stack([g.du, g.du_next], dim=-1), torch.stack([g.dv, g.dv_next], dim=-1),
                    self.power_iters, g.reduce,
                )
                g.u, g.v, g.sigma, g.basis, g.residual = t.u, t.v, t.sigma, t.basis, t.residual
                w_right, wt_left = t.w_right.unbind(-1), t.wt_left.unbind(-1)
            du_next, dv_next = g.du_next, g.dv_next
            if g.probes is not None and not moved:
                du_next, dv_next, d_sigma = update_power_step(
                    w_right[0], wt_left[0], *g.probes, g.du_next, g.dv_next, g.reduce
                )
                ratio = d_sigma / g.sigma.clamp_min(1e-12)
                if g.stale:  # (a host set) these matrices' estimates wait a step, as without probes
                    keep = torch.zeros(len(g.layers), dtype=torch.bool)
                    keep[sorted(g.stale)] = True
                    keep = keep.to(g.device, non_blocking=True)
                    du_next = torch.where(keep[:, None], g.du_next, du_next)
                    dv_next = torch.where(keep[:, None], g.dv_next, dv_next)
                    ratio = torch.where(keep, g.ratio, ratio)
                g.ratio = ratio
            g.stale = set()
            g.du, g.dv, g.probes = g.du_next, g.dv_next, (w_right[1], wt_left[1])
            g.du_next, g.dv_next = du_next, dv_next

    def _full_analysis(self, trainer: pl.Trainer, step: int) -> None:
        period = self.full_every_n_steps
        assert period is not None
        layers = list(self._layers.values())
        phase = step % period
        due = [layer for j, layer in enumerate(layers) if j * period // len(layers) == phase]
        if not due:
            return
        metrics: dict[str, float] = {}
        for layer in due:
            g = layer.group
            assert g is not None
            # sharded: this one weight is gathered whole (an all-gather), analysed, and let go
            weight = layer.matrix(full(layer.param.detach()))
            sv, u, v = full_spectrum(weight)
            stats = analyze_spectrum(weight, sv)
            del weight
            layer.full = stats.as_dict()
            g.vector("u", layer.slot).copy_(_own_rows(g, u))
            g.sigma[layer.slot] = sv[0]
            g.reseed(layer.slot, v)  # the exact top pair leads the block
            prefix = f"stability/spectral/{layer.name}"
            for key in ("alpha", "alpha_weighted", "log_norm", "decay", "mp_spikes", "ks"):
                metrics[f"{prefix}/{key}"] = layer.full[key]
            metrics[f"{prefix}/stable_rank_exact"] = layer.full["stable_rank"]
            metrics[f"{prefix}/sigma_max_exact"] = layer.full["sigma_max"]
            _log_histogram(trainer, f"{prefix}/singular_values", sv, step)
        log_to_loggers(trainer, metrics)

    # -- checking --------------------------------------------------------------------------------
    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        stats = self.estimates()  # the check's host copy
        if self._converge(stats):
            stats = self.estimates()
        local_loss = self._interval_loss()
        if trainer.world_size > 1 and all(g.reduce is None for g in self._groups):
            stats, loss = _agree(trainer, stats, local_loss)  # the loss rides in the same all-gather
        elif trainer.world_size > 1:
            loss = _rank_mean(trainer, local_loss)  # row shards: the statistics are global already
        else:
            loss = float(local_loss)
        # From here on every input of a decision is the same on every rank: the (worst) statistics
        # and the loss averaged over the ranks, before and after an intervention alike.
        for g in self._groups:
            g.align.zero_()
        verified = self._verify_intervention(loss)
        if math.isfinite(loss):
            self._last_loss = loss

        acted = detected = False
        for layer in self._layers.values():
            s = stats[layer.name]
            detection = self._detect(layer, s, step)
            detected = detected or detection is not None
            if detection is None:
                layer.warned = False
                if layer.ladder.healthy():
                    self.emit(trainer, "spectral_recovered", "info", {"healthy_checks": float(self.cooldown)}, None,
                              layer.name)
                    self._set_update_clip(layer, False)
                continue
            if detection == "nonfinite_weight":
                # nothing spectral repairs a NaN in the weights: ask for a rollback (the guard stops
                # such a step from being applied; the weights themselves need an older copy)
                responder = self.event_log(trainer).has_responder("rollback")
                self.emit(trainer, detection, "critical", {}, "rollback" if responder else None, layer.name)
                continue
            if detection in _WARN_ONLY:
                if not layer.warned:  # once until a healthy check
                    self.emit(trainer, detection, "warning", _event_metrics(s), None, layer.name)
                layer.warned = True
                continue
            unavailable = set() if self.event_log(trainer).has_responder("rollback") else {"rollback"}
            action = layer.ladder.decide(detection, unavailable)
            acted = self._act(trainer, layer, detection, action, s, step) or acted
        if verified is not None:
            self._request_rollback(trainer, verified)
        if acted and math.isfinite(self._last_loss):
            self._loss_before = self._last_loss
        if detected or is_logging_step(trainer):
            # a detection's statistics reach the logger at its step, whatever log_every_n_steps says
            self._log_metrics(trainer, pl_module, stats)

    def _converge(self, stats: dict[str, dict[str, float]]) -> bool:
        """More power iterations for the groups with an unconverged estimate (a host decision, taken
        only on checks). Returns whether any group was iterated."""
        if self.max_power_iters == 0:
            return False
        iterated = False
        for g in self._groups:
            for part in g.parts:
                layers = g.layers if part is None else [g.layers[b] for b in part[1]]
                if max(stats[layer.name]["residual"] for layer in layers) > self.tol:
                    self._converge_group(g, min(10, self.max_power_iters), self.max_power_iters, [part])
                    iterated = True
        return iterated

    def _converge_group(
        self, g: _Group, chunk: int, max_iters: int, parts: list[tuple[tuple[int, int], list[int]] | None] | None = None
    ) -> None:
        """Power iterations in chunks of ``chunk`` until every residual is under ``tol`` (a host read
        per chunk) or ``max_iters`` are done; in a padded group each shape (of ``parts``, all by
        default) on its own, as in a group of that shape alone."""
        w = g.stack()
        for part in g.parts if parts is None else parts:
            done = 0
            while True:
                residual = g.iterate(w, chunk, part)
                done += chunk
                if done >= max_iters or float(residual.max()) <= self.tol:
                    break

    def _interval_loss(self) -> Tensor:
        """This rank's mean loss per optimizer step since the last check (NaN without one), 0-d."""
        total, count = self._loss_sum, self._loss_count
        self._loss_sum, self._loss_count = None, 0
        if total is None or count == 0:
            device = self._groups[0].device if self._groups else torch.device("cpu")
            return torch.tensor(math.nan, device=device)
        return (total / count).reshape(())

    def _verify_intervention(self, loss: float) -> dict[str, float] | None:
        before, self._loss_before = self._loss_before, None
        return intervention_failed(before, loss, self.loss_tolerance)

    def _detect(self, layer: _Layer, s: dict[str, float], step: int) -> str | None:
        sigma, rank = s["sigma_max"], s["stable_rank"]
        if not (math.isfinite(sigma) and math.isfinite(rank)):
            return "nonfinite_weight"  # armed or not; nothing of it enters the history
        detection: str | None = None
        growth = math.nan
        if math.isfinite(layer.last_sigma) and layer.last_sigma > 0 and sigma > 0 and step > layer.last_check:
            growth = math.log(sigma / layer.last_sigma) / (step - layer.last_check)
            s["growth"] = growth
        # (a window shorter than _MIN_HISTORY arms once it is full)
        armed = step >= self.warmup and len(layer.rank) >= min(_MIN_HISTORY, self.window)
        if armed:
            rb = layer.rank.baseline()
            gz = layer.growth.baseline().zscore(growth, rel_floor=0.0) if math.isfinite(growth) else math.nan
            s["growth_zscore"] = gz
            if math.isfinite(gz) and gz >= self.growth_zscore and growth >= self.min_growth:
                detection = "sigma_growth"
            elif s["alignment_max"] >= self.alignment_threshold and growth > 0:
                detection = "alignment"
            elif math.isfinite(rb.median) and rank < self.rank_collapse * rb.median:
                detection = "rank_collapse"
            elif layer.embedding and self._rise is not None and math.isfinite(rb.median) and rank > self._rise * rb.median:
                detection = "embedding_rank_rise"
        # Growth and stable rank drift legitimately over training: every finite value enters their
        # (robust, median-based) history, which a few anomalies cannot move. The cap's reference is
        # the last healthy sigma_max, so only healthy checks enter that one.
        layer.growth.push(growth)
        layer.rank.push(rank)
        if detection is None:
            layer.sigmas.push(sigma)
        layer.last_sigma, layer.last_check = sigma, step
        return detection

    # -- acting ----------------------------------------------------------------------------------
    def _act(self, trainer: pl.Trainer, layer: _Layer, detection: str, action: str, s: dict[str, float], step: int) -> bool:
        metrics = _event_metrics(s)
        g = layer.group
        assert g is not None
        changed = False
        if action in ("cap", "pss"):
            before = float(g.sigma[layer.slot])
            if action == "cap":
                after = self._cap(layer)
            else:
                after, k = self._pss(layer, s, step)
                metrics["k"] = float(k)
            metrics.update(sigma_before=before, sigma_after=after)
            layer.last_sigma = after
            changed = True
        elif action == "clip_updates":
            self._set_update_clip(layer, True)
            metrics["update_clip"] = self.update_clip
        elif action == "halt" and self._halt_report is None:
            self._halt_report = (
                f"{type(self).__name__} halted training at optimizer step {step}: {detection} in layer "
                f"{layer.name} (sigma_max {s['sigma_max']:.4g}, stable rank {s['stable_rank']:.4g}, "
                f"alignment {s['alignment_max']:.3g})."
            )
        severity = "critical" if action in ("rollback", "halt") else "warning"
        self.emit(trainer, detection, severity, metrics, action if action != "warn" else None, layer.name)
        if action == "warn" and not self._advised and set(self.ladder) <= {"warn"}:
            # observing only: say once per fit which remedy to opt into
            self._advised = True
            self.emit(trainer, "spectral_advice", "info", metrics, None, layer.name)
            rank_zero_warn(f"{type(self).__name__}: {detection} in layer {layer.name} at step {step}. {ADVICE}")
        return changed

    @torch.no_grad()
    def _cap(self, layer: _Layer) -> float:
        g = layer.group
        assert g is not None
        b = layer.slot
        # sharded: the weight is gathered whole on this rare path; each rank writes its rows of the change
        w = layer.matrix(full(layer.param.detach())).float().unsqueeze(0)
        # the cap is exact only with the true top pair: a block of up to 4 vectors, led by the tracked
        # one, converges on it even where the next singular value is close (a rare path)
        m, n = g.sizes[b]
        block = torch.randn(1, n, min(4, m, n), generator=_gen(self.seed, layer.name)).to(w)
        block[..., 0] = g.vector("v", b)
        u, v, sigma, _, _ = subspace_iteration(w, torch.linalg.qr(block).Q, _CAP_ITERS)
        # the reference is the last healthy check's sigma_max: where the layer was before the anomaly
        history = layer.sigmas.values()
        cap = self.cap_factor * float(history[-1]) if len(history) else float(sigma[0])
        delta = spectral_cap_delta(u, v, sigma, cap)[0]
        layer.matrix(local(layer.param.data)).add_(_own_rows(g, delta).to(layer.param.dtype))
        g.vector("u", b).copy_(_own_rows(g, u[0]))
        g.reseed(b, v[0])
        g.sigma[b] = torch.minimum(sigma[0], torch.tensor(cap, device=sigma.device))
        g.drop_probes(b)
        return float(g.sigma[b])

    @torch.no_grad()
    def _pss(self, layer: _Layer, s: dict[str, float], step: int) -> tuple[float, int]:
        g = layer.group
        assert g is not None
        b = layer.slot
        rank = s["stable_rank"]
        k = max(1, min(self.pss_max_k, int(round(rank)) if math.isfinite(rank) else 1))
        gen = _gen(self.seed + step, layer.name)
        # sharded: gathered whole on this rare path (the same seeded projections on every rank)
        delta, new, u, v = pss_delta(layer.matrix(full(layer.param.detach())), k, self.pss_fn, generator=gen)
        layer.matrix(local(layer.param.data)).add_(_own_rows(g, delta).to(layer.param.dtype))
        g.vector("u", b).copy_(_own_rows(g, u))
        g.reseed(b, v)
        g.sigma[b] = new[0]
        g.drop_probes(b)
        return float(new[0]), k

    def _set_update_clip(self, layer: _Layer, on: bool) -> None:
        layer.clip_updates = on
        if not on and layer.clipper is not None:
            layer.clipper.remove()
            layer.clipper = None
        if on and layer.clipper is None:
            for opt in self._optimizer_list:
                if any(p is layer.param for group in opt.param_groups for p in group["params"]):
                    layer.clipper = SpectralUpdateClip(opt, self.update_clip, params=[layer.param])
                    break

    def _request_rollback(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        responder = self.event_log(trainer).has_responder("rollback")
        self.emit(trainer, "intervention_failed", "critical" if responder else "warning", metrics,
                  "rollback" if responder else None)

    def _log_metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: dict[str, dict[str, float]]
    ) -> None:
        # per-layer statistics straight to the loggers; the few counters through Lightning, where the
        # progress bar and other callbacks see them
        log_to_loggers(trainer, {
            f"stability/spectral/{name}/{key}": s[key]
            for name, s in stats.items()
            for key in ("sigma_max", "stable_rank", "update_ratio", "alignment")
        })
        counts = self.event_count_metrics()
        if counts:
            pl_module.log_dict(counts, on_step=True, on_epoch=False, batch_size=1)


def _agree(
    trainer: pl.Trainer, stats: dict[str, dict[str, float]], loss: Tensor
) -> tuple[dict[str, dict[str, float]], float]:
    """Every rank's statistics become the worst rank's, and the loss the mean of the ranks' (NaN if
    any rank's is), so that all take the same decision: one all-gather on a check step. Under DDP each
    rank measures its own replica of the weights; the replicas agree unless one rank's copy was
    corrupted (a NaN written on one rank only), and then its numbers must decide for every rank, or
    that rank alone would ask for a rollback. Each rank's loss is its own data's: judged alone, an
    intervention could fail on one rank and pass on another."""
    names = sorted(stats)
    keys = sorted(stats[names[0]]) if names else []
    device = trainer.strategy.root_device
    # float64 holds the float32 statistics exactly: agreeing replicas keep their values bit for bit
    local_ = torch.tensor([stats[n][k] for n in names for k in keys], dtype=torch.float64, device=device)
    local_ = torch.cat([local_, loss.to(device=device, dtype=torch.float64).reshape(1)])  # (layers * keys + 1,)
    gathered = trainer.strategy.all_gather(local_)  # (world, layers * keys + 1)
    mean_loss = float(gathered[:, -1].mean())
    table = gathered[:, :-1].reshape(gathered.shape[0], len(names), len(keys))  # (world, layers, keys)
    low = torch.tensor([k == "stable_rank" for k in keys], device=device, dtype=torch.bool)
    worst = torch.where(low, table.amin(0), table.amax(0))  # NaN on any rank stays NaN
    return {n: dict(zip(keys, row)) for n, row in zip(names, worst.cpu().tolist())}, mean_loss


def _rank_mean(trainer: pl.Trainer, value: Tensor) -> float:
    """The mean of ``value`` over the ranks (NaN if any rank's is): one all-reduce, on check steps only.
    ``torch.distributed`` directly: Lightning's ``strategy.reduce`` adds a barrier this does not need."""
    t = value.to(device=trainer.strategy.root_device, dtype=torch.float32).reshape(1).clone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        t = t / torch.distributed.get_world_size()
    return float(t[0])


def intervention_failed(before: float | None, after: float, tolerance: float) -> dict[str, float] | None:
    """The metrics of an ``intervention_failed`` detection, or ``None``: the mean loss ``after`` an
    intervention is non-finite or worse than ``before`` it by more than ``tolerance`` (relative).
    ``before`` is ``None`` when no intervention is being judged. Under DDP both must be the same on
    every rank (the rank mean), or one rank would ask for a rollback alone."""
    if before is None:
        return None
    worse = not math.isfinite(after) or (before > 0 and after > before * (1.0 + tolerance))
    return {"loss_before": before, "loss_after": after} if worse else None


def _batch_loss(outputs: Any) -> Tensor | None:
    """The loss of a training batch as ``on_train_batch_end`` receives it: a tensor, or a mapping's
    ``"loss"`` (Lightning's unscaled copy, divided by ``accumulate_grad_batches``); else ``None``."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        loss = outputs.get("loss")
        return loss if isinstance(loss, Tensor) else None
    return None


def _rows(owner: str, name: str, param: Tensor) -> tuple[int, int] | None:
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


def _own_rows(g: _Group, x: Tensor) -> Tensor:
    """This rank's rows (first dim) of a whole left vector or matrix, for a row-sharded group."""
    return x if g.rows is None else x[g.rows[0]:g.rows[1]]


def _merge_shapes(
    by_shape: dict[tuple[int, int, torch.device, tuple[int, int] | None], list[_Layer]], merge: bool
) -> list[tuple[tuple[int, int, torch.device, tuple[int, int] | None], list[_Layer], list[tuple[int, int]]]]:
    """The groups: one per shape, with small unsharded shapes on one device merged (when ``merge``)
    into zero-padded stacks while a stack stays within ``_MERGE_RATIO`` times its real elements and
    ``_MERGE_MAX_ELEMENTS`` in all; the cheapest merge (least padding per real element) first.

    Returns ``((m, n, device, rows), layers, sizes)`` per group, ``sizes`` each layer's own (m, n)."""
    clusters = [[key] for key in by_shape]

    def cost(keys: list[tuple[int, int, torch.device, tuple[int, int] | None]]) -> tuple[int, int]:
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
                fits = padded <= _MERGE_RATIO * real and padded <= _MERGE_MAX_ELEMENTS
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


def _corners(stack: Tensor | None, sizes: list[tuple[int, int]]) -> list[Tensor]:
    """Views of each matrix's own ``(m, n)`` corner of a padded stack (none without one)."""
    return [] if stack is None else [stack[b, :m, :n] for b, (m, n) in enumerate(sizes)]


def _gen(seed: int, name: str) -> torch.Generator:
    # seeded from the layer's name: the same numbers on every rank, whatever the other layers are
    return torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))


def _event_metrics(s: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in ("sigma_max", "stable_rank", "alignment_max", "growth", "growth_zscore", "update_ratio"):
        if key in s:
            out[key] = s[key]
    return out


def _log_histogram(trainer: pl.Trainer, tag: str, values: Tensor, step: int) -> None:
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if type(logger).__name__ != "TensorBoardLogger":
            continue
        writer: Any = getattr(logger, "experiment", None)
        if hasattr(writer, "add_histogram"):
            writer.add_histogram(tag, values.detach().cpu(), global_step=step)


def _patterns(owner: str, name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"{owner}({name}={value!r}): expected a sequence of shell-style patterns (str)")
    return tuple(value)


__all__ = ["ADVICE", "DEFAULT_LADDER", "SPECTRAL_ACTIONS", "SpectralMonitor", "intervention_failed"]
