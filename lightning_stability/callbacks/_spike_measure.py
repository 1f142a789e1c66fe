"""The guard's measurement of one optimizer step: the gradient norm, the SPAM screen and the loss,
agreed between the ranks in one collective and read to the host once. No Trainer: it takes the
optimizer, its parameters and gradients, the step's loss and how the ranks are laid out."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_stability.core.agreement import Gather
from lightning_stability.ops.optim_state import moment_family, second_moments, unwrap_optimizer
from lightning_stability.ops.sharded import all_reduce_sum_, local, local_squares, local_sum_of_squares
from lightning_stability.ops.spikes import (
    chunk_by_numel,
    count_element_spikes,
    global_grad_norm,
    grad_norms,
    max_spike_excess,
    scale_grads_,
)

# Element checks run over chunks of at most this many elements, so the temporaries stay bounded (two
# float32 copies of a chunk). On a GPU, large chunks: few kernel launches, and the caching allocator
# hands the temporaries back each step. On a CPU, chunks whose temporaries stay in cache (1 MiB): each
# of the screen's passes then reads the chunk from cache, and no step maps fresh pages for a
# model-sized temporary (python -m benchmarks.floor: the screen of a 4.8 M-parameter model takes
# 2.2 ms in 256 Ki-element chunks, 8.5 ms in one).
CHUNK_NUMEL = 1 << 26
CPU_CHUNK_NUMEL = 1 << 18


def chunk_numel(device: torch.device) -> int:
    """The element check's chunk on ``device``: see ``CHUNK_NUMEL``."""
    return CPU_CHUNK_NUMEL if device.type == "cpu" else CHUNK_NUMEL


@dataclass
class Measured:
    grad_norm: float
    spike_count: float
    checked: int  # elements the SPAM screen looked at
    loss: float | None  # the step's loss, the mean over ranks (still AMP-scaled)
    ranks_disagree: bool  # the ranks' gradient norms differ: a rank's gradients changed after the reduction
    flags: list[float] = field(default_factory=list)  # the riders' flags, agreed (> 0: set on some rank)
    # each parameter's gradient norm, on the device (sharded: this rank's share of its square); the
    # global norm is made of them, so keeping them costs nothing: read only on a detection
    param_norms: Tensor | None = None


