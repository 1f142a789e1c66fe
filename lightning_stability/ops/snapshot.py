"""Host-memory snapshots of a model and its optimizers, restored in place.

A snapshot copies every tensor of the training state into host buffers: the module's parameters and
buffers, each optimizer's per-parameter state (torch and bitsandbytes alike: whatever tensors
``optimizer.state[p]`` holds, 8-bit codes and block scales included) and hyperparameters, plus the
random-number generators. Restoring copies the buffers back into the *same* tensors, so the
optimizer, DDP's reducer and any hooks keep their references.

The buffers of a slot are allocated once and reused while the state keeps its layout. On CUDA they
are pinned and the copies are issued with ``non_blocking=True`` on the current stream: the host does
not wait for them, and every later kernel on that stream (the next optimizer step included) is
ordered after them, so the snapshot cannot be torn.

Sharded tensors (FSDP2's ``DTensor``s) are copied as their local shards: each rank keeps and restores
its own rows, and nothing is gathered.

No Lightning here: the callback decides when to take and restore; this module only copies.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_stability.ops.optim_state import is_bnb_optimizer
from lightning_stability.ops.sharded import is_dtensor, local


def _unique(tensors: Iterable[Tensor]) -> list[Tensor]:
    # Tied weights and shared tables (bitsandbytes' qmap) appear several times: copy each tensor once.
    seen: set[int] = set()
    out = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def nbytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the tensors (of their local shards, for sharded tensors)."""
    return sum(local(t).numel() * t.element_size() for t in tensors)


def estimate_optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes the optimizer's state holds, or will hold once every parameter has been stepped.

    Optimizers create their state lazily at the first step; before it the size is estimated from the
    optimizer's kind: two moments like the parameters for Adam-family optimizers, one byte per element
    and moment for bitsandbytes 8-bit states (plus a float32 scale per block of 256), one buffer for
    SGD with momentum, and two parameter-sized buffers for anything else.
    """
    total = 0
    args = getattr(optimizer, "args", None)  # bitsandbytes keeps its configuration there
    bits = int(getattr(args, "optim_bits", 32))
    min_8bit = int(getattr(args, "min_8bit_size", 4096))
    is_bnb = is_bnb_optimizer(optimizer)
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state:
                total += nbytes(v for v in state.values() if isinstance(v, Tensor))
                continue
            size = local(p).numel() * p.element_size()  # this rank's rows of a sharded parameter
            if is_bnb and bits == 8 and p.numel() >= min_8bit:
                total += 2 * p.numel() + 2 * 4 * -(-p.numel() // 256)
            elif is_bnb:
                total += 2 * p.numel() * 4
            elif isinstance(optimizer, torch.optim.SGD):
                total += size if group.get("momentum", 0) else 0
            else:
                total += 2 * size
    return total


def available_host_memory() -> int | None:
    """Bytes of host memory this process can still allocate, or ``None`` where that cannot be read.

    The smaller of the kernel's ``MemAvailable`` and what the process's cgroup (a container's memory
    limit) still allows.
    """
    candidates: list[int] = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                candidates.append(int(limit) - int(f.read().strip()))
    except (OSError, ValueError):
        pass
    if not candidates and hasattr(os, "sysconf"):
        with contextlib.suppress(ValueError, OSError):
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return max(0, min(candidates)) if candidates else None


def capture_rng() -> dict[str, Any]:
    """The states of every random-number generator training may draw from."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def module_tensors(module: torch.nn.Module) -> list[Tensor]:
    """The module's parameters and buffers, each once, in a fixed order."""
    return _unique([*module.parameters(), *module.buffers()])


@dataclass
class _OptimizerLayout:
    """Where each optimizer state tensor went in the snapshot, and everything that is not a tensor."""

    refs: list[dict[str, int] | None]  # per parameter (param_groups order): state key -> buffer index; None: no state
    values: list[dict[str, Any]]  # per parameter: the non-tensor entries (e.g. bitsandbytes' int ``step``)
    groups: list[dict[str, Any]]  # per group: hyperparameters (lr, betas, ...) without ``params``


def _host_buffer(t: Tensor) -> Tensor:
    # Pinned memory lets the device-to-host copy run without blocking the host.
    t = local(t)
    return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)


