"""The spectral tracker: every tracked weight's top singular pair, stable rank, update spectral norm
and gradient alignment, kept on the device between steps. Pure torch, no Lightning; checkpointable
at each weight's own size.

A measured step is one product with ``W`` and one with ``W^T`` per group of weights
(:class:`~lightning_stability.ops.spectral_stack.SpectralGroup`): the warm-started power (or block
power) iteration, and as extra columns of the same products the probes of the update's power
iteration. Nothing is read to the host but in :meth:`SpectralTracker.estimates` and the
convergence loop that follows it on a check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_stability.ops.sharded import all_reduce_sum_, local
from lightning_stability.ops.spectral import (
    WeightMatrix,
    alignment,
    init_vectors,
    normalize_rows,
    tracking_step,
    tracking_step_rows,
    update_power_step,
)
from lightning_stability.ops.spectral_stack import (
    LEFT,
    VECTORS,
    GroupKey,
    SpectralGroup,
    TrackedLayer,
    layer_generator,
    merge_shapes,
    sharded_rows,
)

# Fresh vectors are iterated until converged, at most this many times (once, when training starts):
# a square random-init matrix has almost no spectral gap and may need a hundred iterations.
MAX_INIT_ITERS = 300
ESTIMATES = ("sigma_max", "stable_rank", "update_ratio", "alignment", "alignment_max", "residual")
Part = tuple[tuple[int, int], list[int]] | None


def check_layout(owner: str, strategy: str, block: int) -> None:
    """Refuse the weight layouts the tracker cannot measure, naming the way out: FSDP1's flat shards
    (no rows of a matrix), and a block of several vectors on row shards (a distributed QR)."""
    if "FSDP" in strategy:
        raise NotImplementedError(
            f"{owner} cannot measure weights under {strategy}: FSDP1 flattens every module's weights into one "
            "1-D shard per rank, whose rows are not a matrix's. Use ModelParallelStrategy (FSDP2, fully_shard in "
            "configure_model), whose row-sharded weights it measures without gathering them, or DDP."
        )
    if "ModelParallel" in strategy and block != 1:
        raise ValueError(
            f"{owner}(block={block}): under {strategy} the weights are sharded by rows and block power "
            "iteration would need a distributed QR of each block; expected block=1"
        )


class SpectralTracker:
    """The power-iteration state of a model's weight matrices (see the module docstring).

    ``block`` vectors per weight (1: plain power iteration), ``power_iters`` iterations a measured
    step, ``tol`` the residual under which an estimate counts as converged, ``max_power_iters`` the
    most a check adds to an unconverged one, ``seed`` the starting vectors' (drawn per layer from its
    name, so every rank starts alike).
    """

    def __init__(self, block: int = 1, power_iters: int = 1, tol: float = 1e-2, max_power_iters: int = 20,
                 seed: int = 0) -> None:
        self.block, self.power_iters, self.tol, self.max_power_iters = block, power_iters, tol, max_power_iters
        self.seed = seed
        self.layers: dict[str, TrackedLayer] = {}
        self.groups: list[SpectralGroup] = []

    @property
    def sharded(self) -> bool:
        """Whether any group holds row shards (FSDP2): its statistics are global already."""
        return any(g.rows is not None for g in self.groups)

    # -- building -----------------------------------------------------------------------------------
    def build(self, weights: Sequence[WeightMatrix], init_iters: int, owner: str = "SpectralTracker") -> None:
        """Group ``weights`` into stacks and converge fresh vectors on each (``init_iters`` a chunk)."""
        by_shape: dict[GroupKey, list[TrackedLayer]] = {}
        for name, param, transposed, embedding in weights:
            rows = sharded_rows(owner, name, param)
            # row-sharded (FSDP2): the shards hold rows of the stored (in, out) matrix, so a Conv1D is
            # measured as stored (the same singular values; u and v trade places)
            layer = TrackedLayer(name, param, embedding, transposed and rows is None)
            self.layers[name] = layer
            m, n = layer.matrix(local(param)).shape
            by_shape.setdefault((m, n, local(param).device, rows), []).append(layer)
        for (m, n, device, rows), layers, sizes in merge_shapes(by_shape, self.block == 1):
            r = min(self.block, m, n) if rows is None else 1
            group = SpectralGroup(layers, m, n, r, device, rows, sizes)
            for b, layer in enumerate(layers):
                layer.group, layer.slot = group, b
                # one generator per layer, seeded from its name: the same vectors on every rank and
                # whatever the other layers are (padded entries stay zero)
                gen = layer_generator(self.seed, layer.name)
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
            self.converge_group(group, init_iters, max_iters=MAX_INIT_ITERS)
            self.groups.append(group)

    # -- measuring ----------------------------------------------------------------------------------
    def observe_gradients(self, owned: set[int]) -> None:
        """The alignment of each gradient (of the parameters ``owned`` by the stepping optimizer) with
        its weight's top pair: the step's, and the largest since the last :meth:`reset_alignment`."""
        for g in self.groups:
            if not any(id(layer.param) in owned and layer.param.grad is not None for layer in g.layers):
                continue
            grads = [layer.param.grad if id(layer.param) in owned else None for layer in g.layers]
            a = alignment(g.grad_stack(grads), g.u, g.v, g.reduce)
            g.align_last = a
            g.align = torch.maximum(g.align, a)

    def reset_alignment(self) -> None:
        for g in self.groups:
            g.align.zero_()

    def measure(self, moved: bool = False) -> None:
        """One measured step on every group; ``moved``: someone else changed the weights since the last
        one (a rollback), so the update estimate restarts instead of measuring that change."""
        for g in self.groups:
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

    def estimates(self) -> dict[str, dict[str, float]]:
        """The latest per-layer statistics on the host, in one copy (``ESTIMATES``: ``alignment`` is
        the last step's, ``alignment_max`` the largest since the last reset, ``residual`` the power
        iteration's)."""
        if not self.groups:
            return {}
        device = self.groups[0].device
        rows = torch.cat(
            [torch.stack([g.sigma, g.stable_rank(), g.ratio, g.align_last, g.align, g.residual]).to(device)
             for g in self.groups],
            dim=1,
        ).cpu().tolist()  # (6, layers)
        layers = [layer for g in self.groups for layer in g.layers]
        return {layer.name: {k: row[i] for k, row in zip(ESTIMATES, rows)} for i, layer in enumerate(layers)}

    def converge(self, stats: dict[str, dict[str, float]]) -> bool:
        """More power iterations for the groups with an unconverged estimate in ``stats`` (a host
        decision, taken only on checks). Returns whether any group was iterated."""
        if self.max_power_iters == 0:
            return False
        iterated = False
        for g in self.groups:
            for part in g.parts:
                layers = g.layers if part is None else [g.layers[b] for b in part[1]]
                if max(stats[layer.name]["residual"] for layer in layers) > self.tol:
                    self.converge_group(g, min(10, self.max_power_iters), self.max_power_iters, [part])
                    iterated = True
        return iterated

    def converge_group(self, g: SpectralGroup, chunk: int, max_iters: int, parts: list[Part] | None = None) -> None:
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

    def set_exact(self, layer: TrackedLayer, sigma: Tensor, u: Tensor, v: Tensor) -> None:
        """Put an exact top pair (of the whole matrix) in the layer's state: it leads the block."""
        g = layer.group
        assert g is not None
        g.vector("u", layer.slot).copy_(g.own_rows(u))
        g.sigma[layer.slot] = sigma
        g.reseed(layer.slot, v)

    # -- state ------------------------------------------------------------------------------------------
    def layer_state(self, name: str) -> dict[str, Any]:
        """The layer's vectors (and probes) on the host, each at the layer's own size."""
        layer = self.layers[name]
        g = layer.group
        state: dict[str, Any] = {}
        if g is None:
            return state
        for key in VECTORS:
            state[key] = g.vector(key, layer.slot).detach().cpu().clone()
        if g.probes is not None and layer.slot not in g.stale:
            m, n = g.sizes[layer.slot]
            state["probes"] = [g.probes[0][layer.slot, :m].detach().cpu().clone(),
                               g.probes[1][layer.slot, :n].detach().cpu().clone()]
        return state

    def load_layer_state(self, name: str, state: dict[str, Any]) -> None:
        """Load what :meth:`layer_state` saved; the probes wait for :meth:`restore_probes`."""
        layer = self.layers[name]
        layer.loaded_probes = state.get("probes")
        g = layer.group
        if g is None:
            return
        for key in VECTORS:
            value = state.get(key)
            if key in LEFT and isinstance(value, Tensor):
                value = layer.own_rows(value)
            target = g.vector(key, layer.slot)
            if isinstance(value, Tensor) and value.shape == target.shape:
                target.copy_(value)
        g.clear_padding(layer.slot)

    def restore_probes(self) -> None:
        """After loading: the update estimate goes on where every layer of a group brought its probes
        back (at this rank's sizes: a checkpoint from another layout or sharding has others)."""
        for g in self.groups:
            loaded = [layer.loaded_probes for layer in g.layers]
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

    def whole_left_vectors(self, layers: dict[str, Any], device: torch.device) -> None:
        """Under row sharding each rank holds only its rows of a weight's left vectors, and a
        checkpoint's callback state is rank zero's: put every left vector of ``layers`` (saved states)
        in it whole (one all-reduce of them all, on every rank as the save is), so that each rank
        resumes with its own rows."""
        slots: list[tuple[dict[str, Any], str | int, int, int, int]] = []  # (where, key, start, stop, rows)
        for g in self.groups:
            if g.rows is None:
                continue
            for layer in g.layers:
                state = layers.get(layer.name)
                if state is None:
                    continue
                rows = layer.param.shape[0]
                slots += [(state, key, *g.rows, rows) for key in sorted(LEFT) if isinstance(state.get(key), Tensor)]
                probes = state.get("probes")
                if isinstance(probes, list) and len(probes) == 2:
                    slots.append((probes, 0, *g.rows, rows))  # type: ignore[arg-type]
        if not slots:
            return
        offsets = [0]
        for *_, rows in slots:
            offsets.append(offsets[-1] + rows)
        whole = torch.zeros(offsets[-1], device=device)
        for (where, key, start, stop, _), offset in zip(slots, offsets):
            whole[offset + start:offset + stop] = where[key].to(whole.device)  # type: ignore[index]
        whole = all_reduce_sum_(whole).cpu()  # each rank wrote only its own rows
        for (where, key, *_), offset, end in zip(slots, offsets, offsets[1:]):
            where[key] = whole[offset:end].clone()  # type: ignore[index]
