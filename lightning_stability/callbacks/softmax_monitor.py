"""``SoftmaxSaturationMonitor``: output and attention softmax saturation, and the remedies."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from typing_extensions import override

from lightning_stability.callbacks._base import (
    StabilityCallback,
    check_fraction,
    check_int,
    check_positive,
    log_to_loggers,
    sharded_strategy,
)
from lightning_stability.ops.saturation import (
    QKProjection,
    apply_qk_clip,
    attention_stats,
    find_qk_projection,
    nlm_alignment,
    nlm_from_sums,
    perpendicular_grad_,
    sample_rows,
    sharded_nlm_and_perp_sums,
    sharded_perpendicular_grad_,
    softcap,
    softcapped_attention,
    softmax_stats,
    z_loss_grad,
    zero_loss_fraction,
)
from lightning_stability.ops.sharded import all_reduce_sum_, local

SOFTMAX_REMEDIES = ("z_loss", "softcap", "perp_grad", "qk_clip", "attn_softcap", "advise")
# What each detection may get, in order; ``advise`` is an event naming the structural fix.
DEFAULT_REMEDIES: dict[str, tuple[str, ...]] = {
    "logit_drift": ("z_loss", "softcap", "advise"),
    "softmax_collapse": ("perp_grad", "advise"),
    "attention_collapse": ("advise",),
    # attn_softcap is a rung to opt into: on examples/attention_logit_growth.py climbing to it after QK-clip
    # ended worse than QK-clip alone (docs/softmax.md)
    "attention_logit_growth": ("qk_clip", "advise"),
}
ADVICE = {
    "logit_drift": "add z-loss to the loss (lightning_stability.z_loss) or compute the loss in float32",
    "softmax_collapse": (
        "switch the loss to lightning_stability.stablemax_cross_entropy, keep the perpendicular gradient, "
        "or compute the loss in float64"
    ),
    "attention_collapse": "add qk-norm (LayerNorm/RMSNorm on q and k) or sigmaReparam to the attention",
    "attention_logit_growth": (
        "add qk-norm, build the attention soft-cap into the model (as Gemma 2 does), or lower the learning rate"
    ),
}
_OUT_KEYS = ("logz_mean", "logz_std", "logz_max", "max_logit", "pmax_mean")
_HEAD_NAMES = ("lm_head", "output", "head", "classifier")
# scaled_dot_product_attention's positional parameters, in order (a builtin: no signature to read)
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class _Capture(TorchFunctionMode):
    """Active during a sampled forward: sees every ``scaled_dot_product_attention`` and
    ``multi_head_attention_forward`` call and hands q and k to the monitor."""

    def __init__(self, monitor: SoftmaxSaturationMonitor) -> None:
        super().__init__()
        self.monitor = monitor

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.monitor._attention_call(args, kwargs)
        elif func is F.multi_head_attention_forward:
            self.monitor._mha_call(args, kwargs)
        return func(*args, **kwargs)


class _FunctionPatch:
    """``torch.nn.functional.scaled_dot_product_attention`` and ``multi_head_attention_forward`` replaced
    by ``wrap(sdpa, mha)``'s two functions while entered, the originals put back on exit."""

    def __init__(self, monitor: SoftmaxSaturationMonitor) -> None:
        self.monitor = monitor
        self.saved: dict[str, Any] = {}

    def wrap(self, sdpa: Callable[..., Any], mha: Callable[..., Any]) -> tuple[Callable[..., Any], Callable[..., Any]]:
        raise NotImplementedError

    def __enter__(self) -> _FunctionPatch:
        sdpa, mha = F.scaled_dot_product_attention, F.multi_head_attention_forward
        self.saved = {"scaled_dot_product_attention": sdpa, "multi_head_attention_forward": mha}
        sdpa_wrapper, mha_wrapper = self.wrap(sdpa, mha)
        F.scaled_dot_product_attention = sdpa_wrapper  # type: ignore[assignment]
        F.multi_head_attention_forward = mha_wrapper  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, fn in self.saved.items():
            setattr(F, name, fn)
        self.saved = {}


class _Patch(_FunctionPatch):
    """The cheaper capture: the two attention functions replaced by wrappers for the sampled forward
    only. It sees every call made through the module attribute (``F.scaled_dot_product_attention(...)``,
    as PyTorch's own modules, Hugging Face transformers and nanoGPT-style code do) and costs nothing on
    other ops; a function bound at import (``from torch.nn.functional import
    scaled_dot_product_attention``) needs ``capture="mode"``."""

    def wrap(self, sdpa: Callable[..., Any], mha: Callable[..., Any]) -> tuple[Callable[..., Any], Callable[..., Any]]:
        monitor = self.monitor

        def sdpa_wrapper(*args: Any, **kwargs: Any) -> Any:
            monitor._attention_call(args, kwargs)
            return sdpa(*args, **kwargs)

        def mha_wrapper(*args: Any, **kwargs: Any) -> Any:
            monitor._mha_call(args, kwargs)
            return mha(*args, **kwargs)

        return sdpa_wrapper, mha_wrapper