class StepMeasure:
    """Measures a step for the guard. ``sharded``: parameters are shards (FSDP, ModelParallel), so
    statistics are sums over ranks; ``gather``: the ranks' all-gather (``None`` in one process)."""

    def __init__(self, theta: float | None, sharded: bool, gather: Gather | None) -> None:
        self.theta = theta
        self.sharded = sharded
        self.gather = gather

    def moments(self, opt: torch.optim.Optimizer, params: list[Tensor]) -> list[Tensor | None]:
        """The second moments of ``params``; sharded, their local shards (the rows of the gradients)."""
        moments = second_moments(opt, params)
        return [None if v is None else local(v) for v in moments] if self.sharded else moments

    def measure(
        self,
        opt: torch.optim.Optimizer,
        params: list[Tensor],
        grads: list[Tensor],
        loss: Tensor | None,
        elements: bool,
        flags: Sequence[Tensor] = (),
    ) -> Measured:
        """The step's statistics on the host, the same on every rank. ``elements``: run the SPAM screen."""
        # sharded: this rank's share of the sum of squares, not a norm (summed over ranks below)
        per = local_squares([p.grad for p in params]) if self.sharded else grad_norms(grads)  # type: ignore[misc]
        norm = per.sum() if self.sharded else torch.linalg.vector_norm(per)
        device = norm.device
        # Fast path: the largest g^2 - theta v over all elements (three foreach passes). Only where it
        # is positive can an element spike; then the exact count follows (count_spikes).
        excesses: list[Tensor] = []
        checked = 0
        if elements:
            for chunk in chunk_by_numel(grads, chunk_numel(device)):
                moments = self.moments(opt, [params[i] for i in chunk])
                excesses.append(max_spike_excess([grads[i] for i in chunk], moments, self.theta))  # type: ignore[arg-type]
                checked += sum(grads[i].numel() for i, v in zip(chunk, moments) if v is not None)
        excess = excesses[0] if len(excesses) == 1 else torch.stack(excesses).max() if excesses else None
        zero = torch.zeros((), device=device)
        agreed: list[float] = []
        if self.sharded:
            # Sharded gradients: one all-reduce of four sums per step, the same numbers on every
            # rank. Each rank holds different rows, so the norm is the root of the summed squares
            # (not a maximum of per-rank norms) and the ranks cannot disagree on it; a NaN on any rank
            # makes the sum NaN. Only the sign of the element excess matters (it gates the count).
            sums = torch.stack([
                norm,
                (excess.to(device) > 0).float() if excess is not None else zero,
                loss.to(device) if loss is not None else zero,
                zero + (1.0 if loss is not None else 0.0),
                *flags,  # the riders' 0/1 flags: a sum above zero is a flag set on some rank
            ])
            sum_sq, max_excess, loss_sum, loss_count, *agreed = all_reduce_sum_(sums).tolist()
            grad_norm = min_norm = math.sqrt(sum_sq) if sum_sq >= 0 else math.nan
        elif self.gather is not None:
            # The guard's only collective: one all-gather of four numbers, so every rank computes the
            # same statistics from the same inputs and takes the same decision. After DDP's all-reduce
            # the gradients agree; the loss does not, and a NaN loss on any one rank must make every
            # rank skip. A gradient norm that differs between ranks means a rank's gradients were
            # corrupted after the reduction: then only skipping keeps replicas equal.
            mine = torch.stack([
                norm,
                excess.to(device) if excess is not None else zero - math.inf,
                loss.to(device) if loss is not None else zero,
                zero + (1.0 if loss is not None else 0.0),
                *flags,  # the riders' 0/1 flags, set where set on any rank
            ])
            gathered = self.gather(mine).reshape(-1, mine.numel())
            grad_norm, max_excess, loss_sum, loss_count, min_norm, *agreed = torch.cat([
                torch.stack([
                    gathered[:, 0].max(),  # max propagates NaN
                    gathered[:, 1].max(),
                    gathered[:, 2].sum(),
                    gathered[:, 3].sum(),
                    gathered[:, 0].min(),
                ]),
                gathered[:, 4:].amax(dim=0),
            ]).tolist()
        else:
            # One device-to-host transfer per step: the decision needs these scalars on the host, and
            # the riders' flags come with them (the rollback's non-finite loss: no read of its own).
            # (A placeholder fills the slots that are absent; the host knows which they are.)
            values = torch.stack([norm, norm if excess is None else excess, norm if loss is None else loss,
                                  *flags]).tolist()
            agreed = values[3:]
            grad_norm = min_norm = values[0]
            max_excess = values[1] if excess is not None else -math.inf
            loss_sum, loss_count = (values[2], 1.0) if loss is not None else (0.0, 0.0)
        return Measured(
            grad_norm=grad_norm,
            spike_count=self.count_spikes(opt, params, grads) if max_excess > 0 else 0.0,
            checked=checked,
            loss=loss_sum / loss_count if loss_count > 0 else None,
            ranks_disagree=grad_norm != min_norm and math.isfinite(grad_norm),
            flags=agreed,
            param_norms=per,
        )

    def whole_norms(self, param_norms: Tensor) -> Tensor:
        """Each parameter's whole gradient norm from :attr:`Measured.param_norms`, the same on every
        rank: sharded, one all-reduce of the shards' squares; replicated (DDP), one all-gather and the
        worst rank's norm, as for the global norm (a rank whose gradients were corrupted after the
        reduction shows where). Called on a detection step, which every rank shares."""
        if self.sharded:
            return all_reduce_sum_(param_norms.clone()).sqrt()
        if self.gather is not None:
            return self.gather(param_norms).reshape(-1, *param_norms.shape).amax(0)
        return param_norms

    def count_spikes(self, opt: torch.optim.Optimizer, params: list[Tensor], grads: list[Tensor]) -> float:
        """Exact SPAM spike count (elements with no history excluded), on steps that may have spikes."""
        count = torch.zeros((), device=grads[0].device)
        for chunk in chunk_by_numel(grads, chunk_numel(grads[0].device)):
            n, _ = count_element_spikes(
                [grads[i] for i in chunk], self.moments(opt, [params[i] for i in chunk]), self.theta  # type: ignore[arg-type]
            )
            count = count + n
        if self.sharded:
            count = all_reduce_sum_(count.float())  # each rank counted its own rows
        elif self.gather is not None:
            # a second small collective, only on such steps: every rank must use the same count
            count = self.gather(count.float().reshape(1)).max()
        return float(count)

    def rescale_norm(self, params: list[Tensor], grads: list[Tensor], target: float) -> None:
        """Scale the gradients so their global norm is at most ``target`` (the baseline median); sharded,
        one more all-reduce, on this step only, and every rank scales by the same factor."""
        norm = (
            all_reduce_sum_(local_sum_of_squares([p.grad for p in params])).sqrt()  # type: ignore[misc]
            if self.sharded else global_grad_norm(grads)
        )
        factor = torch.clamp(target / norm.clamp_min(1e-12), max=1.0)
        scale_grads_(grads, factor.to(grads[0].device))


