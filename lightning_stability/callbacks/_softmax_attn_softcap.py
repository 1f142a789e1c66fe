"""The ``attn_softcap`` remedy: every ``scaled_dot_product_attention`` call of the model's forwards
(training, validation, test, predict) soft-caps its scaled logits, Gemma 2's attention cap."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_stability.callbacks._softmax_capture import SDPA_PARAMS, FunctionPatch
from lightning_stability.callbacks._softmax_remedy import SoftmaxRemedy
from lightning_stability.ops.saturation import softcapped_attention


class _Capped(FunctionPatch):
    """In force for one batch's forward: SDPA becomes :func:`softcapped_attention`."""

    def __init__(self, remedy: AttentionSoftcap) -> None:
        super().__init__()
        self.remedy = remedy

    def wrap(self, sdpa: Callable[..., Any], mha: Callable[..., Any]) -> tuple[Callable[..., Any], Callable[..., Any]]:
        remedy, cap = self.remedy, self.remedy.monitor.attention_softcap
        capture = remedy.monitor._attention

        def capped(*args: Any, **kwargs: Any) -> Any:
            bound = dict(zip(SDPA_PARAMS, args))
            bound.update(kwargs)
            remedy.cost(bound["query"], bound["key"])
            if capture.by_mode:  # a TorchFunctionMode does not see this Python function: record the call here
                capture.sdpa_call(args, kwargs)
            return softcapped_attention(**bound, cap=cap)

        def mha_wrapper(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("need_weights", True):
                remedy.cannot_reach("nn.MultiheadAttention with need_weights=True")
            return mha(*args, **kwargs)

        return capped, mha_wrapper


class AttentionSoftcap(SoftmaxRemedy):
    """No fused SDPA kernel soft-caps, so attention runs as math while it is on: the first call of a fit
    warns with what that costs at its shape. ``nn.MultiheadAttention`` reaches SDPA only with
    ``need_weights=False``; its other path is left uncapped, with a warning. Put in place beneath the
    capture, which so sees the raw q and k."""

    name = "attn_softcap"

    def __init__(self, monitor: Any) -> None:
        super().__init__(monitor)
        self.patch: _Capped | None = None
        self.warned: set[str] = set()  # what it has warned about this fit

    def setup_fit(self) -> None:
        self.warned = set()
        super().setup_fit()

    def event_metrics(self) -> dict[str, float]:
        return {"attention_softcap": self.monitor.attention_softcap}

    def batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, training: bool) -> None:
        if self.patch is None:
            self.patch = _Capped(self)
            self.patch.__enter__()

    def batch_end(self) -> None:
        self.release()

    def release(self) -> None:
        if self.patch is not None:
            self.patch.__exit__(None, None, None)
            self.patch = None

    def cost(self, q: Tensor, k: Tensor) -> None:
        if "cost" in self.warned:
            return
        self.warned.add("cost")
        shape = (*q.shape[:-1], k.shape[-2])
        mib = math.prod(shape) * 4 * 3 / 2**20  # float32 logits, capped logits, probabilities: kept for the backward
        rank_zero_warn(
            f"{type(self.monitor).__name__}: the attention soft-cap (attn_softcap) runs attention as math, since no "
            f"fused scaled_dot_product_attention kernel soft-caps: about {mib:.1f} MiB of float32 logits per call at "
            f"shape {tuple(shape)}, kept for the backward, and slower than a fused kernel. It stays on until "
            f"{self.monitor.cooldown} healthy samples; to avoid it, build the cap into the model (FlexAttention's "
            "score_mod with torch.compile fuses it)."
        )

    def cannot_reach(self, what: str) -> None:
        if what not in self.warned:
            self.warned.add(what)
            rank_zero_warn(f"{type(self.monitor).__name__}: the attention soft-cap cannot reach {what}; that "
                           "attention is not capped.")
