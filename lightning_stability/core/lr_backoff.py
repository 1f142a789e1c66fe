"""The one owner of per-step learning-rate scaling.

Callbacks never write ``param_groups[i]["lr"]`` themselves. Each registers a *provider* on an
optimizer: a function that answers, for the step about to be taken, one factor per param group (or
``None`` for "no change"). The owner installs one step pre-hook per optimizer that scales every
group's LR by the **smallest** factor any provider asked for, and one post-hook that puts the
scheduler's values back exactly. Two back-offs in the same step (the guard's and the rollback's)
therefore give the stronger of the two, not their product: each was sized to be enough on its own.

The hooks run inside ``optimizer.step``, so schedulers are never fought: they see and set the LR
they own, before and after.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Provider = Callable[[torch.optim.Optimizer], Sequence[float] | None]
_OWNER = "_lightning_stability_lr_owner"


class LRBackoff:
    """The LR scaling of one optimizer (see the module docstring). Get it with :func:`lr_owner`."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.providers: dict[str, Provider] = {}
        self._saved: list[float] | None = None
        self._handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]

    def register(self, key: str, provider: Provider) -> None:
        self.providers[key] = provider

    def unregister(self, key: str) -> None:
        self.providers.pop(key, None)
        if not self.providers:
            self.restore()
            for handle in self._handles:
                handle.remove()
            self.optimizer.__dict__.pop(_OWNER, None)

    def factors(self) -> list[float]:
        """Each group's factor for this step: the smallest any provider asked for (1 where none did)."""
        out = [1.0] * len(self.optimizer.param_groups)
        for key, provider in list(self.providers.items()):
            asked = provider(self.optimizer)
            if asked is None:
                continue
            if len(asked) != len(out):
                raise ValueError(f"LRBackoff: provider {key!r} gave {len(asked)} factors for {len(out)} param groups")
            out = [min(a, b) for a, b in zip(out, asked)]
        return out

    def _pre(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        factors = self.factors()
        if all(f == 1.0 for f in factors):
            return
        self._saved = [group["lr"] for group in optimizer.param_groups]
        for group, factor in zip(optimizer.param_groups, factors):
            group["lr"] = group["lr"] * factor

    def _post(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the scheduler's LRs back (also after an exception inside ``optimizer.step`` skipped the post-hook)."""
        saved, self._saved = self._saved, None
        if saved is not None:
            for group, lr in zip(self.optimizer.param_groups, saved):
                group["lr"] = lr


def lr_owner(optimizer: torch.optim.Optimizer) -> LRBackoff:
    """The optimizer's :class:`LRBackoff`, created (and its hooks installed) on first use."""
    owner = optimizer.__dict__.get(_OWNER)
    if owner is None:
        owner = optimizer.__dict__[_OWNER] = LRBackoff(optimizer)
    return owner
