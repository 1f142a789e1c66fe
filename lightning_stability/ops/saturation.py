"""Softmax saturation: the statistics of output and attention softmaxes, and the remedies.

Pure torch, no Lightning. Every statistic is computed in float32 (or float64 where the input is)
from the logits, on their device, and returned as device tensors: callers move the few scalars
they log to the host once per logging step.

Three instabilities live in softmaxes:

- **Output logit drift**: the log-partition ``log Z = logsumexp(z)`` moves far from 0; PaLM's z-loss
  ``c (log Z)^2`` holds it there (:func:`z_loss`, :func:`z_loss_grad`).
- **Attention entropy collapse**: attention logits grow until attention is nearly one-hot
  (:func:`attention_stats`; remedies: soft-capping :func:`softcap`, QK-clip :func:`qk_clip_factors`).
- **Softmax Collapse**: past overfitting, logits scale up until the floating-point softmax of the top
  class is exactly 1, so the loss and its gradient are exactly 0 and learning stops. The *collapse
  headroom* (:func:`collapse_headroom`) says in nats how far a row is from it; StableMax
  (:func:`stablemax_cross_entropy`) and perpendicular gradients (:func:`perpendicular_grad_`) avoid it.

The formulas live by topic (output statistics in ``softmax_stats``, losses in ``softmax_losses``, the
gradient along the weight in ``perpendicular``, attention in ``attention``, QK-clip in ``qk_clip``);
this module gathers them under the one name they have always been imported by.
"""

from __future__ import annotations

from lightning_stability.ops.attention import (
    MASKED,
    attention_stats,
    mha_query_key,
    reduce_attention_calls,
    sample_rows,
    softcapped_attention,
)
from lightning_stability.ops.perpendicular import (
    nlm_alignment,
    nlm_from_sums,
    perpendicular_grad_,
    sharded_nlm_and_perp_sums,
    sharded_perpendicular_grad_,
)
from lightning_stability.ops.qk_clip import QKProjection, apply_qk_clip, find_qk_projection, qk_clip_factors
from lightning_stability.ops.softmax_losses import (
    Reduction,
    log_stablemax,
    softcap,
    stablemax,
    stablemax_cross_entropy,
    z_loss,
    z_loss_grad,
)
from lightning_stability.ops.softmax_stats import (
    collapse_headroom,
    reduce_softmax_rows,
    significand_bits,
    softmax_row_stats,
    softmax_stats,
    zero_loss_counts,
    zero_loss_fraction,
)

__all__ = [
    "MASKED",
    "QKProjection",
    "Reduction",
    "apply_qk_clip",
    "attention_stats",
    "collapse_headroom",
    "find_qk_projection",
    "log_stablemax",
    "mha_query_key",
    "nlm_alignment",
    "nlm_from_sums",
    "perpendicular_grad_",
    "qk_clip_factors",
    "reduce_attention_calls",
    "reduce_softmax_rows",
    "sample_rows",
    "sharded_nlm_and_perp_sums",
    "sharded_perpendicular_grad_",
    "significand_bits",
    "softcap",
    "softcapped_attention",
    "softmax_row_stats",
    "softmax_stats",
    "stablemax",
    "stablemax_cross_entropy",
    "z_loss",
    "z_loss_grad",
    "zero_loss_counts",
    "zero_loss_fraction",
]
