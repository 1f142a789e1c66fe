"""The torchao side of ``FP8Precision``: availability and hardware checks, the float8 training
conversion (torchao's ``convert_to_float8_training`` with its recipes, our layer filter as its module
filter), and what the plugin needs of each converted layer (:class:`TorchaoLayer`).

torchao is imported only here and only when the torchao backend is used. Its float8 training scales
dynamically (``tensorwise``: one scale per tensor from its amax, every step; ``rowwise``: one per
row): there is no amax history to keep or reset, and a converted layer's state_dict holds only its
weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from lightning_utilities.core.imports import RequirementCache
from torch import Tensor, nn

from lightning_stability.ops.fp8 import E4M3, E5M2, FP8Format, current_scale, fp8_health, row_scales
from lightning_stability.ops.sharded import is_dtensor
from lightning_stability.plugins._te import device_capability

TORCHAO_AVAILABLE = RequirementCache("torchao>=0.9")
RECIPES = ("tensorwise", "rowwise")
MIN_SM = (8, 9)  # FP8 tensor cores: Ada, Hopper and later
_INSTALL = 'pip install "lightning-stability[fp8-torchao]" (torchao; CUDA machines with SM 8.9+)'
_MARK = "_lightning_stability_torchao_layer"
FSDP2_WAY = (" For FP8 under FSDP2: FP8Precision(backend='torchao') with ModelParallelStrategy, the model converted "
             "in configure_model before fully_shard (self.trainer.precision_plugin.convert_module(self)).")


def torchao_usable() -> tuple[bool, str]:
    """Whether torchao's float8 training can run here, and why not."""
    if not TORCHAO_AVAILABLE:
        return False, "torchao is not installed"
    sm = device_capability()
    if sm is None:
        return False, "CUDA is not available"
    if sm < MIN_SM:
        return False, f"this GPU is SM{sm[0]}{sm[1]}; torchao's float8 training needs SM>={MIN_SM[0]}.{MIN_SM[1]}"
    return True, f"torchao float8 on SM{sm[0]}{sm[1]}"


def check_torchao() -> None:
    """Raise a clear error when the torchao backend cannot run here, saying what it needs."""
    ok, why = torchao_usable()
    if ok:
        return
    study = "Use FP8Precision(backend='emulated') to study FP8 numerics on this machine."
    if not TORCHAO_AVAILABLE:
        raise ModuleNotFoundError(f"FP8Precision(backend='torchao') needs torchao: {_INSTALL}. {study}")
    raise RuntimeError(f"FP8Precision(backend='torchao') needs a CUDA GPU with SM>=8.9; {why}. {study}")


def check_all_gather(owner: str, backend: str, recipe: str, float8_all_gather: bool) -> None:
    """``float8_all_gather=True`` asks torchao to all-gather FSDP2's weights in float8: its tensorwise
    recipe only (one scale per weight, agreed across the ranks before the cast)."""
    if not isinstance(float8_all_gather, bool):
        raise TypeError(f"{owner}(float8_all_gather={float8_all_gather!r}): expected True or False")
    if float8_all_gather and (backend, recipe) != ("torchao", "tensorwise"):
        raise ValueError(f"{owner}(float8_all_gather=True): torchao's float8 all-gather under FSDP2 serves "
                         f"backend='torchao' with recipe='tensorwise'; this plugin runs backend={backend!r}, "
                         f"recipe={recipe!r}.")


def convert(module: nn.Module, names: set[str], recipe: str, float8_all_gather: bool = False) -> None:
    """Convert the ``nn.Linear`` layers named ``names`` (and no other) with torchao's float8 training;
    ``float8_all_gather``: its weights all-gathered by FSDP2 in float8 (torchao wraps them)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    # torchao converts whole weights: under FSDP2 before fully_shard, which shards the converted layers
    sharded = sorted(n for n in names if is_dtensor(module.get_submodule(n).get_parameter("weight")))
    if sharded:
        raise RuntimeError(
            f"FP8Precision(backend='torchao'): the layers {sharded[:3]}{' ...' if len(sharded) > 3 else ''} are "
            "sharded already; torchao converts whole weights. In configure_model, call "
            "self.trainer.precision_plugin.convert_module(self) after building the layers and before fully_shard."
        )
    config = Float8LinearConfig.from_recipe_name(recipe)
    if float8_all_gather:
        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    convert_to_float8_training(module, config=config, module_filter_fn=lambda mod, fqn: fqn in names)


def precompute_scales(module: nn.Module) -> None:
    """With the float8 all-gather: every sharded weight's scale from its whole amax, in one all-reduce
    for all of them (torchao's ``precompute_float8_dynamic_scale_for_fsdp``; without it, one per weight
    in each all-gather). Called as a forward starts, so the scales are those of the weights this
    forward uses, after any rollback or edit since the optimizer step."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(module)


