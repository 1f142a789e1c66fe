"""What a detection of the guard concerns: which layers carry it and which batch made it.

Nothing of it runs on a quiet step but keeping two references (the last healthy step's per-parameter
gradient norms, which the global norm was made of; the step's micro-batches, which Lightning holds
anyway until the step ends). On a detection: the layers ranked by their gradient norm against their
own at the last healthy step (:func:`~lightning_stability.ops.blame.rank_layers`, one host read), and
the batch's sample ids by the rollback's rule (:func:`sample_ids_of`), or its position where the
batch carries none.
"""

from __future__ import annotations

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
from lightning_stability.core.modules import clean_name
from lightning_stability.ops.blame import describe, rank_layers

TOP_LAYERS = 3  # layers named in a detection's event


class Forensics:
    """One guard's record of the current step's batches and of each optimizer's last healthy norms."""

    def __init__(self, sample_ids: SampleIds) -> None:
        self.sample_ids = sample_ids
        self.batches: list[tuple[int, int, Any]] = []  # (epoch, batch_idx, batch) of the step under way
        self.step = -1  # the optimizer step they belong to
        self.healthy: dict[int, tuple[tuple[int, ...], Tensor]] = {}  # optimizer -> (parameter ids, norms)

    def see_batch(self, step: int, epoch: int, batch_idx: int, batch: Any) -> None:
        if step != self.step:
            self.batches, self.step = [], step
        self.batches.append((epoch, batch_idx, batch))

    def batch_end(self, step: int) -> None:
        """A batch ended: once the optimizer stepped (``step`` moved on), its batches are let go."""
        if step != self.step:
            self.batches = []

    def healthy_step(self, index: int, params: list[Tensor], measured: Measured) -> None:
        if measured.param_norms is not None:
            self.healthy[index] = (tuple(id(p) for p in params), measured.param_norms)

    def details(self, index: int, module: nn.Module, params: list[Tensor], measured: Measured,
                measure: StepMeasure, world_size: int = 1) -> dict[str, Any]:
        """A detection's ``details``: ``layers`` (the top few, ranked) and ``sample_ids`` of every rank's
        micro-batches, rank by rank (or ``batches``: ``[epoch, batch_idx]`` of each micro-batch of the
        step, the same positions on every rank). Every rank detects in the same step, so on more than
        one rank the ids are gathered there (one ``all_gather_object``) and every rank's event is the same."""
        out: dict[str, Any] = {}
        if measured.param_norms is not None:
            ids, before = self.healthy.get(index, ((), None))
            if before is not None and ids != tuple(id(p) for p in params):
                before = None  # another set of parameters had gradients: no like-for-like reference
            now = measured.param_norms
            if before is not None:  # sharded: both made whole in the one collective of this detection
                now, before = measure.whole_norms(torch.stack([now, before.to(now.device)])).unbind(0)
            else:
                now = measure.whole_norms(now)
            names = {id(p): clean_name(n) for n, p in module.named_parameters()}
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