class _AttentionSoftcap(_FunctionPatch):
    """The ``attn_softcap`` remedy, in force for one batch's forward: every
    ``torch.nn.functional.scaled_dot_product_attention`` call becomes :func:`softcapped_attention`.
    No fused SDPA kernel soft-caps, so this runs the attention as math and materialises the logits:
    the first call of a fit warns with what that costs at its shape. ``nn.MultiheadAttention`` reaches
    SDPA only with ``need_weights=False``; its other path is left uncapped, with a warning."""

    def wrap(self, sdpa: Callable[..., Any], mha: Callable[..., Any]) -> tuple[Callable[..., Any], Callable[..., Any]]:
        monitor, cap = self.monitor, self.monitor.attention_softcap

        def capped(*args: Any, **kwargs: Any) -> Any:
            bound = dict(zip(_SDPA_PARAMS, args))
            bound.update(kwargs)
            monitor._softcap_cost(bound["query"], bound["key"])
            if isinstance(monitor._capture, _Capture):
                # a TorchFunctionMode does not see this Python function: record the call here
                monitor._attention_call(args, kwargs)
            return softcapped_attention(**bound, cap=cap)

        def mha_wrapper(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("need_weights", True):
                monitor._softcap_skipped("nn.MultiheadAttention with need_weights=True")
            return mha(*args, **kwargs)

        return capped, mha_wrapper


class SoftmaxSaturationMonitor(StabilityCallback):
    r"""Measures how saturated the output and attention softmaxes are, and acts before they break.

    **Output softmax.** The logits come from ``training_step``'s output (``outputs[logits_key]``) when
    it returns them, else from a forward hook on the head module (``head``; by default the first of
    ``lm_head``, ``output``, ``head``, ``classifier``, else the last ``nn.Linear``). On sampled steps:
    the log-partition ``log Z`` (mean, std, max), the largest logit, the mean top probability, the
    fraction of rows whose softmax is exactly one-hot in the loss's dtype (``sc_frac``) and the 1st
    percentile of the collapse headroom in nats (``sc_headroom_p01``: ``p ln 2 + log sum_{j != top}
    exp(z_j - z_top)``, ``p`` the significand bits), the fraction of exactly-zero per-sample losses
    (where the targets are found: ``outputs[targets_key]`` or ``batch[targets_key]``), and the
    alignment ``cos(-g, w)`` of each weight's gradient with the weight (naive loss minimisation).

    **Attention.** During sampled forwards the monitor sees every call of
    ``torch.nn.functional.scaled_dot_product_attention`` (and ``nn.MultiheadAttention``'s
    ``multi_head_attention_forward``): by default (``capture="patch"``) through wrappers put in place of
    the two functions for that forward, or (``capture="mode"``) through a ``TorchFunctionMode``, which
    also sees a function bound at import but routes every op of the forward through Python; attributes it to the innermost module of the model that made
    it, and recomputes the scores in float32 for ``attention_rows`` random query rows plus the last of
    ``attention_batch`` random sequences of the batch (never the whole ``T x T`` for the batch), with the call's scale, mask and causality. Per layer:
    ``entropy_min`` and ``entropy_median`` (over heads, of each head's mean row entropy divided by
    ``log n_i``, ``n_i`` the keys row ``i`` sees), ``max_logit``, ``pmax_p99``, ``headroom_min``.

    **Sampling.** Every ``every_n_steps`` steps, and every step while a detection is active. The
    statistics stay on the device until the sampled step ends; under DDP they are gathered in one
    collective on sampled steps only, so every rank decides alike.

    **Detections** (after ``warmup`` steps), with hysteresis: a detection sets at its threshold and
    clears below ``release`` times it (above, for the entropy floor), and its remedy stays on until
    ``cooldown`` consecutive healthy samples:

    ==========================  ========================================================================
    ``logit_drift``             ``|log Z|`` mean above ``logz_limit``
    ``softmax_collapse``        ``sc_frac`` or the zero-loss fraction at or above ``collapse_frac``
    ``attention_collapse``      a layer's ``entropy_min`` below ``entropy_floor``
    ``attention_logit_growth``  a layer's ``max_logit`` above ``max_logit_limit``
    ==========================  ========================================================================

    A sampled ``sc_headroom_p01`` below ``headroom_warn`` nats emits a ``collapse_headroom_low``
    warning (once per incident) and samples every step until it recovers.

    **Remedies** (``remedies``: detection -> ladder; each an event, each turned off again after
    ``cooldown`` healthy samples; every ``patience`` repeated detections climb one rung):

    - ``z_loss``: a gradient hook on the logits adds the exact gradient of ``c * mean((log Z)^2)``,
      ``2 c log Z softmax(z) / rows``, with ``c`` ramped from 0 to ``z_loss_coef`` over
      ``z_loss_ramp`` steps; the user's loss code is untouched;
    - ``softcap``: the head's output becomes ``softcap * tanh(z / softcap)`` (a forward hook);
    - ``perp_grad``: before each optimizer step every gradient is projected orthogonal to its weight and
      rescaled to its norm;
    - ``qk_clip``: after each step, every head whose largest attention logit exceeded ``qk_clip_tau``
      (default ``max_logit_limit``) gets its query rows scaled by ``eta^alpha`` and its key rows by
      ``eta^(1 - alpha)``, ``eta = tau / max_logit`` (Megatron's QK-clip, ``alpha = qk_clip_alpha``);
      the projections are found for separate ``q_proj``/``k_proj`` linears and fused ``qkv``/``c_attn``
      linears, or given by ``qk_projections(name, module) -> QKProjection``;
    - ``attn_softcap``: every ``scaled_dot_product_attention`` call of the model's forwards (training,
      validation, test, predict) soft-caps its scaled logits, ``attention_softcap * tanh(x /
      attention_softcap)`` (Gemma 2's attention cap, 50). No fused kernel does this, so attention
      runs as math while the remedy is on (the first call warns with the memory it costs). The
      attention statistics stay those of the raw logits, so the detection clears only when the
      logits themselves come down;
    - ``advise``: an event naming the structural fix the callback cannot make.

    Logged (rank zero, straight to the loggers, on every sampled step): ``stability/softmax/out_logz_mean``,
    ``out_logz_std``, ``out_logz_max``, ``out_max_logit``, ``out_pmax_mean``, ``sc_frac``,
    ``sc_headroom_p01``, ``zero_loss_frac``, ``nlm_cos_max``, ``z_loss_coef``;
    ``stability/attention/<layer>/entropy_min``, ``entropy_median``, ``max_logit``, ``pmax_p99``,
    ``headroom_min``; ``stability/events/<kind>``.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        head: str | None = None,
        logits_key: str = "logits",
        targets_key: str = "targets",
        attention: bool = True,
        attention_rows: int = 64,
        attention_batch: int = 4,
        capture: str = "patch",
        loss_dtype: torch.dtype | None = None,
        warmup: int = 0,
        logz_limit: float = 20.0,
        collapse_frac: float = 0.01,
        headroom_warn: float = 2.0,
        entropy_floor: float = 0.05,
        max_logit_limit: float = 100.0,
        release: float = 0.8,
        remedies: Mapping[str, Sequence[str]] | None = None,
        patience: int = 3,
        cooldown: int = 5,
        z_loss_coef: float = 1e-4,
        z_loss_ramp: int = 100,
        softcap: float = 30.0,
        attention_softcap: float = 50.0,
        qk_clip_tau: float | None = None,
        qk_clip_alpha: float = 0.5,
        qk_projections: Callable[[str, nn.Module], QKProjection | None] | None = None,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        owner = type(self).__name__
        self.every_n_steps = check_int(owner, "every_n_steps", every_n_steps, 1)
        self.head = head
        self.logits_key, self.targets_key = logits_key, targets_key
        self.attention = bool(attention)
        self.attention_rows = check_int(owner, "attention_rows", attention_rows, 1)
        self.attention_batch = check_int(owner, "attention_batch", attention_batch, 1)
        if capture not in ("patch", "mode"):
            raise ValueError(f"{owner}(capture={capture!r}): expected 'patch' or 'mode'")
        self.capture = capture
        if loss_dtype is not None and not (isinstance(loss_dtype, torch.dtype) and loss_dtype.is_floating_point):
            raise ValueError(f"{owner}(loss_dtype={loss_dtype!r}): expected a floating-point torch.dtype or None")
        self.loss_dtype = loss_dtype
        self.warmup = check_int(owner, "warmup", warmup, 0)
        self.logz_limit = check_positive(owner, "logz_limit", logz_limit)
        self.collapse_frac = check_fraction(owner, "collapse_frac", collapse_frac, closed=True)
        self.headroom_warn = float(headroom_warn)
        self.entropy_floor = check_fraction(owner, "entropy_floor", entropy_floor)
        self.max_logit_limit = check_positive(owner, "max_logit_limit", max_logit_limit)
        self.release = check_fraction(owner, "release", release)
        self.remedies = _check_remedies(owner, remedies)
        self._configured_remedies = self.remedies
        self._sharded = False
        self.patience = check_int(owner, "patience", patience, 1)
        self.cooldown = check_int(owner, "cooldown", cooldown, 1)
        self.z_loss_coef = check_positive(owner, "z_loss_coef", z_loss_coef)
        self.z_loss_ramp = check_int(owner, "z_loss_ramp", z_loss_ramp, 0)
        self.softcap = check_positive(owner, "softcap", softcap)
        self.attention_softcap = check_positive(owner, "attention_softcap", attention_softcap)
        self.qk_clip_tau = self.max_logit_limit if qk_clip_tau is None else check_positive(owner, "qk_clip_tau", qk_clip_tau)
        self.qk_clip_alpha = check_fraction(owner, "qk_clip_alpha", qk_clip_alpha, closed=True)
        if qk_projections is not None and not callable(qk_projections):
            raise TypeError(f"{owner}(qk_projections={qk_projections!r}): expected a callable (name, module) -> QKProjection | None")
        self.qk_projections = qk_projections
        self.seed = int(seed)
        # state (checkpointed)
        self._active: dict[str, dict[str, Any]] = {}  # detection -> {rung, repeats, healthy, target}
        self._remedy_on: dict[str, int] = {}  # remedy -> step it turned on
        self._headroom_warned = False
        self._samples = 0
        self.last_stats: dict[str, float] = {}
        # per fit
        self._head_module: nn.Module | None = None
        self._head_name: str | None = None
        self._names: dict[int, str] = {}
        self._modules: dict[str, nn.Module] = {}
        self._step_now = 0
        self._handles: list[Any] = []
        self._handles_capture: list[Any] = []
        self._softcap_handle: Any = None
        self._capture: _Capture | _Patch | None = None
        self._attn_softcap: _AttentionSoftcap | None = None
        self._softcap_warned: set[str] = set()  # what the attention soft-cap has warned about this fit
        self._stack: list[str] = []
        self._sampling = False
        self._logits: Tensor | None = None
        self._autocast = False
        self._attn: dict[str, list[dict[str, Tensor]]] = {}
        self._nlm: Tensor | None = None
        self._no_projection: set[str] = set()  # layers QK-clip found no q/k projections for (warned once)
        self._gen = torch.Generator().manual_seed(self.seed)

    # -- state -----------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "active": {k: dict(v) for k, v in self._active.items()},
            "remedy_on": dict(self._remedy_on),
            "headroom_warned": self._headroom_warned,
            "samples": self._samples,
            "counts": dict(self._counts),
            "generator": self._gen.get_state().tolist(),  # plain ints: states compare with ==
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._active = {str(k): dict(v) for k, v in dict(state_dict.get("active", {})).items()}
        self._remedy_on = {str(k): int(v) for k, v in dict(state_dict.get("remedy_on", {})).items()}
        self._headroom_warned = bool(state_dict.get("headroom_warned", False))
        self._samples = int(state_dict.get("samples", 0))
        self._counts = {str(k): int(v) for k, v in dict(state_dict.get("counts", {})).items()}
        gen_state = state_dict.get("generator")
        if gen_state is not None:
            self._gen.set_state(torch.as_tensor(gen_state, dtype=torch.uint8))
        if self._head_module is not None:
            self._sync_softcap()

    @property
    def active_remedies(self) -> list[str]:
        """The remedies on now."""
        return sorted(self._remedy_on)

    # -- setup -----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        strategy = sharded_strategy(trainer)
        self._sharded = strategy is not None
        self.remedies = self._configured_remedies
        if strategy == "FSDPStrategy" and any("qk_clip" in ladder for ladder in self.remedies.values()):
            # QK-clip rescales each head's rows of the q/k projections. FSDP2 shards weights by rows, and
            # each rank scales its own; FSDP1's flat 1-D shards hold no rows: the rung is skipped there
            self.remedies = {d: tuple(r for r in ladder if r != "qk_clip") for d, ladder in self.remedies.items()}
            rank_zero_warn(
                f"{type(self).__name__}: the qk_clip remedy is off under {strategy} (it rescales heads' rows of "
                "q/k weights, which FSDP1 flattens into 1-D shards; ModelParallelStrategy's row shards are "
                "supported); the measurements and the other remedies stay on."
            )
        self._names = {id(m): n for n, m in pl_module.named_modules() if n}
        self._modules = dict(pl_module.named_modules())
        self._head_name, self._head_module = _find_head(pl_module, self.head)
        self._softcap_warned = set()
        self._remove_hooks()
        if self._head_module is not None:
            self._handles.append(self._head_module.register_forward_hook(self._head_hook))
        self._sync_softcap()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._stop_capture()
        self._stop_attention_softcap()
        self._remove_hooks()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # a forward that raised leaves no patched function behind
        self._stop_capture()
        self._stop_attention_softcap()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._softcap_handle is not None:
            self._softcap_handle.remove()
        self._softcap_handle = None

    def _sync_softcap(self) -> None:
        """The soft-cap hook is on exactly while the ``softcap`` remedy is."""
        on = "softcap" in self._remedy_on and self._head_module is not None
        handle = self._softcap_handle
        if on and handle is None and self._head_module is not None:
            cap = self.softcap
            self._softcap_handle = self._head_module.register_forward_hook(
                lambda module, args, out: softcap(out, cap) if isinstance(out, Tensor) else out, prepend=True
            )
        elif not on and handle is not None:
            handle.remove()
            self._softcap_handle = None

    # -- sampling and capture ----------------------------------------------------------------------
    def _due(self, step: int) -> bool:
        return step % self.every_n_steps == 0 or bool(self._active) or self._headroom_warned

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._logits, self._attn, self._nlm = None, {}, None
        self._step_now = trainer.global_step
        self._sampling = self._due(trainer.global_step)
        self._start_attention_softcap()  # beneath the capture: the capture sees the raw q and k
        if self._sampling and self.attention:
            self._start_capture()

    # the attention soft-cap applies to every forward of the model while the remedy is on
    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._start_attention_softcap()

    @override
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._stop_attention_softcap()

    # the same for test and predict batches (the hooks take the same arguments)
    on_test_batch_start = on_predict_batch_start = on_validation_batch_start
    on_test_batch_end = on_predict_batch_end = on_validation_batch_end

    def _start_attention_softcap(self) -> None:
        if "attn_softcap" in self._remedy_on and self._attn_softcap is None:
            self._attn_softcap = _AttentionSoftcap(self)
            self._attn_softcap.__enter__()

    def _stop_attention_softcap(self) -> None:
        if self._attn_softcap is not None:
            self._attn_softcap.__exit__(None, None, None)
            self._attn_softcap = None

    def _softcap_cost(self, q: Tensor, k: Tensor) -> None:
        if "cost" in self._softcap_warned:
            return
        self._softcap_warned.add("cost")
        shape = (*q.shape[:-1], k.shape[-2])
        mib = math.prod(shape) * 4 * 3 / 2**20  # float32 logits, capped logits, probabilities: kept for the backward
        rank_zero_warn(
            f"{type(self).__name__}: the attention soft-cap (attn_softcap) runs attention as math, since no fused "
            f"scaled_dot_product_attention kernel soft-caps: about {mib:.1f} MiB of float32 logits per call at "
            f"shape {tuple(shape)}, kept for the backward, and slower than a fused kernel. It stays on until "
            f"{self.cooldown} healthy samples; to avoid it, build the cap into the model (FlexAttention's "
            "score_mod with torch.compile fuses it)."
        )

    def _softcap_skipped(self, what: str) -> None:
        if what not in self._softcap_warned:
            self._softcap_warned.add(what)
            rank_zero_warn(f"{type(self).__name__}: the attention soft-cap cannot reach {what}; that attention is not capped.")

    def _start_capture(self) -> None:
        self._stack = []
        mods = torch.nn.modules.module
        self._handles_capture = [
            mods.register_module_forward_pre_hook(self._push),
            mods.register_module_forward_hook(self._pop, always_call=True),
        ]
        self._capture = _Patch(self) if self.capture == "patch" else _Capture(self)
        self._capture.__enter__()

    def _stop_capture(self) -> None:
        if self._capture is not None:
            self._capture.__exit__(None, None, None)
            self._capture = None
        for handle in self._handles_capture:
            handle.remove()
        self._handles_capture = []
        self._stack = []

    def _push(self, module: nn.Module, args: Any) -> None:
        name = self._names.get(id(module))
        if name is not None:
            self._stack.append(name)

    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:
        if id(module) in self._names and self._stack:
            self._stack.pop()

    def _caller(self) -> str:
        return self._stack[-1] if self._stack else "<model>"

    def _attention_call(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        bound = dict(zip(_SDPA_PARAMS, args))
        bound.update(kwargs)
        q, k = bound.get("query"), bound.get("key")
        if not (isinstance(q, Tensor) and isinstance(k, Tensor)) or q.dim() != 4 or k.dim() != 4:
            return  # unbatched or unusual layouts: not measured
        self._record(q, k, bound.get("attn_mask"), bool(bound.get("is_causal", False)), bound.get("scale"))

    def _mha_call(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        module = self._modules.get(self._caller())
        if not isinstance(module, nn.MultiheadAttention) or module.in_proj_weight is None:
            return  # separate q/k/v projection weights: not measured
        query, key = args[0], args[1]
        if query.dim() != 3:
            return  # unbatched: not measured
        # multi_head_attention_forward takes (L, N, E) whatever the module's batch_first
        query, key = query.transpose(0, 1), key.transpose(0, 1)
        e, h = module.embed_dim, module.num_heads
        w, bias = module.in_proj_weight.detach(), module.in_proj_bias
        b_q = bias[:e].detach() if bias is not None else None
        b_k = bias[e : 2 * e].detach() if bias is not None else None
        q = F.linear(query.detach(), w[:e], b_q)
        k = F.linear(key.detach(), w[e : 2 * e], b_k)
        n, lq, _ = q.shape
        q = q.view(n, lq, h, e // h).transpose(1, 2)
        k = k.view(n, k.shape[1], h, e // h).transpose(1, 2)
        mask = kwargs.get("attn_mask")
        if isinstance(mask, Tensor) and mask.dtype == torch.bool:
            mask = ~mask  # MultiheadAttention's boolean mask marks what must NOT be attended
        if isinstance(mask, Tensor) and mask.dim() == 2:
            mask = mask.view(1, 1, *mask.shape)
        self._record(q, k, mask, bool(kwargs.get("is_causal", False)), None)

    def _record(self, q: Tensor, k: Tensor, mask: Any, causal: bool, scale: Any) -> None:
        rows = sample_rows(q.shape[2], self.attention_rows, self._gen)
        if q.shape[0] > self.attention_batch:  # a few sequences of the batch, the same for q, k and mask
            pick = torch.randperm(q.shape[0], generator=self._gen)[: self.attention_batch].to(q.device)
            q, k = q.index_select(0, pick), k.index_select(0, pick)
            if isinstance(mask, Tensor) and mask.dim() == 4 and mask.shape[0] > 1:
                mask = mask.index_select(0, pick.to(mask.device))
        stats = attention_stats(
            q, k, rows=rows, scale=scale, is_causal=causal, attn_mask=mask if isinstance(mask, Tensor) else None,
            dtype=q.dtype,
        )
        self._attn.setdefault(self._caller(), []).append(stats)

    def _head_hook(self, module: nn.Module, args: Any, out: Any) -> Any:
        if not isinstance(out, Tensor) or not module.training:
            return None
        if self._sampling:
            self._logits = out.detach()
            self._autocast = torch.is_autocast_enabled(out.device.type)
        coef = self._z_coef()
        if coef > 0 and out.requires_grad:
            # the hook holds a detached alias, not ``out`` itself: a hook that refers to its own tensor
            # makes a cycle that keeps every step's logits alive
            logits = out.detach()
            out.register_hook(lambda grad: grad + z_loss_grad(logits, coef).to(grad.dtype))
        return None

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._stop_capture()  # the forward is over

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._sharded:
            # one all-reduce of three sums per parameter serves both, the same on every rank
            params = [p for p in pl_module.parameters() if p.grad is not None]
            wants = self._sampling or "perp_grad" in self._remedy_on
            sums = sharded_nlm_and_perp_sums(params, all_reduce_sum_) if wants and params else None
            if sums is not None and self._sampling:
                matrices = torch.tensor([p.dim() >= 2 for p in params], device=sums.device)
                if bool(matrices.any()):
                    self._nlm = nlm_from_sums(sums[matrices]).max()
            if sums is not None and "perp_grad" in self._remedy_on:
                sharded_perpendicular_grad_(params, sums)
            return
        weights = [p for p in pl_module.parameters() if p.grad is not None and p.dim() >= 2]
        if self._sampling and weights:
            self._nlm = torch.stack([nlm_alignment(p, p.grad) for p in weights if p.grad is not None]).max()
        if "perp_grad" in self._remedy_on:
            perpendicular_grad_(p for p in pl_module.parameters() if p.grad is not None)

    # -- deciding --------------------------------------------------------------------------------
    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._stop_capture()
        self._stop_attention_softcap()
        if not self._sampling:
            return
        self._sampling = False
        logits = self._logits
        if isinstance(outputs, Mapping) and isinstance(outputs.get(self.logits_key), Tensor):
            logits = outputs[self.logits_key].detach()
        values: dict[str, Tensor] = {}
        if logits is not None:
            dtype = self._loss_dtype(logits)
            for key, value in softmax_stats(logits, dtype).items():
                values[f"out_{key}" if key in _OUT_KEYS else key] = value
            targets = _find_targets(self.targets_key, outputs, batch, logits)
            if targets is not None:
                values["zero_loss_frac"] = zero_loss_fraction(logits, targets, dtype)
        if self._nlm is not None:
            values["nlm_cos_max"] = self._nlm
        for layer, calls in self._attn.items():
            for key, value in _layer_attention(calls).items():
                values[f"{layer}/{key}"] = value
            if len(calls) == 1:  # per-head maxima, for QK-clip (a module called twice has no one layout)
                for h, value in enumerate(calls[0]["max_logit"].unbind(0)):
                    values[f"{layer}/max_logit_head{h}"] = value
        stats = self._gather(trainer, values)
        self.last_stats = stats
        self._samples += 1
        step = trainer.global_step - 1
        self._decide(trainer, stats, step)
        if "qk_clip" in self._remedy_on:
            self._qk_clip(trainer, stats)
        self._log(trainer, pl_module, stats)  # sampled steps are few: each is logged

    def _loss_dtype(self, logits: Tensor) -> torch.dtype:
        if self.loss_dtype is not None:
            return self.loss_dtype
        if logits.dtype in (torch.float16, torch.bfloat16) and self._autocast:
            return torch.float32  # autocast computes cross-entropy in float32
        return logits.dtype

    def _gather(self, trainer: pl.Trainer, values: dict[str, Tensor]) -> dict[str, float]:
        """Every statistic on the host, the same on every rank: one all-gather under DDP (the worst
        rank's value for extremes, the mean for means)."""
        keys = sorted(values)
        if not keys:
            return {}
        device = next(iter(values.values())).device
        vec = torch.stack([values[k].float().reshape(()).to(device) for k in keys])
        if trainer.world_size > 1:
            gathered = trainer.strategy.all_gather(vec)  # (world, n)
            vec = torch.stack([_combine(k, gathered[:, i]) for i, k in enumerate(keys)])
        return dict(zip(keys, vec.cpu().tolist()))

    def _decide(self, trainer: pl.Trainer, stats: dict[str, float], step: int) -> None:
        if step < self.warmup:
            return
        head = stats.get("sc_headroom_p01", math.inf)
        if head < self.headroom_warn and not self._headroom_warned:
            self._headroom_warned = True
            self.emit(trainer, "collapse_headroom_low", "warning",
                      {"sc_headroom_p01": head, "sc_frac": stats.get("sc_frac", 0.0)}, None)
        elif head >= self.headroom_warn and self._headroom_warned:
            self._headroom_warned = False
        findings: dict[str, tuple[bool, bool, dict[str, float], str | None]] = {}
        logz = abs(stats.get("out_logz_mean", 0.0))
        findings["logit_drift"] = (
            logz > self.logz_limit, logz > self.release * self.logz_limit, {"logz_mean": stats.get("out_logz_mean", 0.0)}, None
        )
        frac = max(stats.get("sc_frac", 0.0), stats.get("zero_loss_frac", 0.0))
        findings["softmax_collapse"] = (
            frac >= self.collapse_frac and frac > 0, frac >= self.release * self.collapse_frac and frac > 0,
            {"sc_frac": stats.get("sc_frac", 0.0), "zero_loss_frac": stats.get("zero_loss_frac", 0.0),
             "sc_headroom_p01": head}, None,
        )
        ent = {k[: -len("/entropy_min")]: v for k, v in stats.items() if k.endswith("/entropy_min")}
        if ent:
            layer, low = min(ent.items(), key=lambda kv: kv[1])
            findings["attention_collapse"] = (
                low < self.entropy_floor, low < self.entropy_floor / self.release, {"entropy_min": low}, layer
            )
        logit = {k[: -len("/max_logit")]: v for k, v in stats.items() if k.endswith("/max_logit") and "/" in k}
        if logit:
            layer, top = max(logit.items(), key=lambda kv: kv[1])
            findings["attention_logit_growth"] = (
                top > self.max_logit_limit, top > self.release * self.max_logit_limit, {"max_logit": top}, layer
            )
        for detection, (fires, holds, metrics, target) in findings.items():
            self._step_detection(trainer, detection, fires, holds, metrics, target, step)

    def _step_detection(
        self, trainer: pl.Trainer, detection: str, fires: bool, holds: bool, metrics: dict[str, float],
        target: str | None, step: int,
    ) -> None:
        state = self._active.get(detection)
        ladder = self.remedies.get(detection, ())
        if fires:
            if state is None:
                state = {"rung": 0, "repeats": 0, "healthy": 0}
                self._active[detection] = state
            else:
                state["repeats"] += 1
                state["healthy"] = 0
                if state["repeats"] % self.patience or state["rung"] + 1 >= len(ladder):
                    return  # the remedy on now gets ``patience`` samples to work
                state["rung"] += 1
            action = ladder[state["rung"]] if ladder else None
            self._turn_on(trainer, detection, action, metrics, target, step)
            return
        if state is None:
            return
        if holds:
            state["healthy"] = 0
            return
        state["healthy"] += 1
        if state["healthy"] >= self.cooldown:
            del self._active[detection]
            off = [r for r in ladder if r in self._remedy_on and not self._still_needed(r)]
            for remedy in off:
                del self._remedy_on[remedy]
            self._sync_softcap()
            self.emit(trainer, "softmax_recovered", "info", {"healthy_samples": float(self.cooldown)},
                      ",".join(f"{r}_off" for r in off) or None, target)

    def _still_needed(self, remedy: str) -> bool:
        return any(remedy in self.remedies.get(d, ()) for d in self._active)

    def _turn_on(
        self, trainer: pl.Trainer, detection: str, action: str | None, metrics: dict[str, float],
        target: str | None, step: int,
    ) -> None:
        metrics = dict(metrics)
        if action == "advise":
            rank_zero_warn(f"{type(self).__name__}: {detection} at step {step}: {ADVICE[detection]}.")
        elif action is not None:
            if action in ("z_loss", "softcap") and self._head_module is None:
                rank_zero_warn(f"{type(self).__name__}: no head module found for {action}; pass head=<module name>.")
                action = None
            else:
                self._remedy_on.setdefault(action, step)
                if action == "z_loss":
                    metrics["z_loss_coef"] = self.z_loss_coef
                if action == "softcap":
                    metrics["softcap"] = self.softcap
                if action == "attn_softcap":
                    metrics["attention_softcap"] = self.attention_softcap
                self._sync_softcap()
        self.emit(trainer, detection, "warning", metrics, action, target)

    def _z_coef(self) -> float:
        start = self._remedy_on.get("z_loss")
        if start is None:
            return 0.0
        if self.z_loss_ramp == 0:
            return self.z_loss_coef
        return self.z_loss_coef * min(1.0, max(0.0, (self._step_now - start + 1) / self.z_loss_ramp))

    def _qk_clip(self, trainer: pl.Trainer, stats: dict[str, float]) -> None:
        """Scale q and k of every head above ``qk_clip_tau`` (from this step's forward, the same numbers on
        every rank, so every replica scales alike)."""
        for layer in sorted({k.rsplit("/", 1)[0] for k in stats if "/max_logit_head" in k}):
            heads = [stats[f"{layer}/max_logit_head{h}"] for h in range(_count_heads(stats, layer))]
            if max(heads) <= self.qk_clip_tau:
                continue
            module = self._modules.get(layer)
            proj = None
            if module is not None:
                proj = self.qk_projections(layer, module) if self.qk_projections else find_qk_projection(module)
            if proj is None or proj.n_head != len(heads):
                if layer not in self._no_projection:
                    self._no_projection.add(layer)
                    rank_zero_warn(
                        f"{type(self).__name__}: QK-clip cannot find the q/k projections of {layer}; pass "
                        "qk_projections=lambda name, module: QKProjection(...)."
                    )
                continue
            device = local(proj.q.weight).device
            try:
                apply_qk_clip(proj, torch.tensor(heads, device=device), self.qk_clip_tau, self.qk_clip_alpha)
            except NotImplementedError as err:  # a sharded layout without whole rows: the same on every rank
                if layer not in self._no_projection:
                    self._no_projection.add(layer)
                    rank_zero_warn(f"{type(self).__name__}: QK-clip skips {layer}: {err}.")
                continue
            self.emit(trainer, "qk_clip", "info",
                      {"max_logit": max(heads), "eta_min": self.qk_clip_tau / max(heads), "heads_clipped":
                       float(sum(h > self.qk_clip_tau for h in heads))}, "qk_clip", layer)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: dict[str, float]) -> None:
        metrics: dict[str, float] = {}
        for key, value in stats.items():
            if "/max_logit_head" in key:
                continue  # per-head maxima serve QK-clip; the layer's maximum is logged
            group = "softmax" if "/" not in key else "attention"
            metrics[f"stability/{group}/{key}"] = value
        metrics["stability/softmax/z_loss_coef"] = self._z_coef()
        log_to_loggers(trainer, metrics)
        counts = self.event_count_metrics()
        if counts:
            pl_module.log_dict(counts, on_step=True, on_epoch=False, batch_size=1)


# -- helpers ---------------------------------------------------------------------------------------
def _check_remedies(owner: str, remedies: Mapping[str, Sequence[str]] | None) -> dict[str, tuple[str, ...]]:
    out = dict(DEFAULT_REMEDIES)
    if remedies is None:
        return out
    if not isinstance(remedies, Mapping):
        raise TypeError(f"{owner}(remedies={remedies!r}): expected a mapping detection -> sequence of remedies")
    for detection, ladder in remedies.items():
        if detection not in DEFAULT_REMEDIES:
            raise ValueError(f"{owner}(remedies=...): unknown detection {detection!r}; expected one of {list(DEFAULT_REMEDIES)}")
        if isinstance(ladder, str):
            raise TypeError(f"{owner}(remedies[{detection!r}]={ladder!r}): expected a sequence of remedies, not a str")
        rungs = tuple(ladder)
        bad = [r for r in rungs if r not in SOFTMAX_REMEDIES]
        if bad:
            raise ValueError(f"{owner}(remedies[{detection!r}]): unknown remedy {bad[0]!r}; expected one of {list(SOFTMAX_REMEDIES)}")
        out[detection] = rungs
    return out


def _find_head(pl_module: nn.Module, head: str | None) -> tuple[str | None, nn.Module | None]:
    modules = dict(pl_module.named_modules())
    if head is not None:
        if head not in modules:
            raise ValueError(f"SoftmaxSaturationMonitor(head={head!r}): no such module; modules include {list(modules)[1:8]}")
        return head, modules[head]
    for name in _HEAD_NAMES:
        if name in modules:
            return name, modules[name]
    linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else (None, None)


def _find_targets(key: str, outputs: Any, batch: Any, logits: Tensor) -> Tensor | None:
    rows = logits.numel() // max(1, logits.shape[-1])
    for source in (outputs, batch):
        if isinstance(source, Mapping) and isinstance(source.get(key), Tensor):
            t = source[key]
            if t.numel() == rows and not t.is_floating_point():
                return t
    return None


def _layer_attention(calls: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """One layer's statistics from its calls (usually one): entropy over heads' means, extremes."""
    means = torch.cat([c["entropy_mean"] for c in calls])
    return {
        "entropy_min": means.min(),
        "entropy_median": means.median(),
        "max_logit": torch.stack([c["max_logit"].max() for c in calls]).max(),
        "pmax_p99": torch.stack([c["pmax_p99"].max() for c in calls]).max(),
        "headroom_min": torch.stack([c["headroom_min"].min() for c in calls]).min(),
    }


def _count_heads(stats: Mapping[str, float], layer: str) -> int:
    h = 0
    while f"{layer}/max_logit_head{h}" in stats:
        h += 1
    return h


def _combine(key: str, values: Tensor) -> Tensor:
    """How ranks' values of one statistic combine: extremes by the worst rank, the rest by the mean."""
    name = key.rsplit("/", 1)[-1]
    if name in ("entropy_min", "headroom_min", "sc_headroom_p01"):
        return values.min()
    if name in ("max_logit", "pmax_p99", "out_logz_max", "out_max_logit", "nlm_cos_max") or name.startswith(
        "max_logit_head"
    ):
        return values.max()
    return values.mean()
