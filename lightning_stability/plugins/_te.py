"""The Transformer Engine side of ``FP8Precision``: availability and hardware checks, recipes, layer
conversion, the FP8 autocast, per-layer fallback and health read from TE's FP8 metadata.

Transformer Engine is imported only here and only when the TE backend is used. Its API moved within
2.x: ``te.autocast(enabled, recipe=)`` from 2.9 (``te.fp8_autocast(enabled, fp8_recipe=)`` before,
deprecated since); both are served.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from lightning_utilities.core.imports import RequirementCache
from torch import Tensor, nn

from lightning_stability.ops.fp8 import E4M3, E5M2, FP8Format, current_scale, fp8_health

TE_AVAILABLE = RequirementCache("transformer_engine>=2.0")
# the least compute capability each recipe needs on the TE backend
RECIPE_SM = {"delayed": (8, 9), "current": (8, 9), "block": (9, 0), "mxfp8": (10, 0), "nvfp4": (10, 0)}
RECIPE_CLASS = {"delayed": "DelayedScaling", "current": "Float8CurrentScaling", "block": "Float8BlockScaling",
                "mxfp8": "MXFP8BlockScaling", "nvfp4": "NVFP4BlockScaling"}
_INSTALL = 'pip install "lightning-stability[fp8]" (Transformer Engine; CUDA machines only)'


def device_capability() -> tuple[int, int] | None:
    """The current CUDA device's compute capability, ``None`` without CUDA."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return int(major), int(minor)


def te_usable(recipe: str) -> tuple[bool, str]:
    """Whether the TE backend can run ``recipe`` here, and why not."""
    if not TE_AVAILABLE:
        return False, "Transformer Engine is not installed"
    sm = device_capability()
    if sm is None:
        return False, "CUDA is not available"
    need = RECIPE_SM[recipe]
    if sm < need:
        return False, f"this GPU is SM{sm[0]}{sm[1]}; recipe {recipe!r} needs SM>={need[0]}.{need[1]}"
    return True, f"Transformer Engine on SM{sm[0]}{sm[1]}"


def check_te(recipe: str) -> None:
    """Raise a clear error when the TE backend cannot run ``recipe`` here, saying how to get unstuck."""
    ok, why = te_usable(recipe)
    if ok:
        return
    if not TE_AVAILABLE:
        raise ModuleNotFoundError(
            f"FP8Precision(backend='te') needs Transformer Engine: {_INSTALL}. Use FP8Precision(backend='emulated') "
            "to study FP8 numerics on any device."
        )
    if recipe in ("mxfp8", "nvfp4") or (recipe == "block" and device_capability() is not None):
        raise RuntimeError(f"FP8Precision(recipe={recipe!r}): {why}. Use recipe='delayed' or 'current' on this GPU.")
    raise RuntimeError(
        f"FP8 via Transformer Engine needs SM>=8.9; {why}. Use FP8Precision(backend='emulated') to study FP8 "
        "numerics here."
    )


def make_recipe(recipe: str, fp8_format: str, margin: int, amax_history_len: int, amax_compute_algo: str) -> Any:
    """The TE recipe object for our arguments."""
    from transformer_engine.common import recipe as te_recipe

    fmt = te_recipe.Format.HYBRID if fp8_format == "hybrid" else te_recipe.Format.E4M3
    cls = getattr(te_recipe, RECIPE_CLASS[recipe])
    if recipe == "delayed":
        return cls(margin=margin, fp8_format=fmt, amax_history_len=amax_history_len, amax_compute_algo=amax_compute_algo)
    if recipe in ("current", "block"):
        return cls(fp8_format=fmt)
    return cls()


def fp8_autocast(enabled: bool, recipe: Any = None) -> contextlib.AbstractContextManager:
    """TE's FP8 autocast: ``te.autocast`` where it exists (TE >= 2.9), else ``te.fp8_autocast``."""
    import transformer_engine.pytorch as te

    autocast = getattr(te, "autocast", None)
    if autocast is not None:
        return autocast(enabled=enabled, recipe=recipe) if enabled else autocast(enabled=False)
    return te.fp8_autocast(enabled=enabled, fp8_recipe=recipe) if enabled else te.fp8_autocast(enabled=False)


def convert_linear(linear: nn.Linear) -> nn.Module:
    """A ``te.Linear`` with ``linear``'s weights, float32 master weights on its device."""
    import transformer_engine.pytorch as te

    new = te.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    params_dtype=torch.float32, device=linear.weight.device)
    with torch.no_grad():
        new.weight.copy_(linear.weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


class TELayer:
    """What ``FP8Precision`` needs of a converted TE layer, beside the module itself: a fallback switch
    (the layer's forward runs under ``fp8_autocast(enabled=False)``), health captured by hooks on
    sampled steps with the scales from its FP8 metadata, and a reset of its amax history."""

    def __init__(self, module: nn.Module, recipe: str, formats: tuple[FP8Format, FP8Format] = (E4M3, E5M2)) -> None:
        self.module, self.recipe, self.formats = module, recipe, formats
        self.fallback = False
        self.health_due = False
        self.health: dict[str, dict[str, Tensor]] = {}
        forward = module.forward

        def guarded_forward(x: Tensor, *args: Any, **kwargs: Any) -> Any:
            tokens = x.numel() // max(1, x.shape[-1])
            if not self.fallback and tokens % 8:
                raise ValueError(
                    f"FP8 GEMMs need the number of tokens (all dimensions but the last) divisible by 8; this batch "
                    f"has {tokens} for input shape {tuple(x.shape)}. Pad the batch or sequence, or keep this layer "
                    "in high precision (FP8Precision(keep=[...]))."
                )
            if self.fallback:
                with fp8_autocast(enabled=False):
                    return forward(x, *args, **kwargs)
            return forward(x, *args, **kwargs)

        module.forward = guarded_forward  # type: ignore[method-assign]
        module.register_forward_pre_hook(self._input_hook)
        module.register_full_backward_hook(self._grad_hook)

    def _meta_scale(self, key: str, index: int, x: Tensor, fmt: FP8Format) -> Tensor:
        """The scale TE uses for this tensor: from its delayed-scaling metadata, else the tensor's own
        amax (current scaling computes it the same way, 1 where the amax is 0 or not finite)."""
        meta = getattr(self.module, "fp8_meta", None) or {}
        state = meta.get(key)
        if self.recipe == "delayed" and state is not None:
            return state.scale[index].detach().float()
        return current_scale(x, fmt)

    def _input_hook(self, module: nn.Module, args: Any) -> None:
        if not (self.health_due and module.training and not self.fallback and args):
            return
        x, weight = args[0], module.get_parameter("weight")
        self.health["input"] = fp8_health(x, self._meta_scale("scaling_fwd", 0, x, self.formats[0]), self.formats[0])
        self.health["weight"] = fp8_health(weight, self._meta_scale("scaling_fwd", 1, weight, self.formats[0]),
                                           self.formats[0])

    def _grad_hook(self, module: nn.Module, grad_input: Any, grad_output: Any) -> None:
        if not (self.health_due and not self.fallback and grad_output and grad_output[0] is not None):
            return
        g = grad_output[0]
        self.health["grad"] = fp8_health(g, self._meta_scale("scaling_bwd", 0, g, self.formats[1]), self.formats[1])

    def reset_scaling(self) -> None:
        meta = getattr(self.module, "fp8_meta", None) or {}
        for key in ("scaling_fwd", "scaling_bwd"):
            state = meta.get(key)
            if state is not None:
                state.amax_history.zero_()
                state.scale.fill_(1.0)
