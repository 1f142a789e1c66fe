"""The Transformer Engine side of ``FP8Precision``: availability and hardware checks, recipes, layer
conversion, the FP8 autocast, per-layer fallback and health read from TE's FP8 metadata.

Transformer Engine is imported only here and only when the TE backend is used. Its API moved within
2.x: ``te.autocast(enabled, recipe=)`` from 2.9 (``te.fp8_autocast(enabled, fp8_recipe=)`` before,
deprecated since); both are served.
"""

from __future__ import annotations

import contextlib
import warnings
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


_MARK = "_lightning_stability_te_layer"  # set on a module this package converted: its TELayer


def converted(module: nn.Module) -> TELayer | None:
    """The :class:`TELayer` of a module converted by :func:`convert_linear` and wrapped, else ``None``."""
    layer = module.__dict__.get(_MARK)
    return layer if isinstance(layer, TELayer) else None


class TELayer:
    """What ``FP8Precision`` needs of a converted TE layer, beside the module itself: a fallback switch
    (the layer's forward runs under ``fp8_autocast(enabled=False)``), health captured by hooks on
    sampled steps with the scales from its FP8 metadata, a reset of its amax history, and its FP8
    metadata kept out of the module's state_dict.

    **Shapes.** TE's FP8 GEMMs need the token count (all dimensions but the last) divisible by 8; a
    call with another count (a last partial batch, an odd validation batch) is padded with zero rows
    and the output sliced back: zeros change no amax and add nothing to the weight gradient, so the
    result is the unpadded call's, and every rank keeps running the same FP8 layers.

    **Checkpoints.** ``te.Linear`` saves its FP8 metadata (amax histories, scales) as ``_extra_state``
    in its state_dict. Lightning loads the weights before the plugin converts the module, into the
    ``nn.Linear`` that has no such key; so the key is removed from the module's state_dict (which then
    holds exactly the weights of the plain model) and travels in the plugin's state instead
    (:meth:`scaling_state`, :meth:`load_scaling_state`). A state_dict with ``_extra_state`` still loads
    (TE reads it), and one without it loads into a converted module (its metadata is kept)."""

    def __init__(self, module: nn.Module, recipe: str, formats: tuple[FP8Format, FP8Format] = (E4M3, E5M2)) -> None:
        self.module, self.recipe, self.formats = module, recipe, formats
        self.fallback = False
        self.health_due = False
        self.health: dict[str, dict[str, Tensor]] = {}
        self._warned_meta = False
        for name in ("get_extra_state", "set_extra_state"):
            if getattr(type(module), name, None) is getattr(nn.Module, name):  # not TE's own: nothing saved
                raise RuntimeError(f"FP8Precision: {type(module).__name__} has no {name}; Transformer Engine keeps "
                                   "its FP8 metadata there, which a checkpoint must save. This TE version is not "
                                   "supported; use FP8Precision(backend='emulated').")
        forward = module.forward

        def guarded_forward(x: Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.fallback:
                with fp8_autocast(enabled=False):
                    return forward(x, *args, **kwargs)
            tokens = x.numel() // max(1, x.shape[-1])
            pad = -tokens % 8
            if not pad:
                return forward(x, *args, **kwargs)
            # TE's FP8 GEMM rule: pad the tokens with zero rows, slice the output back  # (tokens + pad, in)
            padded = torch.nn.functional.pad(x.reshape(tokens, x.shape[-1]), (0, 0, 0, pad))
            out = forward(padded, *args, **kwargs)
            if not isinstance(out, Tensor):
                raise TypeError(f"FP8Precision: a TE layer returned {type(out).__name__} for a padded input; "
                                "expected a tensor (te.Linear with return_bias=False)")
            return out[:tokens].reshape(*x.shape[:-1], out.shape[-1])

        module.forward = guarded_forward  # type: ignore[method-assign]
        module.register_forward_pre_hook(self._input_hook)
        module.register_full_backward_hook(self._grad_hook)
        module.register_state_dict_post_hook(_drop_extra_state)
        module.register_load_state_dict_pre_hook(_keep_extra_state)
        module.__dict__[_MARK] = self

    def scaling_state(self) -> dict[str, Any]:
        """TE's own serialisation of the layer's FP8 metadata (``get_extra_state``)."""
        return {"extra_state": self.module.get_extra_state()}

    def load_scaling_state(self, state: dict[str, Any], name: str = "") -> None:
        if "extra_state" not in state:
            raise ValueError(f"FP8Precision: the saved scaling state of TE layer {name!r} has no 'extra_state' "
                             f"(has {sorted(state)}): it was not written by the TE backend")
        self.module.set_extra_state(state["extra_state"])

    def _meta(self) -> dict[str, Any]:
        """TE's FP8 metadata of the layer (``fp8_meta``: a TE internal, read for health and reset). Missing
        under delayed scaling means TE moved it: warn once, since the health then uses the tensors' own
        scales and a reset cannot clear the history."""
        meta = getattr(self.module, "fp8_meta", None)
        if meta is None and self.recipe == "delayed" and not self._warned_meta:
            self._warned_meta = True
            warnings.warn(f"FP8Precision: {type(self.module).__name__} has no fp8_meta (a Transformer Engine internal "
                          "this plugin reads); FP8 health uses each tensor's own scale and a fallback cannot reset "
                          "the layer's amax history. Please report the TE version.", RuntimeWarning, stacklevel=2)
        return meta or {}

    def _meta_scale(self, key: str, index: int, x: Tensor, fmt: FP8Format) -> Tensor:
        """The scale TE uses for this tensor: from its delayed-scaling metadata, else the tensor's own
        amax (current scaling computes it the same way, 1 where the amax is 0 or not finite)."""
        state = self._meta().get(key)
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
        meta = self._meta()
        for key in ("scaling_fwd", "scaling_bwd"):
            state = meta.get(key)
            if state is not None:
                state.amax_history.zero_()
                state.scale.fill_(1.0)


def _drop_extra_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    state_dict.pop(f"{prefix}_extra_state", None)  # saved by FP8Precision.state_dict instead


def _keep_extra_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    # a state_dict without TE's metadata (written by this plugin, or by a plain run): keep the layer's own,
    # which a strict load would otherwise report missing. ``state_dict`` is load_state_dict's own copy.
    state_dict.setdefault(f"{prefix}_extra_state", module.get_extra_state())
