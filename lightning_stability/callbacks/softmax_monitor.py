"""``SoftmaxSaturationMonitor``: output and attention softmax saturation, and the remedies."""

from __future__ import annotations

import inspect
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
    grad_scaler,
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
    reduce_softmax_rows,
    sample_rows,
    sharded_nlm_and_perp_sums,
    sharded_perpendicular_grad_,
    softcap,
    softcapped_attention,
    softmax_row_stats,
    z_loss_grad,
    zero_loss_counts,
)
from lightning_stability.ops.sharded import all_reduce_sum_, local

SOFTMAX_REMEDIES = ("z_loss", "softcap", "perp_grad", "qk_clip", "attn_softcap", "advise")
# What each detection gets by default, in order; ``advise`` is an event naming the structural fix. A
# remedy is in a default ladder only where a benchmark in docs/ shows it helps once the detection has
# fired: QK-clip does (docs/benchmarks.md, attention logit growth). No benchmark shows z-loss or the
# output soft-cap helping, and the perpendicular gradient is shown helping only when on from the first
# step (the grokking runs), not switched on at a detection: those three are opt-in (OPT_IN).
DEFAULT_REMEDIES: dict[str, tuple[str, ...]] = {
    "logit_drift": ("advise",),
    "softmax_collapse": ("advise",),
    "attention_collapse": ("advise",),
    # attn_softcap is a rung to opt into: on examples/attention_logit_growth.py climbing to it after QK-clip
    # ended worse than QK-clip alone (docs/softmax.md)
    "attention_logit_growth": ("qk_clip", "advise"),
}
# The ladders to opt into, named by the advice event of a detection that fires on its default ladder.
OPT_IN: dict[str, tuple[str, ...]] = {
    "logit_drift": ("z_loss", "softcap", "advise"),
    "softmax_collapse": ("perp_grad", "advise"),
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
# the last name of a head inside a wrapped model (``self.model = GPT2LMHeadModel(...)``); ``decoder`` is
# the head of Lightning's demos.Transformer and of BERT's masked-LM head
_HEAD_LEAVES = ("lm_head", "head", "classifier", "decoder", "output")
# scaled_dot_product_attention's positional parameters, in order (a builtin: no signature to read)
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
# what the monitor reads of torch's multi_head_attention_forward (nn.MultiheadAttention's functional
# core; not a documented API): checked by name on the first call, so a change in torch is a warning
_MHA_PARAMS = (
    "query", "key", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k", "add_zero_attn", "key_padding_mask",
    "attn_mask", "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "is_causal",
)
# the module-name segments wrappers insert (FSDP1, activation checkpointing, torch.compile): left out of
# layer names, so a layer has the same name however the model is wrapped
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


_ORIGINAL_MHA = F.multi_head_attention_forward


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
            return self.monitor._inside_mha(func, args, kwargs)
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
            return monitor._inside_mha(mha, args, kwargs)

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

    **What changes training at the defaults:** only QK-clip, after an ``attention_logit_growth``
    detection (a layer's largest attention logit above ``max_logit_limit``, 100): it rescales that
    layer's query and key weights after the optimizer step, the one remedy a benchmark in docs/ shows
    helping once a detection fires. Every other detection at its default ladder observes: a warning
    event with action ``advise`` and an ``advice`` info event whose action is the argument that turns
    the remedy on (``remedies={'logit_drift': ('z_loss', 'softcap', 'advise')}``,
    ``remedies={'softmax_collapse': ('perp_grad', 'advise')}``). The module hooks (the head's forward
    hook; the capture during sampled forwards) change no number the model computes.

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

    The model's modules (layer names, the head, the attention layers) are found at fit start, after
    ``LightningModule.configure_model`` and the strategy's wrapping (whose name segments
    ``_fsdp_wrapped_module``, ``_checkpoint_wrapped_module``, ``_orig_mod`` are left out). The head is
    ``head`` by name, else a top-level ``lm_head``/``output``/``head``/``classifier``, else the last
    ``nn.Linear`` named ``lm_head``/``head``/``classifier``/``decoder``/``output`` (a model wrapped in the
    LightningModule), else the last ``nn.Linear``; none found is one ``no_head`` info event. A module
    whose class name ends in ``Attention`` (or an ``nn.MultiheadAttention``) that runs in a sampled
    forward without a call the monitor can read gets one warning and one ``attention_skipped`` info
    event (Hugging Face's ``eager`` attention, a FlashAttention kernel called directly).

    **Sampling.** Every ``every_n_steps`` optimizer steps, and every step while a detection is active.
    Under gradient accumulation every micro-batch of a sampled step is measured and the step is decided
    once, after its optimizer step (so ``patience`` and ``cooldown`` count optimizer steps, and QK-clip
    never acts between micro-batches). The statistics stay on the device until the sampled step ends;
    under DDP they are gathered in one collective on sampled steps only, so every rank decides alike.

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
      ``z_loss_ramp`` steps, divided by ``accumulate_grad_batches`` and multiplied by the AMP loss
      scale under ``16-mixed``, as the gradient it joins is; the user's loss code is untouched;
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

    Default ladders: ``logit_drift`` ``advise``; ``softmax_collapse`` ``advise``; ``attention_collapse``
    ``advise``; ``attention_logit_growth`` ``qk_clip``, ``advise``.

    Logged (rank zero, straight to the loggers, on every sampled step, so every step with a detection,
    whatever ``log_every_n_steps`` says): ``stability/softmax/out_logz_mean``,
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
        self._user_ladders = frozenset(remedies or ())  # detections whose ladder the user chose
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
        self._found = False  # the model's modules are found (at fit start, after configure_model)
        self._attention_like: set[int] = set()  # ids of the modules that look like attention layers
        # one optimizer step's collection, over its micro-batches (gradient accumulation)
        self._open_step: int | None = None  # the global step whose micro-batches are being collected
        self._out_rows: list[dict[str, Tensor]] = []  # per micro-batch: softmax_row_stats of the logits
        self._zero: Tensor | None = None  # summed zero_loss_counts
        self._attn: dict[str, list[dict[str, Tensor]]] = {}
        self._ran: set[str] = set()  # attention-like modules that ran in a sampled forward
        self._nlm: Tensor | None = None
        self._in_mha = 0  # inside multi_head_attention_forward: its own SDPA call is not a second layer
        self._grad_factor = 1.0  # 1 / accumulate_grad_batches, as Lightning scales the loss
        self._scaler: Any = None  # the AMP GradScaler of 16-mixed, whose scale the loss's gradient carries
        self._skipped: set[tuple[str, str]] = set()  # (layer, reason) already reported this fit
        self._pending_skips: list[str] = []  # layers newly skipped, for an info event at the step's end
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
        # the model's modules are found at fit start: Lightning runs this hook before
        # LightningModule.configure_model, where large and sharded models build their layers
        self._found = False
        self._open_step = None  # a fit that ended mid-step leaves no half-collected step behind
        self._softcap_warned = set()
        self._skipped = set()
        self._remove_hooks()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._find_modules(trainer, pl_module)

    def _find_modules(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The name of every module (after ``configure_model`` and the strategy's wrapping, with the
        wrappers' segments left out), the attention-like ones, and the head with its hook."""
        named = [(_clean(n), m) for n, m in pl_module.named_modules()]
        self._names = {id(m): n for n, m in named if n}
        self._modules = dict(named)
        self._attention_like = {id(m) for n, m in named if n and _looks_like_attention(m)}
        self._remove_hooks()
        self._head_name, self._head_module = _find_head(self._modules, self.head)
        if self._head_module is not None:
            self._handles.append(self._head_module.register_forward_hook(self._head_hook))
        else:
            rank_zero_warn(
                f"{type(self).__name__}: found no output head (no module named {', '.join(_HEAD_NAMES)} and no "
                "nn.Linear): the output-softmax statistics come only from training_step's outputs[logits_key], "
                "and z_loss / softcap cannot act; pass head=<module name>."
            )
            self.emit(trainer, "no_head", "info", {}, "pass head=<module name>")
        self._sync_softcap()
        self._found = True

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
        if not self._found:
            self._find_modules(trainer, pl_module)
        step = trainer.global_step
        if self._open_step != step:
            # the first micro-batch of an optimizer step: under gradient accumulation every micro-batch of
            # a sampled step is measured, and the step is decided once, after its optimizer step
            self._open_step = step
            self._out_rows, self._zero, self._attn, self._ran, self._nlm = [], None, {}, set(), None
            self._step_now = step
            self._sampling = self._due(step)
        self._logits = None
        # Lightning divides the loss by accumulate_grad_batches in automatic optimization; the z-loss
        # gradient, added straight to the logits' gradient, must be divided alike, and carry the AMP
        # loss scale that gradient carries under 16-mixed
        self._grad_factor = 1.0 / trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1.0
        self._scaler = grad_scaler(trainer)
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
            if id(module) in self._attention_like:
                self._ran.add(name)

    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:
        if id(module) in self._names and self._stack:
            self._stack.pop()

    def _caller(self) -> str:
        return self._stack[-1] if self._stack else "<model>"

    def _skip(self, layer: str, reason: str) -> None:
        """An attention the monitor cannot measure: one warning and one info event per layer and reason."""
        if (layer, reason) in self._skipped:
            return
        self._skipped.add((layer, reason))
        rank_zero_warn(f"{type(self).__name__}: the attention of {layer} is not measured: {reason}.")
        self._pending_skips.append(layer)

    def _inside_mha(self, fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        # multi_head_attention_forward calls scaled_dot_product_attention itself (need_weights=False):
        # that call is the same layer, measured already from the projections
        self._in_mha += 1
        try:
            return fn(*args, **kwargs)
        finally:
            self._in_mha -= 1

    def _attention_call(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        if self._in_mha:
            return
        bound = dict(zip(_SDPA_PARAMS, args))
        bound.update(kwargs)
        q, k = bound.get("query"), bound.get("key")
        if not (isinstance(q, Tensor) and isinstance(k, Tensor)) or q.dim() != 4 or k.dim() != 4:
            shapes = tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__
            self._skip(self._caller(), f"scaled_dot_product_attention called with query of shape {shapes}, not "
                       "(batch, heads, length, dim)")
            return
        self._record(q, k, bound.get("attn_mask"), bool(bound.get("is_causal", False)), bound.get("scale"))

    def _mha_call(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """q and k of ``nn.MultiheadAttention`` recomputed from the call's own projection weights (its
        functional core, ``multi_head_attention_forward``, builds them inside), with its masks."""
        layer = self._caller()
        signature = _mha_signature()
        missing = [p for p in _MHA_PARAMS if p not in signature.parameters]
        if missing:
            self._skip(layer, f"torch's multi_head_attention_forward no longer takes {missing}")
            return
        try:
            a = signature.bind(*args, **kwargs)
        except TypeError as err:
            self._skip(layer, f"multi_head_attention_forward called in an unknown way ({err})")
            return
        a.apply_defaults()
        arg = a.arguments
        query, key, h = arg["query"], arg["key"], int(arg["num_heads"])
        if query.dim() != 3:
            self._skip(layer, "an unbatched call of nn.MultiheadAttention")
            return
        if arg["bias_k"] is not None or arg["add_zero_attn"]:
            self._skip(layer, "nn.MultiheadAttention with add_bias_kv or add_zero_attn (keys the input does not have)")
            return
        # (L, N, E) whatever the module's batch_first
        e = query.shape[-1]
        if arg["use_separate_proj_weight"]:
            w_q, w_k = arg["q_proj_weight"], arg["k_proj_weight"]
        else:
            w_q, w_k = arg["in_proj_weight"][:e], arg["in_proj_weight"][e : 2 * e]
        bias = arg["in_proj_bias"]
        b_q = bias[:e].detach() if bias is not None else None
        b_k = bias[e : 2 * e].detach() if bias is not None else None
        q = F.linear(query.detach().transpose(0, 1), w_q.detach(), b_q)
        k = F.linear(key.detach().transpose(0, 1), w_k.detach(), b_k)
        n, lq, _ = q.shape
        s = k.shape[1]
        q = q.view(n, lq, h, e // h).transpose(1, 2)  # (N, H, L, D)
        k = k.view(n, s, h, e // h).transpose(1, 2)  # (N, H, S, D)
        # one additive mask (N, H, L, S) from attn_mask ((L, S) or (N * H, L, S)) and key_padding_mask
        # ((N, S)); MultiheadAttention's boolean masks mark what must NOT be attended
        mask = torch.zeros(1, 1, 1, 1, device=q.device)
        attn_mask, padding = arg["attn_mask"], arg["key_padding_mask"]
        for m, shape in ((attn_mask, (1, 1, lq, s) if attn_mask is None or attn_mask.dim() == 2 else (n, h, lq, s)),
                         (padding, (n, 1, 1, s))):
            if isinstance(m, Tensor):
                add = torch.zeros(m.shape, device=q.device).masked_fill(m, -math.inf) if m.dtype == torch.bool else m.float()
                mask = mask + add.reshape(shape)
        causal = bool(arg["is_causal"]) and not isinstance(attn_mask, Tensor)  # the mask is the causal one then
        self._record(q, k, mask.expand(n, h, lq, s) if mask.numel() > 1 else None, causal, None)

    def _record(self, q: Tensor, k: Tensor, mask: Any, causal: bool, scale: Any) -> None:
        try:
            self._measure(q, k, mask, causal, scale)
        except (RuntimeError, ValueError, IndexError) as err:  # a layout it does not know: skipped, said why
            self._skip(self._caller(), f"{type(err).__name__}: {err}")

    def _measure(self, q: Tensor, k: Tensor, mask: Any, causal: bool, scale: Any) -> None:
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
            out.register_hook(lambda grad: grad + z_loss_grad(logits, coef, scale=self._z_scale(grad)).to(grad.dtype))
        return None

    def _z_scale(self, grad: Tensor) -> float | Tensor:
        """What the z-loss gradient is multiplied by to match the gradient it is added to: ``1 /
        accumulate_grad_batches`` (Lightning divides the loss so), times the AMP loss scale under
        ``16-mixed`` (``GradScaler.scale``: a device tensor, no host read)."""
        if self._scaler is None:
            return self._grad_factor
        return self._scaler.scale(torch.full((), self._grad_factor, dtype=torch.float32, device=grad.device))

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
        # the optimizer stepped in this batch (the last micro-batch of an accumulation); under manual
        # optimization each batch is decided on its own
        stepped = trainer.global_step != self._open_step or not pl_module.automatic_optimization
        if self._sampling:
            self._collect(outputs, batch)
        if not stepped:
            return  # the optimizer step's other micro-batches first: one decision per optimizer step
        self._open_step = None
        if not self._sampling:
            return
        self._sampling = False
        values: dict[str, Tensor] = {}
        if self._out_rows:
            for key, value in reduce_softmax_rows(self._out_rows).items():
                values[f"out_{key}" if key in _OUT_KEYS else key] = value
        if self._zero is not None:
            values["zero_loss_frac"] = self._zero[0] / self._zero[1].clamp_min(1.0)
        if self._nlm is not None:
            values["nlm_cos_max"] = self._nlm
        for layer, calls in self._attn.items():
            layer_values, head_max = _layer_attention(calls)
            for key, value in layer_values.items():
                values[f"{layer}/{key}"] = value
            if head_max is not None:  # per-head maxima over the step's micro-batches, for QK-clip
                for h, value in enumerate(head_max.unbind(0)):
                    values[f"{layer}/max_logit_head{h}"] = value
        self._check_coverage(trainer)
        self._out_rows, self._zero, self._attn = [], None, {}
        stats = self._gather(trainer, values)
        self.last_stats = stats
        self._samples += 1
        step = self._step_now
        self._decide(trainer, stats, step)
        if "qk_clip" in self._remedy_on:
            self._qk_clip(trainer, stats)  # after the optimizer step, never between its micro-batches
        self._log(trainer, stats)  # sampled steps are few: each is logged, whatever log_every_n_steps says

    def _collect(self, outputs: Any, batch: Any) -> None:
        """One micro-batch's output-softmax rows (small: three numbers a row) and zero-loss counts."""
        logits = self._logits
        if isinstance(outputs, Mapping) and isinstance(outputs.get(self.logits_key), Tensor):
            logits = outputs[self.logits_key].detach()
        self._logits = None
        if logits is None:
            return
        dtype = self._loss_dtype(logits)
        self._out_rows.append(softmax_row_stats(logits, dtype))
        targets = _find_targets(self.targets_key, outputs, batch, logits)
        if targets is not None:
            counts = zero_loss_counts(logits, targets, dtype)
            self._zero = counts if self._zero is None else self._zero + counts

    def _check_coverage(self, trainer: pl.Trainer) -> None:
        """Every attention-like module that ran must have been measured, itself or inside: else a
        warning and an info event (e.g. Hugging Face's eager attention, a FlashAttention kernel called
        directly, or a torch change in nn.MultiheadAttention), never a silent gap."""
        measured = list(self._attn) + [layer for layer, _ in self._skipped]
        for name in sorted(self._ran):
            if not any(m == name or m.startswith(name + ".") for m in measured):
                self._skip(name, "it ran, but made no call of torch.nn.functional.scaled_dot_product_attention or "
                           "nn.MultiheadAttention's multi_head_attention_forward the monitor could see (eager "
                           "attention written out as matmul and softmax, a FlashAttention/FlexAttention kernel called "
                           "directly, or scaled_dot_product_attention imported by name: try capture='mode'); for "
                           "Hugging Face models use attn_implementation='sdpa'")
        self._ran = set()
        for layer in self._pending_skips:
            self.emit(trainer, "attention_skipped", "info", {}, None, layer)
        self._pending_skips = []

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
        opt_in = OPT_IN.get(detection) if detection not in self._user_ladders else None
        if action == "advise":
            extra = ""
            if opt_in is not None:
                extra = (f"; to let the monitor act ({', '.join(r for r in opt_in if r != 'advise')}; off by default, as "
                         f"no benchmark shows it helping once the detection fires), pass {_opt_in_argument(detection)}")
            rank_zero_warn(f"{type(self).__name__}: {detection} at step {step}: {ADVICE[detection]}{extra}.")
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
        if opt_in is not None and action == "advise":
            # the remedy this detection could get, off by default: the event names the argument
            self.emit(trainer, "advice", "info", metrics, _opt_in_argument(detection), target)

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

    def _log(self, trainer: pl.Trainer, stats: dict[str, float]) -> None:
        """The sample's statistics and the event counts, straight to the loggers at this step: a step
        with a detection reaches the logger whatever ``log_every_n_steps`` says."""
        metrics: dict[str, float] = {}
        for key, value in stats.items():
            if "/max_logit_head" in key:
                continue  # per-head maxima serve QK-clip; the layer's maximum is logged
            group = "softmax" if "/" not in key else "attention"
            metrics[f"stability/{group}/{key}"] = value
        metrics["stability/softmax/z_loss_coef"] = self._z_coef()
        metrics.update(self.event_count_metrics())
        log_to_loggers(trainer, metrics)


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


def _find_head(modules: Mapping[str, nn.Module], head: str | None) -> tuple[str | None, nn.Module | None]:
    """The output head: ``head`` by name; else a top-level ``lm_head``/``output``/``head``/``classifier``;
    else the last ``nn.Linear`` whose own name is one of ``_HEAD_LEAVES`` (a model wrapped in the
    LightningModule: ``model.lm_head``, ``vit.classifier``, demos.Transformer's ``model.decoder``); else
    the last ``nn.Linear``; else none."""
    if head is not None:
        if head not in modules:
            raise ValueError(f"SoftmaxSaturationMonitor(head={head!r}): no such module; modules include {list(modules)[1:8]}")
        return head, modules[head]
    for name in _HEAD_NAMES:
        if name in modules:
            return name, modules[name]
    linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    leaves = [(n, m) for n, m in linears if n.rsplit(".", 1)[-1] in _HEAD_LEAVES]
    if leaves:
        return leaves[-1]
    return linears[-1] if linears else (None, None)


def _opt_in_argument(detection: str) -> str:
    return f"remedies={{{detection!r}: {OPT_IN[detection]!r}}}"


def _clean(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def _looks_like_attention(module: nn.Module) -> bool:
    """An attention layer the monitor should see: ``nn.MultiheadAttention`` or a class named
    ``...Attention`` (Hugging Face's ``LlamaAttention``, ``BertSelfAttention``, litgpt's
    ``CausalSelfAttention``, the demo's ``CausalSelfAttention``)."""
    return isinstance(module, nn.MultiheadAttention) or type(module).__name__.endswith("Attention")


_MHA_SIGNATURE: inspect.Signature | None = None


def _mha_signature() -> inspect.Signature:
    """``multi_head_attention_forward``'s signature (read once; the original function, not a wrapper)."""
    global _MHA_SIGNATURE
    if _MHA_SIGNATURE is None:
        _MHA_SIGNATURE = inspect.signature(_ORIGINAL_MHA)
    return _MHA_SIGNATURE


def _find_targets(key: str, outputs: Any, batch: Any, logits: Tensor) -> Tensor | None:
    rows = logits.numel() // max(1, logits.shape[-1])
    for source in (outputs, batch):
        if isinstance(source, Mapping) and isinstance(source.get(key), Tensor):
            t = source[key]
            if t.numel() == rows and not t.is_floating_point():
                return t
    return None


def _layer_attention(calls: list[dict[str, Tensor]]) -> tuple[dict[str, Tensor], Tensor | None]:
    """One layer's statistics from its calls in one optimizer step (one per micro-batch, usually): each
    head's mean entropy averaged over the calls, then the minimum and median over heads; extremes over
    all. Also the per-head largest logits over the calls, for QK-clip, where every call has the same
    heads (else ``None``)."""
    same = len({c["max_logit"].shape for c in calls}) == 1
    if same:
        means = torch.stack([c["entropy_mean"] for c in calls]).nanmean(dim=0)  # (H,)
        head_max: Tensor | None = torch.stack([c["max_logit"] for c in calls]).amax(dim=0)
    else:
        means, head_max = torch.cat([c["entropy_mean"] for c in calls]), None
    values = {
        "entropy_min": means.min(),
        "entropy_median": means.median(),
        "max_logit": torch.stack([c["max_logit"].max() for c in calls]).max(),
        "pmax_p99": torch.stack([c["pmax_p99"].max() for c in calls]).max(),
        "headroom_min": torch.stack([c["headroom_min"].min() for c in calls]).min(),
    }
    return values, head_max


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
