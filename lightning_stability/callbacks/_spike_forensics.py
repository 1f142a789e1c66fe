"""What a detection of the guard concerns: which layers carry it and which batch made it.

Nothing of it runs on a quiet step but keeping two references (the last healthy step's per-parameter
gradient norms, which the global norm was made of; the step's micro-batches, which Lightning holds
anyway until the step ends). On a detection: the layers ranked by their gradient norm against their
own at the last healthy step (:func:`~lightning_stability.ops.blame.rank_layers`, one host read), and
the batch's sample ids by the rollback's rule (:func:`sample_ids_of`), or its position where the
batch carries none.

Per-sample losses, where ``training_step`` returns them (under ``"sample_losses"`` in its output
dict: one loss per sample of the micro-batch, in the batch's order), reach a callback only once the
step is over (``on_train_batch_end``), after the detection's event: they follow it as a
``sample_losses`` event at the same step, the worst samples first. Between detections only a
reference to them is held for the step, never read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_stability.callbacks._rollback_quarantine import (
    SampleIds,
    gather_records,
    sample_ids_of,
    to_list,
)
from lightning_stability.callbacks._spike_measure import Measured, StepMeasure
from lightning_stability.core.modules import parameter_names
from lightning_stability.ops.blame import describe, rank_layers

TOP_LAYERS = 3  # layers named in a detection's event
TOP_SAMPLES = 16  # samples named in a detection's ``sample_losses`` event, the worst first
SAMPLE_LOSSES = "sample_losses"  # the key of ``training_step``'s output that holds them


class Forensics:
    """One guard's record of the current step's batches and of each optimizer's last healthy norms."""

    def __init__(self, sample_ids: SampleIds) -> None:
        self.sample_ids = sample_ids
        self.batches: list[tuple[int, int, Any]] = []  # (epoch, batch_idx, batch) of the step under way
        self.step = -1  # the optimizer step they belong to
        self.healthy: dict[int, tuple[tuple[int, ...], Tensor]] = {}  # optimizer -> (parameter ids, norms)
        self.losses: list[Any] = []  # each ended micro-batch's per-sample losses of the step under way, or None
        self.detected: int | None = None  # the step of a detection whose per-sample losses are still to come

    def see_batch(self, step: int, epoch: int, batch_idx: int, batch: Any) -> None:
        if step != self.step:
            self.batches, self.losses, self.step = [], [], step
        self.batches.append((epoch, batch_idx, batch))

    def batch_end(self, step: int, outputs: Any, world_size: int = 1) -> dict[str, Any] | None:
        """A batch ended with ``outputs`` (``training_step``'s). Once the optimizer stepped (``step`` moved
        on) the step's batches are let go; if it had a detection, the ``sample_losses`` event's metrics
        and details are returned (every rank's samples, gathered: every rank detected in that step)."""
        losses = outputs.get(SAMPLE_LOSSES) if isinstance(outputs, Mapping) else None
        self.losses.append(losses.detach() if isinstance(losses, Tensor) else losses)
        if step == self.step:
            return None
        follow = self._sample_losses(world_size) if self.detected == self.step else None
        self.batches, self.losses, self.detected = [], [], None
        return follow

    def _sample_losses(self, world_size: int) -> dict[str, Any] | None:
        mine: list[tuple[float, Any]] = []
        for (epoch, batch_idx, batch), losses in zip(self.batches, self.losses):
            values = to_list(losses)
            if values is None:
                continue
            ids = to_list(sample_ids_of(batch, self.sample_ids))
            if ids is None or len(ids) != len(values):
                ids = [[epoch, batch_idx, row] for row in range(len(values))]  # positions: no ids to name them by
            mine += [(float(v), i) for v, i in zip(values, ids)]
        if not mine:  # the step returned none: every rank runs the same training_step, so none anywhere
            return None
        every = [x for r in gather_records([{"samples": mine}], world_size) for x in r["samples"]]
        every.sort(key=lambda x: -math.inf if math.isnan(x[0]) else -x[0])  # the worst first, NaN worst of all
        values = sorted(v for v, _ in every if not math.isnan(v))
        return {
            "step": self.step,
            "metrics": {"samples": float(len(every)), "nonfinite": float(sum(not math.isfinite(v) for v, _ in every)),
                        "loss_max": every[0][0], "loss_median": values[len(values) // 2] if values else math.nan},
            "details": {"sample_ids": [i for _, i in every[:TOP_SAMPLES]],
                        "sample_losses": [v for v, _ in every[:TOP_SAMPLES]]},
        }

    def healthy_step(self, index: int, params: list[Tensor], measured: Measured) -> None:
        if measured.param_norms is not None:
            self.healthy[index] = (tuple(id(p) for p in params), measured.param_norms)

    def details(self, index: int, module: nn.Module, params: list[Tensor], measured: Measured,
                measure: StepMeasure, world_size: int = 1) -> dict[str, Any]:
        """A detection's ``details`` (and its per-sample losses to follow at the step's end): ``layers`` (the top few, ranked) and ``sample_ids`` of every rank's
        micro-batches, rank by rank (or ``batches``: ``[epoch, batch_idx]`` of each micro-batch of the
        step, the same positions on every rank). Every rank detects in the same step, so on more than
        one rank the ids are gathered there (one ``all_gather_object``) and every rank's event is the same."""
        out: dict[str, Any] = {}
        self.detected = self.step
        if measured.param_norms is not None:
            ids, before = self.healthy.get(index, ((), None))
            if before is not None and ids != tuple(id(p) for p in params):
                before = None  # another set of parameters had gradients: no like-for-like reference
            now = measured.param_norms
            if before is not None:  # sharded: both made whole in the one collective of this detection
                now, before = measure.whole_norms(torch.stack([now, before.to(now.device)])).unbind(0)
            else:
                now = measure.whole_norms(now)
            names = parameter_names(module)
            out["layers"] = describe(rank_layers(now, before, [names.get(id(p), f"param{i}") for i, p in
                                                               enumerate(params)], TOP_LAYERS))
        ids_per_batch = [to_list(sample_ids_of(b, self.sample_ids)) for _, _, b in self.batches]
        mine = [x for ids in ids_per_batch for x in ids] if all(i is not None for i in ids_per_batch) else None  # type: ignore[union-attr]
        every = [r["ids"] for r in gather_records([{"ids": mine}], world_size)]
        if self.batches and all(ids is not None for ids in every):
            out["sample_ids"] = [x for ids in every for x in ids]
        elif self.batches:
            out["batches"] = [[epoch, batch_idx] for epoch, batch_idx, _ in self.batches]
        return out
