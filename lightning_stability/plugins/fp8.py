"""``FP8Precision``: FP8 training with per-layer health metrics and per-layer fallback to bf16."""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_stability.core.agreement import Combine, agree
from lightning_stability.core.escalation import Hysteresis
from lightning_stability.core.lightning import log_metrics, rank_gather, synchronised_sources
from lightning_stability.core.modules import output_heads, within
from lightning_stability.events import get_event_log
from lightning_stability.ops.fp8 import (
    E4M3,
    E5M2,
    FP8Format,
)
from lightning_stability.plugins import _te, _torchao
from lightning_stability.plugins._backend import (
    BACKENDS,
    EMULATED_RECIPES,
    RECIPES,
    choose_backend,
    fp8_shape_reason,
    linear_like,
    why_nothing_converted,
)
from lightning_stability.plugins._emulated import ROLES, EmulatedFP8Linear, legacy_scaling

__all__ = ["BACKENDS", "EMULATED_RECIPES", "RECIPES", "FP8Precision", "fp8_shape_reason"]
FORMATS = {"hybrid": (E4M3, E5M2), "e4m3": (E4M3, E4M3)}
_HEALTH_KEYS = ("amax", "scale", "headroom", "overflow_frac", "underflow_frac", "snr_db")
_FLAG = "event_flag"  # gathered with the health: a layer named by an event on some rank


_SHARDED = ("FSDPStrategy", "ModelParallelStrategy")


