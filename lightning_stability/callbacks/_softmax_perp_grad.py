"""The ``perp_grad`` remedy: every gradient projected orthogonal to its weight and rescaled to its norm
(the perpendicular gradient of the grokking-at-the-edge work)."""

from __future__ import annotations

from lightning_stability.callbacks._softmax_measure import StepGradients
from lightning_stability.callbacks._softmax_remedy import SoftmaxRemedy
from lightning_stability.ops.saturation import perpendicular_grad_, sharded_perpendicular_grad_


class PerpendicularGradient(SoftmaxRemedy):
    """Before each optimizer step; on shards from the whole tensors' all-reduced sums."""

    name = "perp_grad"

    def before_optimizer_step(self, grads: StepGradients) -> None:
        if not grads.sharded:
            perpendicular_grad_(grads.params)
        elif grads.sums is not None:
            sharded_perpendicular_grad_(grads.params, grads.sums)
