"""What ``SoftmaxSaturationMonitor`` costs per step on the tiny GPT of ``lightning_stability.demos``.

Side by side in one process, the method of ``overhead.py``: no callbacks; the monitor at its defaults
(a sample every 50 steps: the output-softmax statistics, and the attention of 64 random query rows
plus the last, recomputed in float32 from q and k captured at ``scaled_dot_product_attention``); the
monitor sampling every step; and the alternative users would reach for, materialising every layer's
full attention probabilities every step (what ``output_attentions=True`` does) and reducing them to the
same statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from benchmarks.overhead import MODEL_SIZES, Measurement, Setup, Summary, goal_verdict, run_benchmark
from lightning_stability import SoftmaxSaturationMonitor
from lightning_stability.ops.saturation import attention_stats

GOAL_DEFAULT = 1.03  # the goal at default sampling
GOAL_EVERY_STEP = 1.10  # and sampling every step


class MaterialisedAttention(Callback):
    """Every step, every layer's full ``(B, H, T, T)`` attention probabilities from its fused q/k
    projection, reduced to entropy, max logit and p_max per head (kept on the device)."""

    def __init__(self) -> None:
        self.stats: list[dict[str, torch.Tensor]] = []
        self._handles: list[Any] = []

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for block in pl_module.blocks:  # type: ignore[union-attr]
            attn = block.attn

            def hook(module: Any, args: Any, out: torch.Tensor, heads: int = attn.n_head) -> None:
                b, t, c3 = out.shape
                q, k, _ = out.detach().split(c3 // 3, dim=2)
                q, k = (z.view(b, t, heads, -1).transpose(1, 2) for z in (q, k))
                self.stats.append(attention_stats(q, k, is_causal=True))  # every row: the full T x T

            self._handles.append(attn.qkv.register_forward_hook(hook))

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.stats = []

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


SETUPS = (
    Setup("no callbacks", "the baseline", lambda root: []),
    Setup(
        "SoftmaxSaturationMonitor",
        "`SoftmaxSaturationMonitor()` at its defaults: a sample every 50 steps (the window holds one)",
        lambda root: [SoftmaxSaturationMonitor()],
    ),
    Setup(
        "monitor, every step",
        "`SoftmaxSaturationMonitor(every_n_steps=1)`: every step sampled",
        lambda root: [SoftmaxSaturationMonitor(every_n_steps=1)],
    ),
    Setup(
        "materialised attention",
        "every layer's full attention probabilities every step, reduced to the same statistics",
        lambda root: [MaterialisedAttention()],
    ),
)


def overhead(
    warmup_steps: int, timed_steps: int, repeats: int, progress: Callable[[str], None] | None = None
) -> list[Measurement]:
    return run_benchmark(warmup_steps, timed_steps, repeats, MODEL_SIZES, SETUPS, progress)


def overhead_lines(summaries: Sequence[Summary]) -> list[str]:
    """The goal verdicts per model size; reports, never raises."""
    lines = []
    for s in summaries:
        goal = {SETUPS[1].name: GOAL_DEFAULT, SETUPS[2].name: GOAL_EVERY_STEP}.get(s.setup)
        if goal is None:
            continue
        lines.append(
            f"{s.size}: {s.setup} takes {s.ratio:.3f}x the step time of no callbacks (its hooks alone: "
            f"{s.hook_share:.1%} of a baseline step); goal <= {goal:.2f}x: {goal_verdict(s, goal)}."
        )
    return lines
