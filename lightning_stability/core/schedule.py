"""When to measure: a cadence of its own, independent of ``log_every_n_steps``.

Changing how often metrics are written must never change what is detected, so detection is
scheduled here and the logging path only decides what reaches the loggers.
"""

from __future__ import annotations


class Schedule:
    """Measure every ``every_n`` steps (from step 0), and every step while ``active`` (an open
    incident that needs watching).

    >>> Schedule(50).due(100), Schedule(50).due(101), Schedule(50).due(101, active=True)
    (True, False, True)
    """

    def __init__(self, every_n: int, offset: int = 0) -> None:
        if every_n < 1:
            raise ValueError(f"Schedule(every_n={every_n!r}): expected an int >= 1")
        self.every_n = every_n
        self.offset = offset

    def due(self, step: int, active: bool = False) -> bool:
        return active or (step - self.offset) % self.every_n == 0


class RoundRobin:
    """``per_step`` of ``n`` items a step, in turn: each item comes back every ``ceil(n / per_step)``
    steps. :meth:`take` answers the indices for one step."""

    def __init__(self, n: int, per_step: int) -> None:
        self.n = max(n, 0)
        self.per_step = max(1, min(per_step, self.n)) if self.n else 0
        self.cursor = 0

    def take(self) -> list[int]:
        if not self.n:
            return []
        out = [(self.cursor + i) % self.n for i in range(self.per_step)]
        self.cursor = (self.cursor + self.per_step) % self.n
        return out

    def state_dict(self) -> dict[str, int]:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.cursor = int(state.get("cursor", 0)) % self.n if self.n else 0
