"""The rollback budget and history: at most ``max_rollbacks`` rollbacks (requests with nothing to
restore included) within ``budget_window`` steps; one more halts, with a report of them all."""

from __future__ import annotations

from typing import Any

from lightning_stability.core.escalation import Budget


class RollbackHistory:
    """Every rollback of the fit and every request that found nothing to restore."""

    def __init__(self, max_rollbacks: int, budget_window: int) -> None:
        self.max_rollbacks = max_rollbacks
        self.budget_window = budget_window
        self.rollbacks: list[dict[str, Any]] = []
        self.unavailable: list[int] = []  # steps where a rollback was asked for with nothing to restore

    def budget(self) -> Budget:
        """The rollback budget as the shared :class:`Budget`, its uses the requests recorded so far."""
        budget = Budget(self.max_rollbacks, self.budget_window)
        budget.uses = sorted([int(r["step"]) for r in self.rollbacks] + self.unavailable)
        return budget

    def requests_in_window(self, step: int) -> int:
        """The requests (this one at ``step`` included) within the budget window ending at ``step``."""
        return self.budget().used(step) + 1

    def over_budget(self, step: int) -> bool:
        return not self.budget().spend(step)

    def record(self, step: int, restored: int, reason: str, quarantined: int, seconds: float) -> dict[str, float]:
        """Record a rollback at ``step`` to the snapshot of step ``restored``; its event's metrics."""
        self.rollbacks.append({"step": step, "restored_step": restored, "reason": reason,
                               "lost_steps": step - restored, "quarantined": quarantined, "seconds": seconds})
        return {"restored_step": float(restored), "lost_steps": float(step - restored),
                "quarantined_batches": float(quarantined), "rollbacks": float(len(self.rollbacks)),
                "seconds": seconds}

    def halt_report(
        self, owner: str, step: int, count: int, restored: int | None, path: str, quarantine_path: str
    ) -> str:
        """The halt's report: ``count`` requests in the window, ``restored`` the step restored (if any)."""
        history = "; ".join(
            [f"step {r['step']} -> {r['restored_step']} ({r['reason']})" for r in self.rollbacks]
            + [f"step {k}: nothing to restore" for k in self.unavailable]
        )
        saved = (
            f"The newest good snapshot (step {restored}) was restored and saved to {path}"
            if restored is not None
            else f"No snapshot was good to restore; the current state was saved to {path}"
        )
        return (
            f"{owner} halted training at optimizer step {step}: {count} rollback requests "
            f"within {self.budget_window} steps exceed max_rollbacks={self.max_rollbacks} ({history}). {saved}; the "
            f"quarantined batches are listed in {quarantine_path}."
        )

    # The callback's checkpoint keys (kept from before the history was its own piece).
    def state_dict(self) -> dict[str, Any]:
        return {"rollbacks": [dict(r) for r in self.rollbacks], "unavailable": list(self.unavailable)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollbacks = [dict(r) for r in state.get("rollbacks", [])]
        self.unavailable = [int(k) for k in state.get("unavailable", [])]