def with_weight_health(closure: Callable[[], Any], layers: list[TorchaoLayer]) -> Callable[[], Any]:
    """``closure`` (forward and backward), then the health of the weights the forward saw only in
    float8 (:meth:`TorchaoLayer.weight_health`), before the optimizer changes them."""
    def run() -> Any:
        out = closure()
        for layer in layers:
            layer.weight_health()
        return out
    return run


def _unsharded_high_precision(weight: Tensor) -> Tensor | None:
    """The weight as a layer's forward sees it, in high precision; ``None`` where FSDP2 gathered it in
    float8 (torchao's float8 all-gather: a ``Float8TrainingTensor``)."""
    return None if hasattr(weight, "to_original_precision") else weight


def converted(module: nn.Module) -> TorchaoLayer | None:
    layer = module.__dict__.get(_MARK)
    return layer if isinstance(layer, TorchaoLayer) else None


class TorchaoLayer:
    """What ``FP8Precision`` needs of a layer torchao converted: a fallback switch (the layer runs as
    the ``nn.Linear`` it subclasses, under the plugin's bf16 autocast) and health captured by hooks
    on sampled steps, in the formats and with the scales torchao's cast uses: ``tensorwise``, each
    tensor's amax, E4M3 forward and E5M2 for the output gradient; ``rowwise``, one power-of-two scale
    per row (:func:`~lightning_stability.ops.fp8.row_scales`: per token, per output feature) and E4M3
    for every role. Dynamic scaling keeps no history: nothing to reset or save.

    With torchao's float8 all-gather (FSDP2) the forward sees the weight only in float8: its health is
    taken after the backward from the whole weight (one all-gather per layer, on health steps only),
    and a fallen-back layer runs its bf16 GEMM on the float8 weight dequantised (the all-gather ships
    nothing else), so the input and gradient casts leave FP8 and the weight keeps its E4M3 rounding."""

    def __init__(self, module: nn.Module, recipe: str, formats: tuple[FP8Format, FP8Format] = (E4M3, E5M2)) -> None:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"FP8Precision: torchao returned {type(module).__name__} for an nn.Linear; expected "
                            "its Float8Linear (an nn.Linear subclass). This torchao version is not supported.")
        self.module, self.recipe, self.formats = module, recipe, formats
        self.fallback = False
        self.health_due = False
        self.health: dict[str, dict[str, Tensor]] = {}
        fp8_forward = module.forward

        def guarded_forward(x: Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.fallback:
                weight = module.get_parameter("weight")
                if _unsharded_high_precision(weight) is None:
                    weight = weight.to_original_precision()  # type: ignore[attr-defined]
                return F.linear(x, weight, module.bias)
            return fp8_forward(x, *args, **kwargs)

        module.forward = guarded_forward  # type: ignore[method-assign,assignment]
        module.register_forward_pre_hook(self._input_hook)
        module.register_full_backward_hook(self._grad_hook)
        module.__dict__[_MARK] = self

    def scaling_state(self) -> dict[str, Any]:
        return {}  # dynamic scaling: nothing but the weights, which the module saves

    def load_scaling_state(self, state: dict[str, Any], name: str = "") -> None:
        return None

    def reset_scaling(self) -> None:
        return None

    def _input_hook(self, module: nn.Module, args: Any) -> None:
        if not (self.health_due and module.training and not self.fallback and args):
            return
        # under FSDP2 the weight is whole here: fully_shard's pre-forward gathers it first, also where the
        # layer itself is sharded (tests/callbacks/test_fsdp.py, the "layers" mode)
        self.health["input"] = self._health(args[0], self.formats[0])
        weight = _unsharded_high_precision(module.get_parameter("weight"))
        if weight is not None:
            self.health["weight"] = self._health(weight, self.formats[0])

    def weight_health(self) -> None:
        """After the backward, the weight's health where the forward could not take it (gathered in
        float8): from the whole high-precision weight, assembled from the shards."""
        if not (self.health_due and not self.fallback and "input" in self.health and "weight" not in self.health):
            return
        weight = self.module.get_parameter("weight")
        whole = weight.full_tensor() if is_dtensor(weight) else weight  # type: ignore[attr-defined]
        if _unsharded_high_precision(whole) is not None:
            self.health["weight"] = self._health(whole.detach(), self.formats[0])

    def _grad_hook(self, module: nn.Module, grad_input: Any, grad_output: Any) -> None:
        if not (self.health_due and not self.fallback and grad_output and grad_output[0] is not None):
            return
        # torchao's rowwise recipe casts the output gradient to E4M3 too
        self.health["grad"] = self._health(grad_output[0], self.formats[0 if self.recipe == "rowwise" else 1])

    def _health(self, x: Tensor, fmt: FP8Format) -> dict[str, Tensor]:
        if self.recipe == "rowwise":
            return fp8_health(*row_scales(x, fmt), fmt)
        return fp8_health(x, current_scale(x, fmt), fmt)
