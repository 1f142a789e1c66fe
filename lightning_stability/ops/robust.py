"""Robust rolling statistics: a baseline that spikes and non-finite values cannot poison.

OLMo-core's skip-step rule (mean + 6 std over 128 steps) lets every value into its window, so a single
NaN makes every later comparison false until it leaves the window, and a spike inflates the std so the
next spike passes unseen. Here the median and the median absolute deviation (MAD) of a window of
*accepted* values give the baseline; the caller decides what is accepted (finite values that were not
flagged), so a spike never enters it.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Consistency constant: 1.4826 * MAD estimates the standard deviation of a normal distribution.
MAD_TO_STD = 1.4826


def median_mad(values: torch.Tensor | Sequence[float]) -> tuple[float, float]:
    """Median and MAD of the finite entries; ``(nan, nan)`` if there are none.

    Runs on the host in float64 (the windows hold at most a few hundred values: sorting them in
    Python is faster than launching tensor kernels).
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().reshape(-1).to(torch.float64).tolist()
    x = sorted(v for v in values if math.isfinite(v))
    if not x:
        return math.nan, math.nan
    med = _sorted_median(x)
    return med, _sorted_median(sorted(abs(v - med) for v in x))


def _sorted_median(x: list[float]) -> float:
    n = len(x)
    mid = n // 2
    return x[mid] if n % 2 else 0.5 * (x[mid - 1] + x[mid])


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

    def threshold(self, zscore: float, ratio: float, rel_floor: float = 1e-2) -> float:
        """The smallest value with both ``zscore(value) >= zscore`` and ``ratio(value) >= ratio``: where a
        spike begins under both rules (``nan`` before the window has a median)."""
        if not math.isfinite(self.median) or not math.isfinite(self.mad):
            return math.nan
        scale = max(MAD_TO_STD * self.mad, rel_floor * abs(self.median), 1e-12)
        return max(self.median + zscore * scale, ratio * self.median)

    def ratio(self, value: float) -> float:
        """``value / median``; ``inf`` for a non-finite value, ``nan`` where the median is not positive."""
        if not math.isfinite(value):
            return math.inf
        if not math.isfinite(self.median) or self.median <= 0:
            return math.nan
        return value / self.median


class RollingWindow:
    """The last ``capacity`` accepted values, kept on the host as Python floats.

    Non-finite values are refused (``push`` returns ``False``) so they can never enter the baseline.
    The baseline is computed once per push, not once per query, from a sorted copy of the window kept
    up to date on every push (an insertion and a removal, instead of a sort every step).
    """

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 2:
            raise ValueError(f"RollingWindow(capacity={capacity!r}): expected an int >= 2")
        self.capacity = capacity
        self._values: deque[float] = deque(maxlen=capacity)
        self._sorted: list[float] = []  # the same values, in order
        self._baseline: Baseline | None = None

    def __len__(self) -> int:
        return len(self._values)

    def push(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        value = float(value)
        if len(self._values) == self.capacity:
            del self._sorted[bisect_left(self._sorted, self._values[0])]  # the value about to leave
        self._values.append(value)
        insort(self._sorted, value)
        self._baseline = None
        return True

    def values(self) -> torch.Tensor:
        """The accepted values, oldest first."""
        return torch.tensor(list(self._values), dtype=torch.float64)

    def baseline(self) -> Baseline:
        if self._baseline is None:
            x = self._sorted
            if not x:
                self._baseline = Baseline(math.nan, math.nan, 0)
            else:
                med = _sorted_median(x)
                # the deviations of a sorted list are two sorted runs: Python's sort merges them in one pass
                self._baseline = Baseline(med, _sorted_median(sorted([abs(v - med) for v in x])), len(x))
        return self._baseline

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "values": list(self._values)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._values.clear()
        self._sorted.clear()
        self._baseline = None
        for v in list(state.get("values", []))[-self.capacity :]:
            self.push(float(v))