# -- fp16 AMP: what the loss scaler found --------------------------------------------------------------
# torch.amp.GradScaler's private per-optimizer table, as unscale_ fills it (pinned by a test)
SCALER_STATES = "_per_optimizer_states"
SCALER_FOUND_INF = "found_inf_per_device"
_warned_scaler: list[bool] = []


def scaler_found_inf(scaler: Any, opt: torch.optim.Optimizer) -> bool:
    """Has the AMP loss ``scaler`` found an inf for this optimizer, so that it will skip the step itself?

    It decides in ``unscale_``, before ``on_before_optimizer_step``: a NaN that appears later, or a
    finite gradient whose norm overflows float32, is not seen by it and must be handled by the guard.
    """
    # torch keeps what unscale_ found in a private table; if it moves, say so, and assume the scaler
    # saw the overflow (it sees every gradient; the loss is finite): never read an ordinary fp16
    # overflow as a non-finite detection that climbs the ladder.
    states = getattr(scaler, SCALER_STATES, None)
    if not isinstance(states, dict):
        _warn_scaler_moved(scaler)
        return True
    found = states.get(id(opt), {}).get(SCALER_FOUND_INF)
    if not isinstance(found, dict):
        _warn_scaler_moved(scaler)
        return True
    return any(float(t.sum()) > 0 for t in found.values())


def _warn_scaler_moved(scaler: Any) -> None:
    if not _warned_scaler:
        _warned_scaler.append(True)
        rank_zero_warn(
            f"GradientSpikeGuard: {type(scaler).__name__}.{SCALER_STATES}[id(optimizer)][{SCALER_FOUND_INF!r}] "
            f"is not where torch {torch.__version__} used to keep it; non-finite gradients with a finite loss are "
            "taken for fp16 overflows the loss scaler skips (an amp_overflow event). Please report this."
        )


def warn_norm_only(owner: str, optimizers: list[Any], warned: set[str]) -> None:
    """Once per optimizer class: one that keeps no second moment the guard can read has no per-element
    (SPAM) detection; its norm and loss detection stay on."""
    for optimizer in optimizers:
        opt = unwrap_optimizer(optimizer)
        name = type(opt).__name__
        if moment_family(opt) is None and name not in warned:
            warned.add(name)
            rank_zero_warn(f"{owner}: {name} keeps no second moment this guard can read; "
                           "per-element (SPAM) spike detection is off for it, norm and loss detection stay on.")
