"""``SoftmaxSaturationMonitor``: output and attention softmax saturation, and the remedies.

The adapter: its hooks measure (``_softmax_capture``, ``_softmax_measure``), decide (``_softmax_policy``),
act (the remedies of ``_softmax_remedies``) and emit, in that order."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_stability.callbacks._base import StabilityCallback, check_fraction, check_int, check_positive
from lightning_stability.callbacks._softmax_capture import AttentionCapture
from lightning_stability.callbacks._softmax_measure import SoftmaxSample, StepGradients, combine_rule
from lightning_stability.callbacks._softmax_policy import (
    ADVICE,
    DEFAULT_REMEDIES,
    OPT_IN,
    Decision,
    SoftmaxPolicy,
    advice,
    check_remedies,
    opt_in_argument,
)
from lightning_stability.callbacks._softmax_remedies import RUNGS, RemedySet
from lightning_stability.core.agreement import agree
from lightning_stability.core.lightning import log_metrics, rank_gather, sharded_strategy
from lightning_stability.core.modules import HEAD_NAMES, clean_name, find_output_head
from lightning_stability.core.schedule import Schedule
from lightning_stability.ops.saturation import QKProjection

SOFTMAX_REMEDIES = RUNGS
__all__ = ["ADVICE", "DEFAULT_REMEDIES", "OPT_IN", "SOFTMAX_REMEDIES", "SoftmaxSaturationMonitor"]


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

    **Output softmax.** The logits come from ``outputs[logits_key]`` of ``training_step`` when it
    returns them, else from a forward hook on the head (``head`` by name; else a top-level
    ``lm_head``/``output``/``head``/``classifier``; else the last ``nn.Linear`` named so or
    ``decoder``; else the last ``nn.Linear``; none found is one ``no_head`` info event). On sampled
    steps: ``log Z`` (mean, std, max), the largest logit, the mean top probability, the fraction of
    rows exactly one-hot in the loss's dtype (``sc_frac``), the 1st percentile of the collapse headroom
    in nats (``sc_headroom_p01``: ``p ln 2 + log sum_{j != top} exp(z_j - z_top)``, ``p`` the
    significand bits), the fraction of exactly-zero losses (targets from ``outputs[targets_key]`` or
    ``batch[targets_key]``) and the largest ``cos(-g, w)`` of a weight's gradient with the weight.

    **Attention.** During sampled forwards every call of ``scaled_dot_product_attention`` and of
    ``nn.MultiheadAttention``'s ``multi_head_attention_forward`` is seen (``capture="patch"``: wrappers
    in place of the two functions; ``"mode"``: a ``TorchFunctionMode``, which also sees a function bound
    at import but routes every op through Python), attributed to the innermost module that made it,
    and its scores recomputed in float32 for ``attention_rows`` random query rows plus the last, of
    ``attention_batch`` random sequences, with the call's scale, mask and causality. Per layer:
    ``entropy_min``, ``entropy_median`` (over heads, of each head's mean row entropy over ``log n_i``,
    ``n_i`` the keys row ``i`` sees), ``max_logit``, ``pmax_p99``, ``headroom_min``. An attention-like
    module (``...Attention``, ``nn.MultiheadAttention``) that runs without a call it can read gets one
    warning and one ``attention_skipped`` info event. Modules are found at fit start, after
    ``configure_model`` and the strategy's wrapping (whose name segments are left out).

    **Sampling.** Every ``every_n_steps`` optimizer steps, and every step while a detection is open.
    Under gradient accumulation every micro-batch of a sampled step is measured and the step decided
    once, after its optimizer step; the statistics stay on the device until then, and under DDP are
    agreed in one collective, so every rank decides alike.

    **Detections** (after ``warmup`` steps): each opens at its threshold, is held above ``release``
    times it (for the entropy floor, below it divided by ``release``), and closes ``cooldown`` steps
    after the last sample above that, turning its remedies off (``softmax_recovered``); every
    ``patience`` repeated detections climb one rung of its ladder (``remedies``), and a remedy under
    which the statistic got worse than when it came on is switched off for the rest of the incident
    (``intervention_reverted``; docs/softmax.md):

    ==========================  ========================================================================
    ``logit_drift``             ``|log Z|`` mean above ``logz_limit``
    ``softmax_collapse``        ``sc_frac`` or the zero-loss fraction at or above ``collapse_frac``
    ``attention_collapse``      a layer's ``entropy_min`` below ``entropy_floor``
    ``attention_logit_growth``  a layer's ``max_logit`` above ``max_logit_limit``
    ==========================  ========================================================================

    ``sc_headroom_p01`` below ``headroom_warn`` nats emits ``collapse_headroom_low`` (once per
    incident) and samples every step until it recovers.

    **Remedies** (each its own class, documented there): ``z_loss`` (the exact z-loss gradient on the
    logits, ``z_loss_coef`` ramped over ``z_loss_ramp`` steps), ``softcap`` (the head's logits capped at
    ``softcap``), ``perp_grad`` (gradients made perpendicular to their weights), ``qk_clip``
    (Megatron's QK-clip at ``qk_clip_tau``, default ``max_logit_limit``, ``qk_clip_alpha``; the
    projections found or given by ``qk_projections(name, module) -> QKProjection``), ``attn_softcap``
    (every SDPA call's logits capped at ``attention_softcap``, as math, in every stage) and ``advise``
    (an event naming the structural fix). Default ladders: ``attention_logit_growth`` ``qk_clip``,
    ``advise``; the others ``advise``.

    Logged on every sampled step (so on every step with a detection), whatever ``log_every_n_steps``
    says: ``stability/softmax/out_logz_mean``, ``out_logz_std``, ``out_logz_max``, ``out_max_logit``,
    ``out_pmax_mean``, ``sc_frac``, ``sc_headroom_p01``, ``zero_loss_frac``, ``nlm_cos_max``,
    ``z_loss_coef``; ``stability/attention/<layer>/entropy_min``, ``entropy_median``, ``max_logit``,
    ``pmax_p99``, ``headroom_min``; ``stability/events/<kind>``.

    Example::

        trainer = pl.Trainer(callbacks=[SoftmaxSaturationMonitor(every_n_steps=10)])
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
        self.remedies = check_remedies(owner, remedies, RUNGS)
        self._configured_remedies = self.remedies
        self._user_ladders = frozenset(remedies or ())  # detections whose ladder the user chose
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
        self.schedule = Schedule(self.every_n_steps)
        self._gen = torch.Generator().manual_seed(self.seed)
        # the pieces: measure, decide, act
        self._attention = AttentionCapture(owner, self.attention_rows, self.attention_batch, capture, self._gen)
        self._sample = SoftmaxSample(self._attention, logits_key, targets_key, loss_dtype)
        self._policy = SoftmaxPolicy(self)
        self._remedies = RemedySet(self)
        self._samples = 0  # checkpointed, with the policy's and the remedies' state
        self.last_stats: dict[str, float] = {}
        # per fit
        self._head_module: nn.Module | None = None
        self._head_name: str | None = None
        self._modules: dict[str, nn.Module] = {}
        self._handles: list[Any] = []
        self._sharded = False
        self._found = False  # the model's modules are found (at fit start, after configure_model)
        self._open_step: int | None = None  # the global step whose micro-batches are being collected
        self._step_now = 0
        self._sampling = False

    # -- state -----------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **self._policy.state_dict(),  # active, headroom_warned
            "remedy_on": self._remedies.state_dict(),
            "samples": self._samples,
            "counts": dict(self._counts),
            "generator": self._gen.get_state().tolist(),  # plain ints: states compare with ==
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._policy.load_state_dict(state_dict)
        self._remedies.load_state_dict(dict(state_dict.get("remedy_on", {})))
        self._samples = int(state_dict.get("samples", 0))
        self._counts = {str(k): int(v) for k, v in dict(state_dict.get("counts", {})).items()}
        gen_state = state_dict.get("generator")
        if gen_state is not None:
            self._gen.set_state(torch.as_tensor(gen_state, dtype=torch.uint8))

    @property
    def active_remedies(self) -> list[str]:
        """The remedies on now."""
        return self._remedies.names_on()

    # -- setup -----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        strategy = sharded_strategy(trainer)
        self._sharded = strategy is not None
        self.remedies = RemedySet.runnable(type(self).__name__, self._configured_remedies, strategy)
        # the model's modules are found at fit start: Lightning runs this hook before
        # LightningModule.configure_model, where large and sharded models build their layers
        self._found = False
        self._open_step = None  # a fit that ended mid-step leaves no half-collected step behind
        self._detach()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._find_modules(trainer, pl_module)

    def _find_modules(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The name of every module (after ``configure_model`` and the strategy's wrapping, with the
        wrappers' segments left out), the attention-like ones, and the head with its hook."""
        named = [(clean_name(n), m) for n, m in pl_module.named_modules()]
        self._modules = dict(named)
        self._attention.bind(named)
        self._detach()
        if self.head is not None and self.head not in self._modules:
            raise ValueError(f"{type(self).__name__}(head={self.head!r}): no such module; modules include "
                             f"{list(self._modules)[1:8]}")
        self._head_name, self._head_module = find_output_head(self._modules, self.head)
        if self._head_module is not None:
            self._handles.append(self._head_module.register_forward_hook(self._head_hook))
        else:
            rank_zero_warn(
                f"{type(self).__name__}: found no output head (no module named {', '.join(HEAD_NAMES)} and no "
                "nn.Linear): the output-softmax statistics come only from training_step's outputs[logits_key], "
                "and z_loss / softcap cannot act; pass head=<module name>."
            )
            self.emit(trainer, "no_head", "info", {}, "pass head=<module name>")
        for remedy in self._remedies.all():
            remedy.setup_fit()
        self._found = True

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._detach()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._detach()  # a forward that raised leaves no patched function behind

    def _detach(self) -> None:
        self._attention.stop()
        for remedy in self._remedies.all():
            remedy.release()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- measure ---------------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._found:
            self._find_modules(trainer, pl_module)
        step = trainer.global_step
        if self._open_step != step:
            # the first micro-batch of an optimizer step: under gradient accumulation every micro-batch of
            # a sampled step is measured, and the step is decided once, after its optimizer step
            self._open_step, self._step_now = step, step
            self._sample.new_step()
            self._sampling = self.schedule.due(step, active=self._policy.watching)
        self._sample.logits = None
        for remedy in self._remedies.on():  # beneath the capture: the capture sees the raw q and k
            remedy.batch_start(trainer, pl_module, training=True)
        if self._sampling and self.attention:
            self._attention.start()

    # the attention soft-cap applies to every forward of the model while the remedy is on
    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        for remedy in self._remedies.on():
            remedy.batch_start(trainer, pl_module, training=False)

    @override
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        for remedy in self._remedies.all():
            remedy.batch_end()

    # the same for test and predict batches (the hooks take the same arguments)
    on_test_batch_start = on_predict_batch_start = on_validation_batch_start
    on_test_batch_end = on_predict_batch_end = on_validation_batch_end

    def _head_hook(self, module: nn.Module, args: Any, out: Any) -> Any:
        if not isinstance(out, Tensor) or not module.training:
            return None
        if self._sampling:
            self._sample.see_logits(out)
        for remedy in self._remedies.on():
            remedy.on_logits(out)
        return None

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._attention.stop()  # the forward is over

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        grads = StepGradients([p for p in pl_module.parameters() if p.grad is not None], self._sharded)
        if self._sampling:
            self._sample.align(grads)  # before any remedy changes the gradients
        for remedy in self._remedies.on():
            remedy.before_optimizer_step(grads)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._attention.stop()
        for remedy in self._remedies.all():
            remedy.batch_end()
        # the optimizer stepped in this batch (the last micro-batch of an accumulation); under manual
        # optimization each batch is decided on its own
        stepped = trainer.global_step != self._open_step or not pl_module.automatic_optimization
        if self._sampling:
            self._sample.collect(outputs, batch)
        if not stepped:
            return  # the optimizer step's other micro-batches first: one decision per optimizer step
        self._open_step = None
        if not self._sampling:
            return
        self._sampling = False
        values = self._sample.values()
        for layer in self._attention.unreported():
            self.emit(trainer, "attention_skipped", "info", {}, None, layer)
        stats = agree(values, combine_rule, rank_gather(trainer))  # the same numbers on every rank: one collective
        self.last_stats = stats
        self._samples += 1
        # decide, then act: the remedies switched, QK-clip after the optimizer step, never between micro-batches
        decisions = self._policy.decide(stats, self._step_now)
        for decision in decisions:
            self._act(trainer, decision)
        for remedy in self._remedies.on():
            for e in remedy.after_step(stats):
                self.emit(trainer, e.kind, e.severity, e.metrics, e.action, e.target)
        self._log(trainer, stats, detected=bool(decisions))

    # -- act and emit ----------------------------------------------------------------------------
    def _act(self, trainer: pl.Trainer, decision: Decision) -> None:
        kind, detection, action, metrics, target, off = decision
        if kind == "headroom":
            self.emit(trainer, detection, "warning", metrics, None)
            return
        if kind == "reverted":  # the remedy did not work: off (unless another open detection has it on)
            for name in off:
                if name in self._remedies.by_name and self._remedies[name].on:
                    self._remedies[name].switch_off()
            self.emit(trainer, "intervention_reverted", "warning", metrics, f"revert_{action}", target)
            return
        if kind == "recovered":
            stopped = [r for r in off if r in self._remedies.by_name and self._remedies[r].on]
            for name in stopped:
                self._remedies[name].switch_off()
            self.emit(trainer, "softmax_recovered", "info", metrics, ",".join(f"{r}_off" for r in stopped) or None,
                      target)
            return
        metrics = dict(metrics)
        opt_in = OPT_IN.get(detection) if detection not in self._user_ladders else None
        if action == "advise":
            rank_zero_warn(advice(type(self).__name__, detection, self._step_now, opt_in is not None))
        elif action is not None:
            remedy = self._remedies[action]
            if remedy.needs_head and self._head_module is None:
                rank_zero_warn(f"{type(self).__name__}: no head module found for {action}; pass head=<module name>.")
                action = None
            else:
                metrics.update(remedy.switch_on(self._step_now))
        self.emit(trainer, detection, "warning", metrics, action, target)
        if opt_in is not None and action == "advise":
            # the remedy this detection could get, off by default: the event names the argument
            self.emit(trainer, "advice", "info", metrics, opt_in_argument(detection), target)

    def _log(self, trainer: pl.Trainer, stats: dict[str, float], detected: bool) -> None:
        """The sample's statistics and the event counts, on every sampled step (the monitor's own
        cadence), whatever ``log_every_n_steps`` says; a step with a detection among them."""
        metrics: dict[str, float] = {}
        for key, value in stats.items():
            if "/max_logit_head" in key:
                continue  # per-head maxima serve QK-clip; the layer's maximum is logged
            metrics[f"stability/{'softmax' if '/' not in key else 'attention'}/{key}"] = value
        for remedy in self._remedies.all():
            metrics.update(remedy.sample_metrics())
        metrics.update(self.event_count_metrics())
        log_metrics(trainer, metrics, detection=detected, force=True)
