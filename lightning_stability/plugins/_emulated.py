"""The FP8 emulator's layer: an ``nn.Linear`` whose matmul runs through :func:`~lightning_stability.ops.fp8.fp8_linear`
with Transformer Engine's per-role scaling, on every device."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_stability.ops.fp8 import (
    E4M3,
    E5M2,
    FP8Format,
    amax_from_history,
    current_scale,
    delayed_scale,
    fp8_health,
    fp8_linear,
    fp8_linear_rowwise,
    roll_history,
    row_scales,
)

ROLES = ("input", "weight", "grad")


class EmulatedFP8Linear(nn.Linear):
    """An ``nn.Linear`` whose matmul runs through the FP8 emulator (:func:`fp8_linear`) on the same
    parameters (float32 master weights), with Transformer Engine's scaling: per role (input, weight,
    output gradient) an amax history and a scale. Delayed scaling uses the scale computed from the
    history before this call, then records this call's amax; current scaling uses the tensor's own.
    Any input shape runs (the emulator has no GEMM tile rule: an odd last batch is fine).

    Recipes: ``"delayed"``; ``"current"`` (TE's per-tensor current scaling) and ``"tensorwise"``
    (torchao's, the same rule); ``"rowwise"`` (torchao's: one power-of-two scale per row of each GEMM
    operand along the dimension it contracts, every operand in the forward format,
    :func:`fp8_linear_rowwise`). The dynamic recipes keep no history: their ``scale`` buffer holds the
    scale of the last call (for rowwise, the smallest of the rows').

    The amax history and the scale are non-persistent buffers: they move with the module and DDP
    broadcasts them, but the module's ``state_dict`` holds only the weights, so a checkpoint loads into
    the model before conversion (Lightning restores the weights before the precision plugin converts
    the module) and into a plain run. ``FP8Precision.state_dict`` saves them (:meth:`scaling_state`);
    an older state_dict that holds them as ``<layer>.amax_history`` / ``<layer>.scale`` still loads.

    ``fallback`` runs the layer as a plain linear (bf16 under the plugin's autocast) instead."""

    amax_history: Tensor  # (history, role): role 0 input, 1 weight, 2 output gradient
    scale: Tensor  # (role,)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, recipe: str = "delayed",
                 formats: tuple[FP8Format, FP8Format] = (E4M3, E5M2), margin: int = 0, amax_history_len: int = 1024,
                 amax_compute_algo: str = "max", device: Any = None, dtype: Any = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.recipe, self.formats, self.margin, self.amax_compute_algo = recipe, formats, margin, amax_compute_algo
        self.register_buffer("amax_history", torch.zeros(amax_history_len, 3, device=device), persistent=False)
        self.register_buffer("scale", torch.ones(3, device=device), persistent=False)
        self.register_load_state_dict_pre_hook(_load_legacy_scaling)
        self.fallback = False
        self.health_due = False
        self.health: dict[str, dict[str, Tensor]] = {}

    def scaling_state(self) -> dict[str, Tensor]:
        """The delayed-scaling state, cloned to the host: what a checkpoint must hold to resume exactly."""
        return {"amax_history": self.amax_history.detach().cpu().clone(), "scale": self.scale.detach().cpu().clone()}

    @torch.no_grad()
    def load_scaling_state(self, state: dict[str, Any], name: str = "") -> None:
        """Copy a :meth:`scaling_state` back. A history of another length keeps its newest entries (or
        is padded with zeros), with a warning: TE's ``amax_history_len`` is part of the recipe."""
        history, scale = torch.as_tensor(state["amax_history"]), torch.as_tensor(state["scale"])
        if scale.shape != self.scale.shape or history.dim() != 2 or history.shape[1] != 3:
            raise ValueError(f"EmulatedFP8Linear {name!r}: a saved scaling state of shapes {tuple(history.shape)}, "
                             f"{tuple(scale.shape)}; expected (amax_history_len, 3) and (3,)")
        if history.shape[0] != self.amax_history.shape[0]:
            rank_zero_warn(f"FP8Precision: layer {name!r} was saved with amax_history_len={history.shape[0]}, this "
                           f"run has {self.amax_history.shape[0]}; keeping the newest entries.")
            rows = min(history.shape[0], self.amax_history.shape[0])
            self.amax_history.zero_()
            self.amax_history[:rows] = history[:rows]
        else:
            self.amax_history.copy_(history)
        self.scale.copy_(scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> EmulatedFP8Linear:
        """A converted copy sharing ``linear``'s parameters (the optimizer keeps seeing the same tensors)."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device, **kwargs)
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def reset_scaling(self) -> None:
        self.amax_history.zero_()
        self.scale.fill_(1.0)

    def _scale(self, role: int, x: Tensor) -> Tensor:
        fmt = self.formats[1] if role == 2 else self.formats[0]
        if self.recipe == "rowwise":
            fmt = self.formats[0]  # torchao's rowwise recipe: E4M3 for the output gradient too
            rows, s = row_scales(x, fmt)
            self.scale[role] = s.amin()
            if self.health_due and self.training:
                self.health[ROLES[role]] = fp8_health(rows, s, fmt)
            return s
        if self.recipe in ("current", "tensorwise"):
            s = current_scale(x, fmt, self.margin)
            self.scale[role] = s
        else:
            s = self.scale[role].clone()  # the scale this call uses; the history update comes after
            amax = x.detach().abs().amax().float()
            self.amax_history[:, role] = roll_history(self.amax_history[:, role].clone(), amax)
            self.scale[role] = delayed_scale(
                amax_from_history(self.amax_history[:, role], self.amax_compute_algo),  # type: ignore[arg-type]
                self.scale[role], fmt, self.margin,
            )
        if self.health_due and self.training:
            self.health[ROLES[role]] = fp8_health(x, s, fmt)
        return s

    @override
    def forward(self, x: Tensor) -> Tensor:
        if self.fallback:
            return F.linear(x, self.weight, self.bias)
        out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            if self.recipe == "rowwise":
                self._scale(0, x)  # the health and the last scales; the function scales each operand itself
                self._scale(1, self.weight)
                y = fp8_linear_rowwise(x, self.weight, self.bias, self.formats[0])
                if y.requires_grad:
                    y.register_hook(self._rowwise_grad_hook)
                return y.to(out_dtype)
            xs = self._scale(0, x)
            ws = self._scale(1, self.weight)
            g_scale = self.scale[2:3].clone().reshape(())
            y = fp8_linear(x, self.weight, self.bias, xs, ws, g_scale, *self.formats)
        if y.requires_grad:
            y.register_hook(lambda grad: self._grad_hook(grad, g_scale))
        return y.to(out_dtype)

    def _rowwise_grad_hook(self, grad: Tensor) -> None:
        self._scale(2, grad)  # the health and the last scale; the backward scales the gradient itself

    def _grad_hook(self, grad: Tensor, g_scale: Tensor) -> None:
        # runs before the emulator's backward reads g_scale: set it to the scale this backward uses
        g_scale.copy_(self._scale(2, grad))


def _load_legacy_scaling(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """State dicts written before the scaling state left the module hold it as buffers: take it from
    there (and drop the keys, which a strict load would refuse)."""
    keys = (f"{prefix}amax_history", f"{prefix}scale")
    if all(k in state_dict for k in keys):
        assert isinstance(module, EmulatedFP8Linear)
        module.load_scaling_state({"amax_history": state_dict.pop(keys[0]), "scale": state_dict.pop(keys[1])},
                                  prefix.rstrip("."))


def legacy_scaling(state_dict: dict[str, Any]) -> dict[str, dict[str, Tensor]]:
    """The emulated layers' scaling state held by a module state_dict written before it moved to the
    plugin's state (``<layer>.amax_history`` and ``<layer>.scale`` beside ``<layer>.weight``), by layer."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(".amax_history"):
            layer = key[: -len(".amax_history")]
            if f"{layer}.scale" in state_dict and f"{layer}.weight" in state_dict:
                out[layer] = {"amax_history": value, "scale": state_dict[f"{layer}.scale"]}
    return out
