"""The ``qk_clip`` remedy: Megatron's QK-clip on every head whose largest logit exceeded ``qk_clip_tau``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_stability.callbacks._softmax_remedy import Emission, SoftmaxRemedy
from lightning_stability.ops.saturation import apply_qk_clip, find_qk_projection
from lightning_stability.ops.sharded import local


class QKClip(SoftmaxRemedy):
    """After a sampled step's optimizer step (never between its micro-batches), each head above tau
    gets its query rows scaled by ``eta^alpha`` and its key rows by ``eta^(1 - alpha)``, ``eta = tau /
    max_logit``, from the ranks' agreed per-head maxima, so every replica scales alike."""

    name = "qk_clip"

    def __init__(self, monitor: Any) -> None:
        super().__init__(monitor)
        self.no_projection: set[str] = set()  # layers it found no q/k projections for (warned once)

    @classmethod
    def unavailable(cls, strategy: str | None) -> str | None:
        # each head's rows of the q/k projections: FSDP2 shards weights by rows, and each rank scales its
        # own; FSDP1's flat 1-D shards hold no rows
        if strategy == "FSDPStrategy":
            return ("it rescales heads' rows of q/k weights, which FSDP1 flattens into 1-D shards; "
                    "ModelParallelStrategy's row shards are supported")
        return None

    def after_step(self, stats: Mapping[str, float]) -> list[Emission]:
        m, tau, out = self.monitor, self.monitor.qk_clip_tau, []
        for layer in sorted({k.rsplit("/", 1)[0] for k in stats if "/max_logit_head" in k}):
            heads = [stats[f"{layer}/max_logit_head{h}"] for h in range(_count_heads(stats, layer))]
            if max(heads) <= tau:
                continue
            module = m._modules.get(layer)
            proj = None
            if module is not None:
                proj = m.qk_projections(layer, module) if m.qk_projections else find_qk_projection(module)
            if proj is None or proj.n_head != len(heads):
                self._warn(layer, f"QK-clip cannot find the q/k projections of {layer}; pass "
                           "qk_projections=lambda name, module: QKProjection(...).")
                continue
            try:
                apply_qk_clip(proj, torch.tensor(heads, device=local(proj.q.get_parameter(proj.weight)).device), tau, m.qk_clip_alpha)
            except NotImplementedError as err:  # a sharded layout without whole rows: the same on every rank
                self._warn(layer, f"QK-clip skips {layer}: {err}.")
                continue
            out.append(Emission("qk_clip", "info", {"max_logit": max(heads), "eta_min": tau / max(heads),
                                "heads_clipped": float(sum(h > tau for h in heads))}, "qk_clip", layer))
        return out

    def _warn(self, layer: str, message: str) -> None:
        if layer not in self.no_projection:
            self.no_projection.add(layer)
            rank_zero_warn(f"{type(self.monitor).__name__}: {message}")


def _count_heads(stats: Mapping[str, float], layer: str) -> int:
    h = 0
    while f"{layer}/max_logit_head{h}" in stats:
        h += 1
    return h
