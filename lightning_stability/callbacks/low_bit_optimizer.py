"""``LowBitOptimizer``: the LightningModule's torch optimizers swapped for bitsandbytes 8-bit ones."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning_utilities.core.imports import RequirementCache
from torch import nn
from typing_extensions import override

from lightning_stability.ops.optim8bit import (
    TORCH_STATE_SLOTS,
    eight_bit_to_torch_state,
    is_8bit_layout,
    torch_state_to_8bit,
)

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
_HEAD_NAMES = ("lm_head", "output", "head", "classifier")
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

    Parameter groups keep their parameters and hyperparameters, and what schedulers keep in them
    (``initial_lr``, ``OneCycleLR``'s ``max_lr``, ...); learning-rate schedulers are rebound to the new
    optimizer, the children of ``SequentialLR`` and ``ChainedScheduler`` included, so schedules continue
    step for step (a scheduler holding the optimizer where it cannot be rebound is refused). Chosen parameters keep 32-bit state through bitsandbytes'
    override manager (``keep_32bit``: ``"embeddings"`` (``nn.Embedding`` weights), ``"head"`` (the output
    head: ``lm_head``, ``output``, ``head``, ``classifier``), ``"norms"``), and bitsandbytes keeps every
    tensor under ``min_8bit_size`` (4096) values in 32-bit itself.

    **Checkpoints** (``portable_checkpoints=True``, the default) hold each swapped optimizer's state as
    its torch optimizer keeps it (float32 moments decoded from 8 bits, torch's group keys), so they
    resume without this callback, and the exact 8-bit state in this callback's entry, from which a run
    with it resumes bit for bit; the checkpoint's optimizer state then takes 10 bytes a parameter instead
    of 2 (``portable_checkpoints=False``: the 8-bit layout only, which needs this callback to resume).
    Targets of another family than the torch optimizer (``optimizer="lion8bit"`` for an AdamW), and
    AdEMAMix, keep the 8-bit layout. Resuming from a checkpoint written without this callback converts
    the plain-torch state (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``) to 8-bit on load. Strategies it cannot serve (DeepSpeed, FSDP, ModelParallel) are refused with a clear error.
    """

    def __init__(self, optimizer: str = "auto", paged: bool = False, keep_32bit: Sequence[str] = KEEP_32BIT,
                 min_8bit_size: int = 4096, portable_checkpoints: bool = True) -> None:
        owner = type(self).__name__
        if optimizer != "auto" and optimizer not in TARGETS:
            raise ValueError(f"{owner}(optimizer={optimizer!r}): expected 'auto' or one of {list(TARGETS)}")
        if isinstance(keep_32bit, str) or any(k not in KEEP_32BIT for k in keep_32bit):
            raise ValueError(f"{owner}(keep_32bit={keep_32bit!r}): expected a sequence drawn from {list(KEEP_32BIT)}")
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"{owner}(min_8bit_size={min_8bit_size!r}): expected an int >= 0")
        if not isinstance(portable_checkpoints, bool):
            raise ValueError(f"{owner}(portable_checkpoints={portable_checkpoints!r}): expected True or False")
        if not _BNB:
            raise ModuleNotFoundError(f"{owner} needs bitsandbytes>=0.45: pip install bitsandbytes. {_BNB.message}")
        self.optimizer, self.paged = optimizer, bool(paged)
        self.keep_32bit, self.min_8bit_size = tuple(keep_32bit), min_8bit_size
        self.swapped: list[tuple[str, str]] = []  # (old class, new class) per optimizer
        self.kept_32bit: list[str] = []  # parameter names with 32-bit state
        self._overridden: list[int] = []  # id() of the parameters registered with the override manager
        self.portable_checkpoints = portable_checkpoints
        # optimizer index -> (its torch groups' keys, the 8-bit optimizer's defaults, family): the ones
        # whose checkpoint state is written in the torch layout
        self._portable: dict[int, tuple[list[dict[str, Any]], set[str], str]] = {}
        self._exact: dict[int, Any] = {}  # the exact 8-bit states read from a checkpoint, until loaded

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

        self.swapped, self._portable = [], {}
        self._register_32bit(bnb, pl_module)
        old_optimizers = list(trainer.strategy.optimizers)
        new_optimizers = [self._swap(bnb, opt, index) for index, opt in enumerate(old_optimizers)]
        swaps = {id(old): new for old, new in zip(old_optimizers, new_optimizers) if new is not old}
        for config in trainer.strategy.lr_scheduler_configs:
            rebind_scheduler(config.scheduler, swaps)
        trainer.strategy.optimizers = new_optimizers
        rank_zero_info(
            "LowBitOptimizer: " + ", ".join(f"{a} -> {b}" for a, b in self.swapped)
            + f"; 32-bit state kept for {len(self.kept_32bit)} parameter tensors."
        )

    def _register_32bit(self, bnb: Any, pl_module: pl.LightningModule) -> None:
        keep: dict[int, str] = {}
        for name, module in pl_module.named_modules():
            if ("embeddings" in self.keep_32bit and isinstance(module, nn.Embedding)) or (
                "norms" in self.keep_32bit and isinstance(module, _NORMS)
            ) or ("head" in self.keep_32bit and name.rsplit(".", 1)[-1] in _HEAD_NAMES):
                for pname, p in module.named_parameters():
                    keep[id(p)] = f"{name}.{pname}"
        manager = bnb.optim.GlobalOptimManager.get_instance()
        self.kept_32bit = sorted(keep.values())
        by_id = {id(p): p for p in pl_module.parameters()}
        for pid in keep:
            # per parameter (keyed by id), before its first step: the optimizer reads it at state init
            manager.override_config(by_id[pid], "optim_bits", 32)
        self._overridden = list(keep)

    def _swap(self, bnb: Any, optimizer: torch.optim.Optimizer, index: int) -> torch.optim.Optimizer:
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
            # what schedulers (and users) keep in a group beside the optimizer's hyperparameters:
            # initial_lr, OneCycleLR's max_lr / min_lr / base_momentum / max_momentum, a group's name, ...
            new_group.update({k: v for k, v in group.items() if k != "params" and k not in optimizer.defaults})
        torch_keys = {k for k in optimizer.defaults if same_family or k not in ("lr", "weight_decay")}
        _load_any_layout(new, family, same_family, torch_keys, functools.partial(self._take_exact, index))
        if same_family and family in TORCH_STATE_SLOTS:
            # checkpoints hold this optimizer's state as the torch optimizer would: resumable without us
            self._portable[index] = ([{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
                                     set(new.defaults), family)
        self.swapped.append((name, cls_name))
        return new

    # -- checkpoints ---------------------------------------------------------------------------------
    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Write each swapped optimizer's state as its torch optimizer keeps it (float32 moments decoded
        from 8 bits, torch's group keys), so the checkpoint resumes without this callback, and keep the
        exact 8-bit state in this callback's entry, from which a run with it resumes bit for bit."""
        states = checkpoint.get("optimizer_states")
        if not self.portable_checkpoints or not self._portable or not isinstance(states, list):
            return
        exact: dict[int, Any] = {}
        for index, (torch_groups, bnb_keys, family) in self._portable.items():
            if index >= len(states):
                continue
            exact[index] = states[index]
            states[index] = _to_torch_layout(states[index], torch_groups, bnb_keys, family)
        checkpoint.setdefault("callbacks", {})[self.state_key] = {"optimizer_states_8bit": exact}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # restored before on_fit_start swaps the optimizers, read when their state is loaded after it
        self._exact = {int(k): v for k, v in dict(state_dict.get("optimizer_states_8bit", {})).items()}

    def _take_exact(self, index: int, torch_state: dict[str, Any]) -> dict[str, Any] | None:
        exact = self._exact.pop(index, None)
        if exact is None:
            return None
        sizes = [len(g["params"]) for g in exact.get("param_groups", ())]
        if sizes != [len(g["params"]) for g in torch_state.get("param_groups", ())]:
            rank_zero_warn(f"LowBitOptimizer: the exact 8-bit state of optimizer {index} in the checkpoint does not "
                           "match its torch state's groups; quantising the torch state instead.")
            return None
        return exact

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self._overridden:
            return
        import bitsandbytes as bnb

        manager = bnb.optim.GlobalOptimManager.get_instance()
        for pid in self._overridden:  # the manager is one per process: leave nothing behind
            manager.pid2config.pop(pid, None)
        self._overridden = []


def rebind_scheduler(scheduler: Any, swaps: dict[int, torch.optim.Optimizer]) -> None:
    """Point ``scheduler`` and every scheduler inside it (``SequentialLR`` and ``ChainedScheduler`` keep
    theirs in ``_schedulers``, a torch internal) at the new optimizers (``swaps``: id of the old one ->
    the new one). ``ReduceLROnPlateau``, ``OneCycleLR``, ``LambdaLR`` and the others hold theirs in
    ``optimizer``. Raises where an old optimizer stays reachable: that scheduler would step nothing."""
    if not swaps:
        return
    for sched in _schedulers_in(scheduler):
        old = getattr(sched, "optimizer", None)
        if old is not None and id(old) in swaps:
            sched.optimizer = swaps[id(old)]
            _mark_step_calls(old, sched.optimizer)
    left = [type(s).__name__ for s in _schedulers_in(scheduler) for v in vars(s).values() if id(v) in swaps]
    if left:
        raise RuntimeError(f"LowBitOptimizer: {type(scheduler).__name__} holds the replaced optimizer where this "
                           f"callback cannot rebind it (in {left}); its schedule would not reach the 8-bit optimizer. "
                           "Build the scheduler on the 8-bit optimizer yourself, or remove LowBitOptimizer.")


def _schedulers_in(scheduler: Any) -> list[Any]:
    out, todo = [], [scheduler]
    while todo:
        sched = todo.pop()
        out.append(sched)
        if isinstance(sched, (torch.optim.lr_scheduler.SequentialLR, torch.optim.lr_scheduler.ChainedScheduler)):
            inner = getattr(sched, "_schedulers", None)
            if not isinstance(inner, (list, tuple)):
                raise RuntimeError(f"LowBitOptimizer: torch's {type(sched).__name__} no longer keeps its schedulers in "
                                   "_schedulers; cannot rebind them to the 8-bit optimizer (their learning rates "
                                   "would stay where they are). Please report the torch version.")
            todo.extend(inner)
    return out


def _mark_step_calls(old: torch.optim.Optimizer, optimizer: torch.optim.Optimizer) -> None:
    """What a torch LR scheduler does to the optimizer it is built on (``LRScheduler.__init__``'s
    ``patch_track_step_called``), for one rebound to it: the optimizer's ``step`` records that it ran in
    ``_opt_called`` and is marked ``_wrapped_by_lr_sched`` (torch internals; the scheduler warns about a
    replaced ``step`` otherwise)."""
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    if not hasattr(old.step, "_wrapped_by_lr_sched"):
        rank_zero_warn("LowBitOptimizer: torch's LR scheduler no longer marks optimizer.step with "
                       "_wrapped_by_lr_sched; the scheduler may warn that optimizer.step was overridden.")
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


def _to_torch_layout(state_dict: dict[str, Any], torch_groups: list[dict[str, Any]], bnb_keys: set[str],
                     family: str) -> dict[str, Any]:
    """An 8-bit optimizer's ``state_dict`` as its torch optimizer's: moments decoded to float32, and per
    group the torch optimizer's keys (their current values where the 8-bit group has them: lr, betas,
    eps, weight_decay) plus what schedulers keep there; bitsandbytes' own keys dropped."""
    groups = []
    for group, torch_group in zip(state_dict["param_groups"], torch_groups):
        out = dict(torch_group)
        out.update({k: v for k, v in group.items() if k in torch_group or k not in bnb_keys})
        groups.append(out)
    state = {k: eight_bit_to_torch_state(v, family) if is_8bit_layout(v) else v for k, v in state_dict["state"].items()}
    return {"state": state, "param_groups": groups}


def _load_any_layout(optimizer: torch.optim.Optimizer, family: str, same_family: bool, torch_keys: set[str],
                     take_exact: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
    """Let ``optimizer.load_state_dict`` take either layout: its own 8-bit one (the exact state this
    callback kept beside a torch-layout checkpoint, or an older checkpoint's), or a plain-torch
    optimizer's, whose moments are quantised to the 8-bit layout (kept in float32 where the
    parameter's state is 32-bit) and whose groups update this optimizer's (``torch_keys``: the torch
    optimizer's hyperparameters that do not carry over, across families)."""
    load = optimizer.load_state_dict

    def load_state_dict(state_dict: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        exact = take_exact(state_dict)
        if exact is not None:
            load(exact, *args, **kwargs)
            return
        if any(is_8bit_layout(s) for s in state_dict.get("state", {}).values()):
            load(state_dict, *args, **kwargs)  # the 8-bit layout: as saved
            return
        groups = []
        for current, saved in zip(optimizer.param_groups, state_dict["param_groups"]):
            carried = {k: v for k, v in saved.items() if k != "params" and (same_family or k not in torch_keys)}
            groups.append({**{k: v for k, v in current.items() if k != "params"}, **carried, "params": saved["params"]})
        load({**state_dict, "param_groups": groups}, *args, **kwargs)
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