@dataclass
class HostSnapshot:
    """One slot of host buffers holding a copy of the training state; reused from one capture to the next."""

    step: int = -1
    buffers: list[Tensor] = field(default_factory=list)
    n_module: int = 0
    layouts: list[_OptimizerLayout] = field(default_factory=list)
    rng: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return nbytes(self.buffers)

    def bytes_needed(self, module: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> int:
        """Host bytes a capture of the current state would newly allocate in this slot."""
        live, _ = _collect(module, optimizers)
        return 0 if self._fits(live) else nbytes(live)

    def _fits(self, live: Sequence[Tensor]) -> bool:
        return len(live) == len(self.buffers) and all(
            b.shape == local(t).shape and b.dtype == t.dtype for b, t in zip(self.buffers, live)
        )

    @torch.no_grad()
    def capture(
        self,
        step: int,
        module: torch.nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Copy the current state into this slot (allocating buffers only where the layout changed)."""
        live, layouts = _collect(module, optimizers)
        if not self._fits(live):
            self.buffers = []  # free the old slot before allocating the new one
            self.buffers = [_host_buffer(t) for t in live]
        for buf, t in zip(self.buffers, live):
            buf.copy_(local(t.detach()), non_blocking=buf.is_pinned())
        self.n_module = len(module_tensors(module))
        self.layouts = layouts
        self.rng = capture_rng()
        self.extra = copy.deepcopy(extra) if extra is not None else {}
        self.step = step

    @torch.no_grad()
    def restore(self, module: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Write this snapshot back into the live tensors, in place, and reset the generators.

        Optimizer state created after the capture is removed (the optimizer creates it afresh at its next
        step, as it did the first time); entries replaced or removed since are recreated from the copy.
        """
        if self.step < 0:
            raise RuntimeError("HostSnapshot.restore(): this slot holds no snapshot yet")
        live_module = module_tensors(module)
        if len(live_module) != self.n_module or len(optimizers) != len(self.layouts):
            raise ValueError(
                f"HostSnapshot.restore(): the snapshot holds {self.n_module} module tensors and "
                f"{len(self.layouts)} optimizers; the model has {len(live_module)} and the trainer {len(optimizers)}"
            )
        for j, t in enumerate(live_module):
            if local(t).shape != self.buffers[j].shape:  # copy_ would broadcast silently
                raise ValueError(
                    f"HostSnapshot.restore(): module tensor {j} has shape {tuple(local(t).shape)}, the snapshot "
                    f"{tuple(self.buffers[j].shape)}"
                )
        written: dict[int, Tensor] = {}  # buffer index -> the live tensor it was written into
        for j, t in enumerate(live_module):
            local(t).copy_(self.buffers[j], non_blocking=True)
            written[j] = t
        for opt, layout in zip(optimizers, self.layouts):
            params = [p for group in opt.param_groups for p in group["params"]]
            if len(params) != len(layout.refs) or len(opt.param_groups) != len(layout.groups):
                raise ValueError(
                    f"HostSnapshot.restore(): an optimizer had {len(layout.refs)} parameters in "
                    f"{len(layout.groups)} groups at the capture and has {len(params)} in {len(opt.param_groups)} now"
                )
            for group, hyper in zip(opt.param_groups, layout.groups):
                group.update(copy.deepcopy(hyper))
            for p, refs, values in zip(params, layout.refs, layout.values):
                if refs is None:
                    opt.state.pop(p, None)
                    continue
                state = opt.state[p]
                for key in [k for k in state if k not in refs and k not in values]:
                    del state[key]
                for key, j in refs.items():
                    current = state.get(key)
                    if j in written:
                        if current is not written[j]:
                            state[key] = written[j]  # a shared table: point at the one copy
                    elif (
                        isinstance(current, Tensor)
                        and local(current).shape == self.buffers[j].shape
                        and current.dtype == self.buffers[j].dtype
                    ):
                        local(current).copy_(self.buffers[j], non_blocking=True)
                        written[j] = current
                    else:
                        # the entry was replaced or removed since the capture: recreate it
                        state[key] = written[j] = _recreate(self.buffers[j], current, p)
                state.update(copy.deepcopy(values))
        restore_rng(self.rng)


def _recreate(buffer: Tensor, current: Any, param: Tensor) -> Tensor:
    """A fresh state tensor from its snapshot copy, like ``param`` where it was a shard of one."""
    device = current.device if isinstance(current, Tensor) else param.device
    t = buffer.to(local(param).device if is_dtensor(param) else device, copy=True)
    if is_dtensor(param) and t.shape == local(param).shape:
        # the moments of a sharded parameter are sharded like it (the optimizer made them with zeros_like)
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(t, param.device_mesh, param.placements, run_check=False,  # type: ignore[attr-defined]
                                  shape=param.shape, stride=param.stride())
    return t


def _collect(
    module: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]
) -> tuple[list[Tensor], list[_OptimizerLayout]]:
    """The live tensors to copy (each once: tied weights, shared tables) and where each optimizer's went."""
    live = module_tensors(module)
    index = {id(t): j for j, t in enumerate(live)}
    layouts = []
    for opt in optimizers:
        refs: list[dict[str, int] | None] = []
        values: list[dict[str, Any]] = []
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state.get(p)
                if not state:
                    refs.append(None)
                    values.append({})
                    continue
                param_refs = {}
                for key in sorted(state, key=str):
                    value = state[key]
                    if isinstance(value, Tensor):
                        if id(value) not in index:
                            index[id(value)] = len(live)
                            live.append(value)
                        param_refs[key] = index[id(value)]
                refs.append(param_refs)
                values.append(copy.deepcopy({k: v for k, v in state.items() if not isinstance(v, Tensor)}))
        groups = [copy.deepcopy({k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups]
        layouts.append(_OptimizerLayout(refs, values, groups))
    return live, layouts
