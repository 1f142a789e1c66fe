"""``FP8Precision``: FP8 training with per-layer health metrics and per-layer fallback to bf16."""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_stability.core.agreement import Combine, agree
from lightning_stability.core.lightning import log_metrics, rank_gather, synchronised_sources
from lightning_stability.core.modules import output_heads, within
from lightning_stability.events import get_event_log
from lightning_stability.ops.fp8 import (
    E4M3,
    E5M2,
    FP8Format,
    amax_from_history,
    current_scale,
    delayed_scale,
    fp8_health,
    fp8_linear,
    roll_history,
)
from lightning_stability.plugins import _te

BACKENDS = ("auto", "te", "emulated")
RECIPES = ("delayed", "current", "block", "mxfp8", "nvfp4")
EMULATED_RECIPES = ("delayed", "current")
FORMATS = {"hybrid": (E4M3, E5M2), "e4m3": (E4M3, E4M3)}
ROLES = ("input", "weight", "grad")
_HEALTH_KEYS = ("amax", "scale", "headroom", "overflow_frac", "underflow_frac", "snr_db")
_FLAG = "event_flag"  # gathered with the health: a layer named by an event on some rank


# block-scaled recipes quantise in blocks along both dimensions: their GEMMs need whole blocks
_BLOCK_MULTIPLE = {"block": 128, "mxfp8": 32, "nvfp4": 32}


def fp8_shape_reason(linear: nn.Linear, recipe: str = "delayed") -> str | None:
    """Why an FP8 GEMM cannot run this layer, or ``None``: Transformer Engine needs ``in_features``
    divisible by 16 and ``out_features`` by 8, and block-scaled recipes whole blocks (128 for
    ``"block"``, 32 for MXFP8 and NVFP4) along both."""
    multiple = _BLOCK_MULTIPLE.get(recipe)
    if multiple is not None:
        for name in ("in_features", "out_features"):
            if getattr(linear, name) % multiple:
                return f"{name}={getattr(linear, name)} is not divisible by {multiple} (recipe {recipe!r})"
    if linear.in_features % 16:
        return f"in_features={linear.in_features} is not divisible by 16"
    if linear.out_features % 8:
        return f"out_features={linear.out_features} is not divisible by 8"
    return None


