"""``LowBitOptimizer``: the LightningModule's torch optimizers swapped for bitsandbytes 8-bit ones."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning_utilities.core.imports import RequirementCache
from torch import nn
from typing_extensions import override

from lightning_stability.core.modules import output_heads
from lightning_stability.ops.optim8bit import TORCH_STATE_SLOTS, dequantize_state, torch_state_to_8bit

_BNB = RequirementCache("bitsandbytes>=0.45")
# target -> (bitsandbytes class, optimizer family: how its state converts and which torch optimizers it replaces)
TARGETS: dict[str, tuple[str, str]] = {
    "adamw8bit": ("AdamW8bit", "adam"),
    "paged-adamw8bit": ("PagedAdamW8bit", "adam"),
    "adam8bit": ("Adam8bit", "adam"),
    "paged-adam8bit": ("PagedAdam8bit", "adam"),
    "lion8bit": ("Lion8bit", "lion"),
    "paged-lion8bit": ("PagedLion8bit", "lion"),
    "ademamix8bit": ("AdEMAMix8bit", "ademamix"),
    "paged-ademamix8bit": ("PagedAdEMAMix8bit", "ademamix"),
    "sgd8bit": ("SGD8bit", "sgd"),
}
# the torch (or third-party, by class name) optimizer each automatic target replaces
_AUTO = {"AdamW": "adamw8bit", "Adam": "adam8bit", "SGD": "sgd8bit", "Lion": "lion8bit", "AdEMAMix": "ademamix8bit"}
KEEP_32BIT = ("embeddings", "head", "norms")
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.RMSNorm)
_REFUSED_STRATEGIES = {
    "DeepSpeedStrategy": "DeepSpeed builds and shards its own optimizer",
    "FSDPStrategy": "FSDP flattens and shards parameters, which bitsandbytes' per-parameter state does not follow",
    "ModelParallelStrategy": "sharded DTensor parameters are not supported by bitsandbytes' 8-bit optimizers",
}
# hyperparameters that carry over from a torch optimizer's group to a bitsandbytes one
_CARRIED = ("lr", "betas", "eps", "weight_decay", "momentum", "initial_lr")


class LowBitOptimizer(Callback):
    r"""Swaps the LightningModule's torch optimizers for bitsandbytes 8-bit ones at fit start: the
    optimizer state (the moments) takes 8 bits a value instead of 32, in blocks of 256 with their own
    scale.

    ``optimizer="auto"`` replaces each optimizer by its 8-bit equivalent: ``AdamW`` by ``AdamW8bit``,
    ``Adam`` (without weight decay: bitsandbytes' Adam decays the weights decoupled, as AdamW) by
    ``Adam8bit``, ``SGD`` with momentum by ``SGD8bit``, and by class name ``Lion`` and ``AdEMAMix`` by
    ``Lion8bit`` and ``AdEMAMix8bit``; ``paged=True`` takes the paged variants (on CPU bitsandbytes runs
    them unpaged, with a warning). A named target (``"adamw8bit"``, ``"paged-adamw8bit"``,
    ``"lion8bit"``, ``"ademamix8bit"``, ``"sgd8bit"``, ...) replaces every optimizer by that one,
    carrying over the learning rate and weight decay (and betas, eps, momentum within a family).

    Parameter groups keep their parameters and hyperparameters; learning-rate schedulers are rebound to
    the new optimizer, so schedules continue. Chosen parameters keep 32-bit state through bitsandbytes'
    override manager (``keep_32bit``: ``"embeddings"`` (``nn.Embedding`` weights), ``"head"`` (the output
    head: ``lm_head``, ``output``, ``head``, ``classifier``), ``"norms"``), and bitsandbytes keeps every
    tensor under ``min_8bit_size`` (4096) values in 32-bit itself.

    Resuming from a checkpoint written without this callback converts the plain-torch state (``exp_avg``,
    ``exp_avg_sq``, ``momentum_buffer``) to 8-bit on load; one written with it loads as it was saved.
    Strategies it cannot serve (DeepSpeed, FSDP, ModelParallel) are refused with a clear error.
    """

    def __init__(self, optimizer: str = "auto", paged: bool = False, keep_32bit: Sequence[str] = KEEP_32BIT,
                 min_8bit_size: int = 4096) -> None:
        owner = type(self).__name__
        if optimizer != "auto" and optimizer not in TARGETS:
            raise ValueError(f"{owner}(optimizer={optimizer!r}): expected 'auto' or one of {list(TARGETS)}")
        if isinstance(keep_32bit, str) or any(k not in KEEP_32BIT for k in keep_32bit):
            raise ValueError(f"{owner}(keep_32bit={keep_32bit!r}): expected a sequence drawn from {list(KEEP_32BIT)}")
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"{owner}(min_8bit_size={min_8bit_size!r}): expected an int >= 0")
        if not _BNB:
            raise ModuleNotFoundError(f"{owner} needs bitsandbytes>=0.45: pip install bitsandbytes. {_BNB.message}")
        self.optimizer, self.paged = optimizer, bool(paged)
        self.keep_32bit, self.min_8bit_size = tuple(keep_32bit), min_8bit_size
        self.swapped: list[tuple[str, str]] = []  # (old class, new class) per optimizer
        self.kept_32bit: list[str] = []  # parameter names with 32-bit state
        self._overridden: list[int] = []  # id() of the parameters registered with the override manager

    # -- the swap ----------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # by class name, subclasses included: DeepSpeed need not be installed
        refused = next((c.__name__ for c in type(trainer.strategy).__mro__ if c.__name__ in _REFUSED_STRATEGIES), None)
        if refused is not None:
            raise RuntimeError(
                f"LowBitOptimizer cannot serve {type(trainer.strategy).__name__}: {_REFUSED_STRATEGIES[refused]}. "
                "Use DDP or a single device, or remove LowBitOptimizer."
            )
        import bitsandbytes as bnb

        self.swapped = []
        self._register_32bit(bnb, pl_module)
        old_optimizers = list(trainer.strategy.optimizers)
        new_optimizers = [self._swap(bnb, opt) for opt in old_optimizers]
        swapped = {id(old): new for old, new in zip(old_optimizers, new_optimizers) if old is not new}
        for config in trainer.strategy.lr_scheduler_configs:
            _rebind(config.scheduler, swapped)
        trainer.strategy.optimizers = new_optimizers
        self._families = [(_family_of(type(old).__name__) if old is not new else None)
                          for old, new in zip(old_optimizers, new_optimizers)]
        # the plain optimizers' hyperparameters, so that a checkpoint's groups load into them
        self._torch_defaults = [{k: v for k, v in old.defaults.items() if k != "params"} for old in old_optimizers]
        rank_zero_info(
            "LowBitOptimizer: " + ", ".join(f"{a} -> {b}" for a, b in self.swapped)
            + f"; 32-bit state kept for {len(self.kept_32bit)} parameter tensors."
        )

    def _register_32bit(self, bnb: Any, pl_module: pl.LightningModule) -> None:
        keep: dict[int, str] = {}
        heads = set(output_heads(pl_module.named_modules()))  # the one head rule (core.modules)
        for name, module in pl_module.named_modules():
            if ("embeddings" in self.keep_32bit and isinstance(module, nn.Embedding)) or (
                "norms" in self.keep_32bit and isinstance(module, _NORMS)
            ) or ("head" in self.keep_32bit and name in heads):
                for pname, p in module.named_parameters():
                    keep[id(p)] = f"{name}.{pname}"
        manager = bnb.optim.GlobalOptimManager.get_instance()
        self.kept_32bit = sorted(keep.values())
        by_id = {id(p): p for p in pl_module.parameters()}
        for pid in keep:
            # per parameter (keyed by id), before its first step: the optimizer reads it at state init
            manager.override_config(by_id[pid], "optim_bits", 32)
        self._overridden = list(keep)

    def _swap(self, bnb: Any, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        name = type(optimizer).__name__
        if type(optimizer).__module__.startswith("bitsandbytes"):
            return optimizer  # already low-bit
        target = self.optimizer if self.optimizer != "auto" else _AUTO.get(name)
        if target is None:
            raise ValueError(
                f"LowBitOptimizer: no 8-bit equivalent of {name}; supported: {sorted(_AUTO)} (or pass "
                f"optimizer= one of {list(TARGETS)})."
            )
        if self.paged and not target.startswith("paged-") and f"paged-{target}" in TARGETS:
            target = f"paged-{target}"
        cls_name, family = TARGETS[target]
        same_family = _family_of(name) == family
        groups = []
        for group in optimizer.param_groups:
            _check_group(name, group)
            carried = {k: group[k] for k in _CARRIED if k in group and (same_family or k in ("lr", "weight_decay", "initial_lr"))}
            if family == "sgd" and not carried.get("momentum"):
                raise ValueError(f"LowBitOptimizer: SGD8bit needs momentum > 0 (SGD without momentum has no state "
                                 f"to shrink); {name} has momentum={group.get('momentum', 0)!r}.")
            if name == "Adam" and family == "adam" and group.get("weight_decay", 0):
                raise ValueError(
                    f"LowBitOptimizer: torch Adam with weight_decay={group['weight_decay']!r} adds the decay to the "
                    "gradient; bitsandbytes' Adam8bit decays the weights decoupled (as AdamW). Use AdamW in "
                    "configure_optimizers, or weight_decay=0."
                )
            groups.append({"params": group["params"], **carried})
        kwargs: dict[str, Any] = {"min_8bit_size": self.min_8bit_size}
        if family == "sgd":  # SGD8bit's lr has no default, and it checks momentum on its own arguments
            kwargs.update(lr=groups[0]["lr"], momentum=groups[0]["momentum"])
        new = getattr(bnb.optim, cls_name)(groups, **kwargs)
        for new_group, group in zip(new.param_groups, optimizer.param_groups):
            # what schedulers wrote into the groups (initial_lr; OneCycleLR's max_lr, min_lr and
            # momentum bounds; a user's own keys): the keys the optimizer itself does not define
            for key in set(group) - set(optimizer.defaults) - {"params"}:
                new_group.setdefault(key, group[key])
        _convert_on_load(new, family)
        self.swapped.append((name, cls_name))
        return new

    # -- checkpoints that load with or without this callback -------------------------------------
    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # The checkpoint's optimizer states are written in the plain-torch layout (exp_avg, exp_avg_sq,
        # momentum_buffer, dequantised), so that a run without this callback resumes from it; the exact
        # 8-bit states ride beside them and are put back when this callback loads the checkpoint.
        states = checkpoint.get("optimizer_states")
        if not states or not getattr(self, "_families", None):
            return
        exact = {}
        for i, family in enumerate(self._families):
            if family is None or i >= len(states):
                continue
            exact[i] = states[i]
            defaults = self._torch_defaults[i]
            states[i] = {"state": {k: _torch_layout(v, family) for k, v in states[i]["state"].items()},
                         "param_groups": [{**defaults, **g} for g in states[i]["param_groups"]]}
        checkpoint[LOW_BIT_CHECKPOINT_KEY] = exact

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        exact = checkpoint.get(LOW_BIT_CHECKPOINT_KEY)
        if exact and "optimizer_states" in checkpoint:
            for i, state in exact.items():
                checkpoint["optimizer_states"][int(i)] = state

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self._overridden:
            return
        import bitsandbytes as bnb

        manager = bnb.optim.GlobalOptimManager.get_instance()
        for pid in self._overridden:  # the manager is one per process: leave nothing behind
            manager.pid2config.pop(pid, None)
        self._overridden = []


LOW_BIT_CHECKPOINT_KEY = "lightning_stability_low_bit_optimizer_states"
# where bitsandbytes' Optimizer8bit.state_dict nests the quantisation tensors (its
# _FSDP_WRAPPED_QUANT_STATE_KEY; pinned by a test)
BNB_NESTED_STATE = "__bnb_optimizer_quant_state__"
# torch's container schedulers keep their children here (SequentialLR, ChainedScheduler; pinned by a test)
CHILD_SCHEDULERS = "_schedulers"


def _rebind(scheduler: Any, swapped: dict[int, torch.optim.Optimizer]) -> None:
    """Point ``scheduler`` and every scheduler inside it at the swapped optimizers."""
    old = getattr(scheduler, "optimizer", None)
    if old is not None and id(old) in swapped:
        new = swapped[id(old)]
        scheduler.optimizer = new
        _mark_step_calls(new)
    children = getattr(scheduler, CHILD_SCHEDULERS, None)
    if children is None and type(scheduler).__name__ in ("SequentialLR", "ChainedScheduler"):
        raise RuntimeError(
            f"LowBitOptimizer: {type(scheduler).__name__} no longer keeps its schedulers in {CHILD_SCHEDULERS!r} in "
            f"torch {torch.__version__}; they cannot be rebound to the 8-bit optimizer. Please report this."
        )
    for child in children or ():
        _rebind(child, swapped)


def _torch_layout(state: dict[str, Any], family: str) -> dict[str, Any]:
    """One parameter's bitsandbytes state (as its ``state_dict`` writes it: the quantisation tensors
    nested under one key since bitsandbytes 0.47) as the plain-torch optimizer of ``family`` keeps it."""
    state = {**state, **state.get(BNB_NESTED_STATE, {})}
    if "state1" not in state:
        return state
    out: dict[str, Any] = {"step": torch.tensor(float(state.get("step", 0)))}
    for key, slot, _ in TORCH_STATE_SLOTS[family]:
        if f"state{slot}" in state:
            out[key] = dequantize_state(state, slot).clone()
    return out


def _mark_step_calls(optimizer: torch.optim.Optimizer) -> None:
    """What a torch LR scheduler does to the optimizer it is built on, for one rebound to it: the
    optimizer's ``step`` records that it ran (the scheduler warns about a replaced ``step`` otherwise)."""
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    step = optimizer.step

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        optimizer._opt_called = True  # type: ignore[attr-defined]
        return step(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = wrapper  # type: ignore[method-assign]


def _family_of(name: str) -> str | None:
    target = _AUTO.get(name)
    return TARGETS[target][1] if target else None


def _check_group(name: str, group: dict[str, Any]) -> None:
    for flag in ("maximize", "amsgrad", "nesterov"):
        if group.get(flag):
            raise ValueError(f"LowBitOptimizer: {name}({flag}=True) has no bitsandbytes 8-bit equivalent; "
                             f"remove {flag} or LowBitOptimizer.")
    if group.get("dampening", 0):
        raise ValueError(f"LowBitOptimizer: {name}(dampening={group['dampening']!r}) has no bitsandbytes 8-bit "
                         "equivalent (SGD8bit ignores it); use dampening=0.")


def _convert_on_load(optimizer: torch.optim.Optimizer, family: str) -> None:
    """Let ``optimizer.load_state_dict`` take a checkpoint written by the plain-torch optimizer: its
    moments are quantised to the 8-bit layout (or kept in float32 where the parameter's state is 32-bit)."""
    load = optimizer.load_state_dict

    def load_state_dict(state_dict: dict[str, Any]) -> None:
        load(state_dict)
        for gindex, group in enumerate(optimizer.param_groups):
            for pindex, p in enumerate(group["params"]):
                state = optimizer.state.get(p)
                if not state or "state1" in state:
                    continue  # no state yet, or already the 8-bit layout
                # the optimizer's own rule for this parameter (overrides included), as at its state init
                config = optimizer.get_config(gindex, pindex, group)  # type: ignore[attr-defined]
                eight_bit = config["optim_bits"] == 8 and p.numel() >= config["min_8bit_size"]
                optimizer.state[p] = torch_state_to_8bit(state, p, family, eight_bit)

    optimizer.load_state_dict = load_state_dict  # type: ignore[method-assign]
