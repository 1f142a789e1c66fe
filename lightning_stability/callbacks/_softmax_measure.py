"""The softmax monitor's measurement of one sampled optimizer step, over its micro-batches: the output
softmax's rows, the zero-loss counts, the gradients' alignment with their weights and each attention
layer's statistics (from :class:`AttentionCapture`), as device tensors until the ranks agree on them
in one collective. No Trainer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn

from lightning_stability.callbacks._softmax_capture import AttentionCapture
from lightning_stability.core.agreement import Combine
from lightning_stability.ops.saturation import (
    nlm_alignment,
    nlm_from_sums,
    reduce_attention_calls,
    reduce_softmax_rows,
    sharded_nlm_and_perp_sums,
    softmax_row_stats,
    zero_loss_counts,
)
from lightning_stability.ops.sharded import all_reduce_sum_

OUT_KEYS = ("logz_mean", "logz_std", "logz_max", "max_logit", "pmax_mean")
_LOWEST = ("entropy_min", "headroom_min", "sc_headroom_p01")
_HIGHEST = ("max_logit", "pmax_p99", "out_logz_max", "out_max_logit", "nlm_cos_max")


def combine_rule(key: str) -> Combine:
    """How the ranks' values of one statistic combine: extremes by the worst rank, the rest by the mean."""
    name = key.rsplit("/", 1)[-1]
    if name in _LOWEST:
        return "min"
    if name in _HIGHEST or name.startswith("max_logit_head"):
        return "max"
    return "mean"


class StepGradients:
    """The parameters with a gradient at an optimizer step. Under a sharding strategy, also their
    whole tensors' sums ``w.g``, ``w.w``, ``g.g`` (``sharded_nlm_and_perp_sums``): one all-reduce,
    made on first use, serves both the alignment and the perpendicular gradient."""

    def __init__(self, params: Sequence[nn.Parameter], sharded: bool) -> None:
        self.params, self.sharded = list(params), sharded

    @cached_property
    def sums(self) -> Tensor | None:
        return sharded_nlm_and_perp_sums(self.params, all_reduce_sum_) if self.sharded and self.params else None


class SoftmaxSample:
    """One sampled optimizer step's statistics, collected over its micro-batches."""

    def __init__(self, capture: AttentionCapture, logits_key: str, targets_key: str,
                 loss_dtype: torch.dtype | None) -> None:
        self.capture = capture
        self.logits_key, self.targets_key, self.loss_dtype = logits_key, targets_key, loss_dtype
        self.new_step()

    def new_step(self) -> None:
        self.out_rows: list[dict[str, Tensor]] = []  # per micro-batch: softmax_row_stats of the logits
        self.zero: Tensor | None = None  # summed zero_loss_counts
        self.nlm: Tensor | None = None
        self.logits: Tensor | None = None  # the head's output in this micro-batch's forward
        self.autocast = False
        self.capture.new_step()

    def see_logits(self, out: Tensor) -> None:
        self.logits = out.detach()
        self.autocast = torch.is_autocast_enabled(out.device.type)

    def collect(self, outputs: Any, batch: Any) -> None:
        """One micro-batch's output-softmax rows (small: three numbers a row) and zero-loss counts."""
        logits = self.logits
        if isinstance(outputs, Mapping) and isinstance(outputs.get(self.logits_key), Tensor):
            logits = outputs[self.logits_key].detach()
        self.logits = None
        if logits is None:
            return
        dtype = self._loss_dtype(logits)
        self.out_rows.append(softmax_row_stats(logits, dtype))
        targets = find_targets(self.targets_key, outputs, batch, logits)
        if targets is not None:
            counts = zero_loss_counts(logits, targets, dtype)
            self.zero = counts if self.zero is None else self.zero + counts

    def _loss_dtype(self, logits: Tensor) -> torch.dtype:
        if self.loss_dtype is not None:
            return self.loss_dtype
        if logits.dtype in (torch.float16, torch.bfloat16) and self.autocast:
            return torch.float32  # autocast computes cross-entropy in float32
        return logits.dtype

    def align(self, grads: StepGradients) -> None:
        """``nlm_cos_max``: the largest ``cos(-g, w)`` over weight matrices, before any remedy changes ``g``."""
        if grads.sharded:
            sums = grads.sums
            if sums is not None:
                matrices = torch.tensor([p.dim() >= 2 for p in grads.params], device=sums.device)
                if bool(matrices.any()):
                    self.nlm = nlm_from_sums(sums[matrices]).max()
            return
        weights = [p for p in grads.params if p.dim() >= 2 and p.grad is not None]
        if weights:
            self.nlm = torch.stack([nlm_alignment(p, p.grad) for p in weights if p.grad is not None]).max()

    def values(self) -> dict[str, Tensor]:
        """Every statistic of the step, on the device: ``out_*``, ``sc_*``, ``zero_loss_frac``,
        ``nlm_cos_max``, and per attention layer ``<layer>/<key>`` with its per-head maxima
        ``<layer>/max_logit_head<h>`` (for QK-clip)."""
        values: dict[str, Tensor] = {}
        if self.out_rows:
            for key, value in reduce_softmax_rows(self.out_rows).items():
                values[f"out_{key}" if key in OUT_KEYS else key] = value
        if self.zero is not None:
            values["zero_loss_frac"] = self.zero[0] / self.zero[1].clamp_min(1.0)
        if self.nlm is not None:
            values["nlm_cos_max"] = self.nlm
        for layer, calls in self.capture.calls.items():
            layer_values, head_max = reduce_attention_calls(calls)
            for key, value in layer_values.items():
                values[f"{layer}/{key}"] = value
            if head_max is not None:  # per-head maxima over the step's micro-batches
                for h, value in enumerate(head_max.unbind(0)):
                    values[f"{layer}/max_logit_head{h}"] = value
        return values


def find_targets(key: str, outputs: Any, batch: Any, logits: Tensor) -> Tensor | None:
    """Integer targets, one per row of ``logits``, from ``outputs[key]`` or ``batch[key]`` of a mapping."""
    rows = logits.numel() // max(1, logits.shape[-1])
    for source in (outputs, batch):
        if isinstance(source, Mapping) and isinstance(source.get(key), Tensor):
            t = source[key]
            if t.numel() == rows and not t.is_floating_point():
                return t
    return None