class EmulatedFP8Linear(nn.Linear):
    """An ``nn.Linear`` whose matmul runs through the FP8 emulator (:func:`fp8_linear`) on the same
    parameters (float32 master weights), with Transformer Engine's scaling: per role (input, weight,
    output gradient) an amax history and a scale. Delayed scaling uses the scale computed from the
    history before this call, then records this call's amax; current scaling uses the tensor's own.
    Any input shape runs (the emulator has no GEMM tile rule: an odd last batch is fine).

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
        if self.recipe == "current":
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
            xs = self._scale(0, x)
            ws = self._scale(1, self.weight)
            g_scale = self.scale[2:3].clone().reshape(())
            y = fp8_linear(x, self.weight, self.bias, xs, ws, g_scale, *self.formats)
        if y.requires_grad:
            y.register_hook(lambda grad: self._grad_hook(grad, g_scale))
        return y.to(out_dtype)

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


_SHARDED = ("FSDPStrategy", "ModelParallelStrategy")


class FP8Precision(Precision):
    r"""FP8 training: the linear layers that can run in FP8 do, the rest under bf16 autocast, with
    float32 master weights.

    ``backend="auto"`` picks Transformer Engine when it imports and the GPU can run the recipe (SM 8.9+
    for per-tensor scaling, 9.0+ for ``"block"``, 10.0+ for ``"mxfp8"``/``"nvfp4"``), else the emulator
    (:class:`EmulatedFP8Linear`), and says which at fit start; ``"te"`` insists (a clear error naming
    the fix where it cannot run); ``"emulated"`` always emulates. The emulator reproduces FP8's rounding and
    saturation exactly (formats ``"hybrid"``: E4M3 forward, E5M2 gradients; ``"e4m3"``; or any
    ``formats=(FP8Format.custom(e, m), ...)`` to sweep precision) and Transformer Engine's delayed
    scaling (``amax_history_len``, ``amax_compute_algo``, ``margin``) or current scaling.

    **Which layers.** Every ``nn.Linear`` whose shape an FP8 GEMM accepts (``in_features % 16 == 0``,
    ``out_features % 8 == 0``), except the first and the last linear layer (``keep_first_last``), the
    output head (``lm_head``, ``output``, ``head``, ``classifier``), ``nn.MultiheadAttention``'s
    ``out_proj`` (MHA reads its weight itself) and names matching ``keep`` (fnmatch patterns). Any
    token count runs (on TE, a count that is no multiple of 8 is padded and sliced back). ``converted_layers`` lists the converted names, ``skipped_layers`` maps the others to the
    reason.

    **Health** (every ``health_every_n_steps`` steps, every step while a layer is unhealthy), per
    converted layer and role (``input``, ``weight``, ``grad``): ``stability/fp8/<layer>/<role>/amax``,
    ``scale``, ``headroom`` (bits: ``log2(fp8_max / (amax scale))``), ``overflow_frac`` (counted before
    the saturating cast), ``underflow_frac``, ``snr_db``; per layer the worst role's
    ``stability/fp8/<layer>/overflow_frac`` and ``underflow_frac``; ``stability/fp8/fallback_layers``.

    **Fallback.** A layer whose overflow fraction exceeds ``overflow_limit`` or whose underflow fraction
    exceeds ``underflow_limit`` in ``patience`` consecutive samples, whose amax is not finite, or that an
    event of another stability callback names as its target, runs in bf16 on the same parameters for
    ``cooldown`` steps with its amax history reset, then FP8 is tried again. Every switch is an event
    (``fp8_fallback``, ``fp8_retry``).

    **Checkpoints.** ``state_dict`` holds the fallback state and every converted layer's FP8 scaling
    state (amax histories and scales, TE's ``_extra_state``), restored exactly on resume; the module's
    own ``state_dict`` holds only the weights, so it loads before conversion and into a plain run. With
    ``fallback=False`` it only watches: an ``fp8_unhealthy`` warning per layer and incident, no switch.

    **DDP.** The health is gathered from every rank (one all-gather on health steps, none on the
    others) and each rank decides from the same numbers. Events of the stability callbacks are the
    same on every rank and act at once; an event of another source naming a layer may have happened on
    one rank only, and acts at the next health check, where the ranks agree on it.
    """

    precision = "fp8"  # type: ignore[assignment]  # Lightning's literal lists only its own strings
    synchronised_events = True  # its events are decided from the gathered health, alike on every rank

    def __init__(
        self,
        backend: str = "auto",
        recipe: str = "delayed",
        fp8_format: str = "hybrid",
        formats: tuple[FP8Format, FP8Format] | None = None,
        margin: int = 0,
        amax_history_len: int = 1024,
        amax_compute_algo: str = "max",
        keep: Sequence[str] = (),
        keep_first_last: bool = True,
        health_every_n_steps: int = 50,
        overflow_limit: float = 0.01,
        underflow_limit: float = 0.5,
        patience: int = 3,
        cooldown: int = 200,
        autocast_dtype: torch.dtype = torch.bfloat16,
        fallback: bool = True,
    ) -> None:
        owner = type(self).__name__
        if backend not in BACKENDS:
            raise ValueError(f"{owner}(backend={backend!r}): expected one of {list(BACKENDS)}")
        if recipe not in RECIPES:
            raise ValueError(f"{owner}(recipe={recipe!r}): expected one of {list(RECIPES)}")
        if fp8_format not in FORMATS:
            raise ValueError(f"{owner}(fp8_format={fp8_format!r}): expected one of {list(FORMATS)}")
        if amax_compute_algo not in ("max", "most_recent"):
            raise ValueError(f"{owner}(amax_compute_algo={amax_compute_algo!r}): expected 'max' or 'most_recent'")
        for name, value, low in (("amax_history_len", amax_history_len, 1), ("health_every_n_steps", health_every_n_steps, 1),
                                 ("patience", patience, 1), ("cooldown", cooldown, 1), ("margin", margin, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{owner}({name}={value!r}): expected an int >= {low}")
        for name, fraction in (("overflow_limit", overflow_limit), ("underflow_limit", underflow_limit)):
            if not (isinstance(fraction, (int, float)) and 0.0 <= fraction <= 1.0):
                raise ValueError(f"{owner}({name}={fraction!r}): expected a fraction in [0, 1]")
        if isinstance(keep, str):
            raise TypeError(f"{owner}(keep={keep!r}): expected a sequence of fnmatch patterns, not a str")
        if backend == "te":
            _te.check_te(recipe)  # a clear error naming the fix where TE cannot run here
            self.backend, self.backend_reason = "te", _te.te_usable(recipe)[1]
        elif backend == "auto":
            usable, why = _te.te_usable(recipe)
            self.backend, self.backend_reason = ("te", why) if usable else ("emulated", why)
        else:
            self.backend, self.backend_reason = "emulated", "requested"
        if self.backend == "emulated" and recipe not in EMULATED_RECIPES:
            raise ValueError(
                f"{owner}(recipe={recipe!r}): the emulator runs per-tensor scaling ({list(EMULATED_RECIPES)}); "
                f"block-scaled recipes need Transformer Engine on a GPU with SM>={_te.RECIPE_SM[recipe][0]}."
                f"{_te.RECIPE_SM[recipe][1]} ({self.backend_reason})."
            )
        self.requested_backend = backend
        self.fp8_format = fp8_format
        self._te_recipe: Any = (
            _te.make_recipe(recipe, fp8_format, margin, amax_history_len, amax_compute_algo) if self.backend == "te" else None
        )
        self.recipe, self.margin = recipe, margin
        self.formats = formats if formats is not None else FORMATS[fp8_format]
        self.amax_history_len, self.amax_compute_algo = amax_history_len, amax_compute_algo
        self.keep, self.keep_first_last = tuple(keep), keep_first_last
        self.health_every_n_steps = health_every_n_steps
        self.overflow_limit, self.underflow_limit = float(overflow_limit), float(underflow_limit)
        self.patience, self.cooldown = patience, cooldown
        self.autocast_dtype = autocast_dtype
        self.fallback = bool(fallback)
        self.converted_layers: list[str] = []
        self.skipped_layers: dict[str, str] = {}
        self.last_health: dict[str, float] = {}
        self._layers: dict[str, EmulatedFP8Linear | _te.TELayer] = {}
        self._state: dict[str, dict[str, int]] = {}  # layer -> {"bad": samples in a row, "until": step or -1}
        self._flagged: set[str] = set()  # layers named by other callbacks' events since the last step
        # ... by events of sources some ranks may not have seen: the ranks agree on them at the next
        # health check, with the health (under DDP; None: every source is seen by every rank)
        self._flagged_pending: set[str] = set()
        self._synchronised: set[str] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._announced = False
        self._legacy_scaling: dict[str, dict[str, Tensor]] = {}  # from an older checkpoint's module state
        self._mha_out: set[str] = set()
        self._heads: list[str] = []

    # -- conversion --------------------------------------------------------------------------------
    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        # a TE layer converted by an earlier fit (``trainer.test(ckpt_path=...)`` after ``fit`` converts
        # again) counts as the linear it replaced: te.Linear is no nn.Linear
        linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear) or _te.converted(m)]
        ends = {linears[0][0], linears[-1][0]} if linears and self.keep_first_last else set()
        # nn.MultiheadAttention reads its out_proj's weight directly (F.multi_head_attention_forward): the
        # layer's forward never runs, so a converted one would be reported in FP8 and run in high precision
        self._mha_out = {f"{n}.out_proj" if n else "out_proj" for n, m in module.named_modules()
                         if isinstance(m, nn.MultiheadAttention)}
        self._heads = output_heads(module.named_modules())  # the one head rule (core.modules)
        self.converted_layers, self.skipped_layers, self._layers = [], {}, {}
        for name, linear in linears:
            reason = self._skip_reason(name, linear, ends)
            if reason is not None:
                self.skipped_layers[name] = reason
                continue
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            if self.backend == "te":
                layer = _te.converted(linear)
                if layer is None:
                    converted = _te.convert_linear(linear)
                    setattr(parent, child, converted)
                    layer = _te.TELayer(converted, self.recipe, self.formats)
                self._layers[name] = layer
            else:
                if not isinstance(linear, EmulatedFP8Linear):
                    linear = EmulatedFP8Linear.from_linear(
                        linear, recipe=self.recipe, formats=self.formats, margin=self.margin,
                        amax_history_len=self.amax_history_len, amax_compute_algo=self.amax_compute_algo,
                    )
                    setattr(parent, child, linear)
                self._layers[name] = linear
            self.converted_layers.append(name)
            self._state.setdefault(name, {"bad": 0, "until": -1, "warned": 0})
        return module

    def _skip_reason(self, name: str, linear: nn.Module, ends: set[str]) -> str | None:
        if _te.converted(linear) is not None:
            return None  # converted by an earlier fit
        assert isinstance(linear, nn.Linear)
        if name in self._mha_out:
            return "out_proj of nn.MultiheadAttention (its weight is read directly, its forward never runs)"
        if within(name, self._heads):
            return "output head (kept in high precision)"
        if name in ends:
            return "first or last linear layer (keep_first_last=True)"
        for pattern in self.keep:
            if fnmatch.fnmatchcase(name, pattern):
                return f"matches keep pattern {pattern!r}"
        return fp8_shape_reason(linear, self.recipe)

    # -- the forward -------------------------------------------------------------------------------
    @override
    def forward_context(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for what does not run in FP8; with Transformer Engine, its FP8 autocast inside."""
        device = next((_weight(layer).device.type for layer in self._layers.values()), "cpu")
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device, dtype=self.autocast_dtype))
        if self.backend == "te":
            stack.enter_context(_te.fp8_autocast(enabled=True, recipe=self._te_recipe))
        return stack

    # -- the step: health, decisions ---------------------------------------------------------------
    def _due(self, step: int) -> bool:
        return step % self.health_every_n_steps == 0 or any(s["bad"] > 0 for s in self._state.values())

    @override
    def optimizer_step(  # type: ignore[override]
        self, optimizer: Any, model: pl.LightningModule, closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        trainer = model.trainer
        step = trainer.global_step
        self._start(trainer)
        due = self._due(step)
        for layer in self._layers.values():
            layer.health_due, layer.health = due, {}
        out = super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        for layer in self._layers.values():
            layer.health_due = False
        self._step(trainer, step, due)
        return out

    def _start(self, trainer: pl.Trainer) -> None:
        strategy = next((c.__name__ for c in type(trainer.strategy).__mro__ if c.__name__ in _SHARDED), None)
        if strategy is not None:
            # FSDP swaps whole and sharded parameters around every forward and shards the delayed-scaling
            # history with them; per-layer amax, health and fallback are not defined for that yet.
            raise RuntimeError(
                f"FP8Precision cannot serve {strategy}: its FP8 layers keep per-layer scales and health "
                "statistics of whole weights, which FSDP shards. Use DDP or a single device for FP8, or "
                "precision='bf16-mixed' under FSDP."
            )
        if self._unsubscribe is None:
            self._synchronised = synchronised_sources(trainer) if trainer.world_size > 1 else None
            self._unsubscribe = get_event_log(trainer).subscribe(self._on_event)
        if not self._announced:
            self._announced = True
            rank_zero_info(
                f"FP8Precision: backend {self.backend!r} (requested {self.requested_backend!r}: {self.backend_reason}); "
                f"{len(self.converted_layers)} layers in FP8, {len(self.skipped_layers)} kept in high precision."
            )

    def _on_event(self, event: Any) -> None:
        if event.target in self._layers and event.source != "FP8Precision" and event.severity != "info":
            if self._synchronised is None or event.source in self._synchronised:
                self._flagged.add(event.target)
            else:
                self._flagged_pending.add(event.target)

    def _step(self, trainer: pl.Trainer, step: int, due: bool) -> None:
        values: dict[str, Tensor] = {}
        if due:
            for name, layer in self._layers.items():
                for role, health in layer.health.items():
                    for key in _HEALTH_KEYS:
                        values[f"{name}/{role}/{key}"] = health[key]
            if self._synchronised is not None:
                zero = torch.zeros((), device=next(iter(values.values())).device) if values else torch.zeros(())
                for name in self._layers:
                    values[f"{name}/{_FLAG}"] = zero + float(name in self._flagged_pending)
        # One all-gather on health steps, none on the others: the events every rank saw need no agreement.
        stats = _gather(trainer, values)
        flagged = self._flagged | {name for name in self._layers if stats.pop(f"{name}/{_FLAG}", 0.0) > 0}
        self._flagged = set()
        if due:
            self._flagged_pending = set()
        self.last_health = stats
        metrics: dict[str, float] = {}
        for name, layer in self._layers.items():
            state = self._state[name]
            if layer.fallback:
                if step >= state["until"]:
                    layer.fallback = False
                    layer.reset_scaling()
                    state["bad"], state["until"] = 0, -1
                    self._emit(trainer, "fp8_retry", "info", {"cooldown": float(self.cooldown)}, "fp8", name)
                continue
            over = max((stats.get(f"{name}/{r}/overflow_frac", 0.0) for r in ROLES), default=0.0)
            under = max((stats.get(f"{name}/{r}/underflow_frac", 0.0) for r in ROLES), default=0.0)
            amaxes = [stats[f"{name}/{r}/amax"] for r in ROLES if f"{name}/{r}/amax" in stats]
            if due:
                metrics[f"stability/fp8/{name}/overflow_frac"] = over
                metrics[f"stability/fp8/{name}/underflow_frac"] = under
            nonfinite = any(not math.isfinite(a) for a in amaxes)
            if due and (over > self.overflow_limit or under > self.underflow_limit):
                state["bad"] += 1
            elif due:
                state["bad"] = 0
            reason = ("nonfinite_amax" if nonfinite else "event" if name in flagged
                      else "health" if state["bad"] >= self.patience else None)
            if reason is not None and not self.fallback:
                # watching only: one warning per incident (until the layer is healthy again)
                if not state.get("warned"):
                    state["warned"] = 1
                    self._emit(trainer, "fp8_unhealthy", "warning", {"overflow_frac": over, "underflow_frac": under},
                               None, name)
                state["bad"] = 0 if reason == "health" else state["bad"]
            elif reason is None and due and state["bad"] == 0:
                state["warned"] = 0
            if reason is not None and self.fallback:
                layer.fallback = True
                layer.reset_scaling()
                state["bad"], state["until"] = 0, step + self.cooldown
                self._emit(trainer, "fp8_fallback", "warning",
                           {"overflow_frac": over, "underflow_frac": under, "until_step": float(state["until"])},
                           f"bf16:{reason}", name)
        if due:
            metrics.update({f"stability/fp8/{k}": v for k, v in stats.items()})
            metrics["stability/fp8/fallback_layers"] = float(sum(layer.fallback for layer in self._layers.values()))
            log_metrics(trainer, metrics, force=True)

    def _emit(self, trainer: pl.Trainer, kind: str, severity: str, metrics: dict[str, float], action: str | None,
              target: str) -> None:
        get_event_log(trainer).emit(trainer.global_step, kind, "FP8Precision", severity, metrics, action, target)

    @property
    def fallback_layers(self) -> list[str]:
        """The converted layers running in bf16 now."""
        return [name for name, layer in self._layers.items() if layer.fallback]

    # -- state ---------------------------------------------------------------------------------------
    # Lightning restores the module's weights before the strategy's setup converts the module, and this
    # plugin's state (under its class qualname) after: the FP8 scaling state lives here, not in the
    # module's state_dict, so it is restored into the converted layers and the weights load anywhere.
    @override
    def state_dict(self) -> dict[str, Any]:
        """Which layers are in fallback and until when, and every converted layer's scaling state (the
        emulator's amax history and scales; Transformer Engine's ``_extra_state``, its FP8 metadata)."""
        return {
            "layers": {name: dict(state) for name, state in self._state.items()},
            "fallback": sorted(self.fallback_layers),
            "backend": self.backend,
            "scaling": {name: layer.scaling_state() for name, layer in self._layers.items()},
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # a checkpoint written before the scaling state moved here holds it in the module's state_dict
        # (loaded with ``strict_loading=False``, which skips those keys): take it from there
        state = checkpoint.get(type(self).__qualname__)
        if isinstance(state, dict) and "scaling" not in state:
            self._legacy_scaling = legacy_scaling(checkpoint.get("state_dict", {}))

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._state = {str(k): {"bad": int(v.get("bad", 0)), "until": int(v.get("until", -1)),
                                "warned": int(v.get("warned", 0))}
                       for k, v in dict(state_dict.get("layers", {})).items()}
        fallback = set(state_dict.get("fallback", ()))
        for name, layer in self._layers.items():
            layer.fallback = name in fallback
            self._state.setdefault(name, {"bad": 0, "until": -1, "warned": 0})
        if "scaling" in state_dict:
            scaling, backend = dict(state_dict["scaling"]), state_dict.get("backend", "emulated")
        else:
            scaling, backend = self._legacy_scaling, "emulated"
        self._legacy_scaling = {}
        if scaling and backend != self.backend:
            rank_zero_warn(f"FP8Precision: the checkpoint's FP8 scaling state was written by the {backend!r} "
                           f"backend; this run uses {self.backend!r}, so its layers start with fresh scales.")
            return
        missing = sorted(set(self._layers) - set(scaling)) if scaling else []
        unknown = sorted(set(scaling) - set(self._layers))
        if missing or unknown:
            rank_zero_warn(f"FP8Precision: the checkpoint's FP8 scaling state does not match this run's converted "
                           f"layers; fresh scales for {missing}, ignored for {unknown}.")
        for name, layer in self._layers.items():
            if name in scaling:
                layer.load_scaling_state(scaling[name], name)

    @override
    def teardown(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None


def _weight(layer: EmulatedFP8Linear | _te.TELayer) -> Tensor:
    return (layer.module if isinstance(layer, _te.TELayer) else layer).get_parameter("weight")


def _gather(trainer: pl.Trainer, values: dict[str, Tensor]) -> dict[str, float]:
    """On the host, the same on every rank: one all-gather under DDP, the worst rank's value (the
    largest amax, overflow and underflow; the smallest headroom, scale and SNR)."""
    return agree(values, _worst, rank_gather(trainer))


def _worst(key: str) -> Combine:
    return "min" if key.rsplit("/", 1)[-1] in ("headroom", "scale", "snr_db") else "max"


