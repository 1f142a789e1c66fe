"""Robust rolling statistics: a baseline that spikes and non-finite values cannot poison.

OLMo-core's skip-step rule (mean + 6 std over 128 steps) lets every value into its window, so a single
NaN makes every later comparison false until it leaves the window, and a spike inflates the std so the
next spike passes unseen. Here the median and the median absolute deviation (MAD) of a window of
*accepted* values give the baseline; the caller decides what is accepted (finite values that were not
flagged), so a spike never enters it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

# Consistency constant: 1.4826 * MAD estimates the standard deviation of a normal distribution.
MAD_TO_STD = 1.4826


@torch.no_grad()
def median_mad(values: torch.Tensor) -> tuple[float, float]:
    """Median and MAD of the finite entries of a 1-D tensor; ``(nan, nan)`` if there are none."""
    x = values.detach().reshape(-1).to(torch.float64)
    x = x[torch.isfinite(x)]
    if x.numel() == 0:
        return math.nan, math.nan
    med = torch.quantile(x, 0.5)
    mad = torch.quantile((x - med).abs(), 0.5)
    return float(med), float(mad)


def robust_zscore(value: float, median: float, mad: float, rel_floor: float = 1e-2) -> float:
    """``(value - median) / scale`` with ``scale = max(1.4826 * MAD, rel_floor * |median|, tiny)``.

    The floor keeps a near-constant baseline (MAD 0) from turning tiny wiggles into huge scores.
    Non-finite inputs give ``inf`` for a non-finite value and ``nan`` for a missing baseline.
    """
    if not math.isfinite(median) or not math.isfinite(mad):
        return math.nan
    if math.isnan(value):
        return math.inf
    if math.isinf(value):
        return value
    scale = max(MAD_TO_STD * mad, rel_floor * abs(median), 1e-12)
    return (value - median) / scale


@dataclass(frozen=True)
class Baseline:
    """A snapshot of a window's robust statistics."""

    median: float
    mad: float
    count: int

    def zscore(self, value: float, rel_floor: float = 1e-2) -> float:
        return robust_zscore(value, self.median, self.mad, rel_floor)

    def ratio(self, value: float) -> float:
        """``value / median``; ``inf`` for a non-finite value, ``nan`` where the median is not positive."""
        if not math.isfinite(value):
            return math.inf
        if not math.isfinite(self.median) or self.median <= 0:
            return math.nan
        return value / self.median


class RollingWindow:
    """The last ``capacity`` accepted values, kept on the host in float64.

    Non-finite values are refused (``push`` returns ``False``) so they can never enter the baseline.
    """

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 2:
            raise ValueError(f"RollingWindow(capacity={capacity!r}): expected an int >= 2")
        self.capacity = capacity
        self._buf = torch.zeros(capacity, dtype=torch.float64)
        self._next = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def push(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        self._buf[self._next] = value
        self._next = (self._next + 1) % self.capacity
        self._count = min(self._count + 1, self.capacity)
        return True

    def values(self) -> torch.Tensor:
        """The accepted values, oldest first."""
        if self._count < self.capacity:
            return self._buf[: self._count].clone()
        return torch.cat([self._buf[self._next :], self._buf[: self._next]])

    def baseline(self) -> Baseline:
        med, mad = median_mad(self._buf[: self._count])
        return Baseline(med, mad, self._count)

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "values": self.values().tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        values = list(state.get("values", []))[-self.capacity :]
        self._buf.zero_()
        self._next = 0
        self._count = 0
        for v in values:
            self.push(float(v))