class FP8Precision(Precision):
    r"""FP8 training: the linear layers that can run in FP8 do, the rest under bf16 autocast, with
    float32 master weights.

    ``backend="auto"`` picks Transformer Engine when it imports and the GPU can run the recipe (SM 8.9+
    for per-tensor scaling, 9.0+ for ``"block"``, 10.0+ for ``"mxfp8"``/``"nvfp4"``), else torchao's
    float8 training (``"torchao"``, SM 8.9+), else the emulator (:class:`EmulatedFP8Linear`), and says
    which at fit start; ``"te"`` and ``"torchao"`` insist (a clear error naming the fix where they cannot
    run); ``"emulated"`` always emulates. The emulator reproduces FP8's rounding and
    saturation exactly (formats ``"hybrid"``: E4M3 forward, E5M2 gradients; ``"e4m3"``; or any
    ``formats=(FP8Format.custom(e, m), ...)`` to sweep precision) and Transformer Engine's delayed
    scaling (``amax_history_len``, ``amax_compute_algo``, ``margin``) or current scaling, and torchao's
    ``"tensorwise"`` and ``"rowwise"`` recipes (one power-of-two scale per row of each GEMM operand).

    **Which layers.** Every ``nn.Linear`` whose shape an FP8 GEMM accepts (``in_features % 16 == 0``,
    ``out_features % 8 == 0``), except the first and the last linear layer (``keep_first_last``), the
    output head (``lm_head``, ``output``, ``head``, ``classifier``), ``nn.MultiheadAttention``'s
    ``out_proj`` (MHA reads its weight itself) and names matching ``keep`` (fnmatch patterns). Any
    token count runs (on TE, a count that is no multiple of 8 is padded and sliced back). ``converted_layers``
    lists the converted names, ``skipped_layers`` maps the others (and transformers' ``Conv1D``, GPT-2's
    projections, which no backend takes) to the reason; a fit with no layer in FP8 starts with a warning.

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

    **FSDP2** (``ModelParallelStrategy``, torchao only): the model converts itself in ``configure_model``
    before ``fully_shard``. ``float8_all_gather=True`` (``recipe="tensorwise"``) has FSDP2 all-gather the
    converted weights in float8, half the bytes of bf16, their scales computed in one all-reduce as each
    forward starts; the weights' health is then taken after the backward from the whole weights.

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
        recipe: str | None = None,
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
        float8_all_gather: bool = False,
    ) -> None:
        owner = type(self).__name__
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
        self.backend, self.backend_reason, recipe = choose_backend(owner, backend, recipe)
        _torchao.check_all_gather(owner, self.backend, recipe, float8_all_gather)
        self.float8_all_gather = float8_all_gather
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
        self._layers: dict[str, EmulatedFP8Linear | _te.TELayer | _torchao.TorchaoLayer] = {}
        # per layer: set after ``patience`` unhealthy samples in a row (or at once: a non-finite amax, an
        # event). With fallback it stays set for ``cooldown`` steps (the layer in bf16), then FP8 is
        # tried again; watching only, it clears at the next healthy sample (one warning per incident).
        self._health = Hysteresis(patience, cooldown if self.fallback else 1)
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
        self._module: nn.Module | None = None  # the converted model (the float8 all-gather's scales)

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
        self.converted_layers, self._layers, self._module = [], {}, module
        self.skipped_layers = linear_like(module)  # GPT-2's Conv1D: listed, with why it stays as it is
        for_torchao: list[str] = []
        for name, linear in linears:
            reason = self._skip_reason(name, linear, ends)
            if reason is not None:
                self.skipped_layers[name] = reason
                continue
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            if self.backend == "torchao":
                for_torchao.append(name)  # converted together below, torchao's module filter naming them
            elif self.backend == "te":
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
        fresh = {n for n in for_torchao if _torchao.converted(module.get_submodule(n)) is None}
        if fresh:
            _torchao.convert(module, fresh, self.recipe, self.float8_all_gather)
        for name in for_torchao:
            sub = module.get_submodule(name)
            self._layers[name] = _torchao.converted(sub) or _torchao.TorchaoLayer(sub, self.recipe, self.formats)
        return module

    def _skip_reason(self, name: str, linear: nn.Module, ends: set[str]) -> str | None:
        if _te.converted(linear) is not None or _torchao.converted(linear) is not None:
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
        if self.float8_all_gather and self._module is not None:
            _torchao.precompute_scales(self._module)  # before this forward's all-gathers
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device, dtype=self.autocast_dtype))
        if self.backend == "te":
            stack.enter_context(_te.fp8_autocast(enabled=True, recipe=self._te_recipe))
        return stack

    # -- the step: health, decisions ---------------------------------------------------------------
    def _due(self, step: int) -> bool:
        return step % self.health_every_n_steps == 0 or any(n > 0 for n in self._health.bad.values())

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
        if self.float8_all_gather:  # the weights' health after the backward: the forward saw them in float8
            closure = _torchao.with_weight_health(closure, [layer for layer in self._layers.values()
                                                            if isinstance(layer, _torchao.TorchaoLayer)])
        out = super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        for layer in self._layers.values():
            layer.health_due = False
        self._step(trainer, step, due)
        return out

    def _start(self, trainer: pl.Trainer) -> None:
        strategy = next((c.__name__ for c in type(trainer.strategy).__mro__ if c.__name__ in _SHARDED), None)
        if strategy is not None and not (self.backend == "torchao" and strategy == "ModelParallelStrategy"):
            # FSDP swaps whole and sharded parameters around every forward and shards the delayed-scaling
            # history with them; per-layer amax, health and fallback are not defined for that. torchao's
            # dynamic scaling keeps no history: under FSDP2 its layers are converted before the sharding.
            raise RuntimeError(
                f"FP8Precision(backend={self.backend!r}) cannot serve {strategy}: its FP8 layers keep per-layer "
                "scales and health statistics of whole weights, which FSDP shards. Use DDP or a single device "
                f"for FP8, or precision='bf16-mixed' under FSDP.{_torchao.FSDP2_WAY}"
            )
        if self._unsubscribe is None:
            self._synchronised = synchronised_sources(trainer) if trainer.world_size > 1 else None
            self._unsubscribe = get_event_log(trainer).subscribe(self._on_event)
        if not self._announced:
            self._announced = True
            message = (f"FP8Precision: backend {self.backend!r} (requested {self.requested_backend!r}: {self.backend_reason}); "
                       f"{len(self.converted_layers)} layers in FP8, {len(self.skipped_layers)} kept in high precision.")
            if self.converted_layers:
                rank_zero_info(message)
            else:  # FP8 asked for and nothing in it: say so, and why
                rank_zero_warn(f"{message} No layer runs in FP8: {why_nothing_converted(self.skipped_layers)}.")

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
        retry = set(self._health.expire(step)) if self.fallback else set()
        for name, layer in self._layers.items():
            if layer.fallback:
                if name in retry:
                    layer.fallback = False
                    layer.reset_scaling()
                    self._emit(trainer, "fp8_retry", "info", {"cooldown": float(self.cooldown)}, "fp8", name)
                continue
            over = max((stats.get(f"{name}/{r}/overflow_frac", 0.0) for r in ROLES), default=0.0)
            under = max((stats.get(f"{name}/{r}/underflow_frac", 0.0) for r in ROLES), default=0.0)
            amaxes = [stats[f"{name}/{r}/amax"] for r in ROLES if f"{name}/{r}/amax" in stats]
            if due:
                metrics[f"stability/fp8/{name}/overflow_frac"] = over
                metrics[f"stability/fp8/{name}/underflow_frac"] = under
            nonfinite = any(not math.isfinite(a) for a in amaxes)
            was_set = self._health.is_set(name)
            if due:
                self._health.observe(name, over > self.overflow_limit or under > self.underflow_limit, step)
            if nonfinite or name in flagged:
                self._health.trip(name, step)
            reason = ("nonfinite_amax" if nonfinite else "event" if name in flagged else "health")
            if was_set or not self._health.is_set(name):
                continue  # healthy, or an incident already answered
            self._health.bad[name] = 0  # the next incident counts its samples afresh
            if not self.fallback:
                # watching only: one warning per incident (until the layer is healthy again)
                self._emit(trainer, "fp8_unhealthy", "warning", {"overflow_frac": over, "underflow_frac": under},
                           None, name)
                continue
            layer.fallback = True
            layer.reset_scaling()
            self._emit(trainer, "fp8_fallback", "warning",
                       {"overflow_frac": over, "underflow_frac": under, "until_step": float(step + self.cooldown)},
                       f"bf16:{reason}", name)
        if due:
            metrics.update({f"stability/fp8/{k}": v for k, v in stats.items()})
            metrics["stability/fp8/fallback_layers"] = float(sum(layer.fallback for layer in self._layers.values()))
            log_metrics(trainer, metrics, force=True)

    def _emit(self, trainer: pl.Trainer, kind: str, severity: str, metrics: dict[str, float], action: str | None,
              target: str) -> None:
        get_event_log(trainer).emit(trainer.global_step, kind, "FP8Precision", severity, metrics, action, target)

    def _layer_state(self, name: str) -> dict[str, int]:
        """A layer's health in the checkpoint's terms: unhealthy samples in a row, the step its
        fallback ends (-1: none), whether this incident was warned about (watching only)."""
        since = self._health.since.get(name)
        until = since + self.cooldown if since is not None and self.fallback and self._layers[name].fallback else -1
        return {"bad": self._health.bad.get(name, 0), "until": until, "warned": int(since is not None and not self.fallback)}

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
            "layers": {name: self._layer_state(name) for name in self._layers},
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
        self._health = Hysteresis(self.patience, self.cooldown if self.fallback else 1)
        for name, state in dict(state_dict.get("layers", {})).items():
            self._health.bad[str(name)] = int(state.get("bad", 0))
            if int(state.get("until", -1)) >= 0:  # in fallback until that step
                self._health.since[str(name)] = int(state["until"]) - self.cooldown
            elif int(state.get("warned", 0)):  # warned in this incident (watching only)
                self._health.since[str(name)] = -1
        fallback = set(state_dict.get("fallback", ()))
        for name, layer in self._layers.items():
            layer.fallback = name in fallback
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


def _weight(layer: EmulatedFP8Linear | _te.TELayer | _torchao.TorchaoLayer) -> Tensor:
    return (layer if isinstance(layer, EmulatedFP8Linear) else layer.module).get_parameter("weight")


def _gather(trainer: pl.Trainer, values: dict[str, Tensor]) -> dict[str, float]:
    """On the host, the same on every rank: one all-gather under DDP, the worst rank's value (the
    largest amax, overflow and underflow; the smallest headroom, scale and SNR)."""
    return agree(values, _worst, rank_gather(trainer))


def _worst(key: str) -> Combine:
    return "min" if key.rsplit("/", 1)[-1] in ("headroom", "scale", "snr_db") else "max"


