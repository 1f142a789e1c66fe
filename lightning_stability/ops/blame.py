"""Which layers carry a gradient spike: each parameter's gradient norm against its own recent norm.

Computed on a detection step only, from norms the step has on the device anyway (the global norm is
made of them): the quiet steps pay nothing but keeping a reference to the last healthy step's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor


class Blamed(NamedTuple):
    """A parameter carrying a spike: its name, its gradient norm now and that norm over its own at the
    last healthy step (``inf`` where that was 0, ``nan`` where there was none)."""

    name: str
    norm: float
    ratio: float


@torch.no_grad()
def rank_layers(now: Tensor, before: Tensor | None, names: Sequence[str], top: int = 3) -> list[Blamed]:
    """The ``top`` parameters whose gradient norms ``now`` moved most against ``before`` (the last
    healthy step's, the same order, or ``None``), largest ratio first; a non-finite norm ranks above
    every finite one (the NaN's own layers first). Without ``before`` (no healthy step yet) they rank
    by norm. One device-to-host copy."""
    if now.numel() != len(names):
        raise ValueError(f"rank_layers: {now.numel()} norms for {len(names)} names")
    if now.numel() == 0 or top < 1:
        return []
    rows = [now.float()]
    if before is not None and before.shape == now.shape:
        rows.append(before.float().to(now.device))
    table = torch.stack(rows).cpu().tolist()  # the one host read
    norms = table[0]
    base = table[1] if len(table) > 1 else None

    def ratio(i: int) -> float:
        if base is None or not math.isfinite(base[i]):
            return math.nan
        if base[i] > 0:
            return norms[i] / base[i]
        return math.inf if norms[i] > 0 else 1.0

    def key(i: int) -> tuple[int, float]:
        if not math.isfinite(norms[i]):
            return (2, 0.0)
        r = ratio(i)
        return (1, r) if base is not None and not math.isnan(r) else (0, norms[i])

    order = sorted(range(len(norms)), key=key, reverse=True)[:top]
    return [Blamed(names[i], norms[i], ratio(i)) for i in order]


def describe(blamed: Sequence[Blamed]) -> list[dict[str, float | str]]:
    """The event's ``details["layers"]``: ``[{"name", "grad_norm", "ratio"}, ...]``."""
    return [{"name": b.name, "grad_norm": b.norm, "ratio": b.ratio} for b in blamed]
