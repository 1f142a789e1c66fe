"""The softmax monitor's attention measurement: during a sampled forward it sees every call of
``torch.nn.functional.scaled_dot_product_attention`` and of ``multi_head_attention_forward``,
attributes each to the innermost module of the model that made it, and recomputes the scores of a few
rows (``ops.attention``). An attention layer it cannot read is reported, never a silent gap. No Trainer."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_stability.core.modules import looks_like_attention
from lightning_stability.ops.attention import attention_stats, mha_query_key, sample_rows

# scaled_dot_product_attention's positional parameters, in order (a builtin: no signature to read)
SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
# what the monitor reads of torch's multi_head_attention_forward (nn.MultiheadAttention's functional
# core; not a documented API): checked by name on the first call, so a change in torch is a warning
MHA_PARAMS = (
    "query", "key", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k", "add_zero_attn", "key_padding_mask",
    "attn_mask", "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "is_causal",
)
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)  # the original function, not a wrapper


class FunctionPatch:
    """``torch.nn.functional.scaled_dot_product_attention`` and ``multi_head_attention_forward``
    replaced by ``wrap(sdpa, mha)``'s two functions while entered, the originals put back on exit."""

    def __init__(self) -> None:
        self.saved: dict[str, Any] = {}

    def wrap(self, sdpa: Callable[..., Any], mha: Callable[..., Any]) -> tuple[Callable[..., Any], Callable[..., Any]]:
        raise NotImplementedError

    def __enter__(self) -> FunctionPatch:
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


class _Patch(FunctionPatch):
    """The cheaper capture (``capture="patch"``): the two attention functions replaced by wrappers for
    the sampled forward only. It sees every call made through the module attribute
    (``F.scaled_dot_product_attention(...)``, as PyTorch's own modules, Hugging Face transformers and
    nanoGPT-style code do) and costs nothing on other ops; a function bound at import needs ``mode``."""

    def __init__(self, capture: AttentionCapture) -> None:
        super().__init__()
        self.capture = capture

    def wrap(self, sdpa: Callable[..., Any], mha: Callable[..., Any]) -> tuple[Callable[..., Any], Callable[..., Any]]:
        capture = self.capture

        def sdpa_wrapper(*args: Any, **kwargs: Any) -> Any:
            capture.sdpa_call(args, kwargs)
            return sdpa(*args, **kwargs)

        def mha_wrapper(*args: Any, **kwargs: Any) -> Any:
            capture.mha_call(args, kwargs)
            return capture.inside_mha(mha, args, kwargs)

        return sdpa_wrapper, mha_wrapper


class _Mode(TorchFunctionMode):
    """``capture="mode"``: a ``TorchFunctionMode`` that also sees a function bound at import, at the
    price of routing every op of the forward through Python."""

    def __init__(self, capture: AttentionCapture) -> None:
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.capture.sdpa_call(args, kwargs)
        elif func is F.multi_head_attention_forward:
            self.capture.mha_call(args, kwargs)
            return self.capture.inside_mha(func, args, kwargs)
        return func(*args, **kwargs)


class AttentionCapture:
    """What one optimizer step's sampled forwards showed of each attention layer.

    :meth:`bind` takes the model's modules (at fit start); :meth:`start` and :meth:`stop` bracket a
    sampled forward; :attr:`calls` holds each layer's :func:`attention_stats` per call, ``rows``
    random query rows (plus the last) of ``batch`` random sequences drawn from ``generator``, until
    :meth:`new_step`; :meth:`unreported` says which layers went unmeasured.
    """

    def __init__(self, owner: str, rows: int, batch: int, mode: str, generator: torch.Generator) -> None:
        self.owner, self.rows, self.batch, self.mode, self.generator = owner, rows, batch, mode, generator
        self.names: dict[int, str] = {}
        self.attention_like: set[int] = set()  # ids of the modules that look like attention layers
        self.calls: dict[str, list[dict[str, Tensor]]] = {}
        self.ran: set[str] = set()  # attention-like modules that ran in a sampled forward
        self.skipped: set[tuple[str, str]] = set()  # (layer, reason) already reported this fit
        self.pending: list[str] = []  # layers newly skipped, for an info event at the step's end
        self._stack: list[str] = []
        self._hooks: list[Any] = []
        self._active: _Patch | _Mode | None = None
        self._in_mha = 0  # inside multi_head_attention_forward: its own SDPA call is not a second layer

    def bind(self, named: Iterable[tuple[str, nn.Module]]) -> None:
        """The model's modules by their clean names (the model itself, named ``""``, left out)."""
        named = [(n, m) for n, m in named if n]
        self.names = {id(m): n for n, m in named}
        self.attention_like = {id(m) for _, m in named if looks_like_attention(m)}
        self.skipped = set()

    def new_step(self) -> None:
        self.calls, self.ran = {}, set()

    @property
    def by_mode(self) -> bool:
        """A ``TorchFunctionMode`` is capturing: it does not see a Python function put in place of SDPA."""
        return isinstance(self._active, _Mode)

    def start(self) -> None:
        self._stack = []
        mods = torch.nn.modules.module
        self._hooks = [
            mods.register_module_forward_pre_hook(self._push),
            mods.register_module_forward_hook(self._pop, always_call=True),
        ]
        self._active = _Patch(self) if self.mode == "patch" else _Mode(self)
        self._active.__enter__()

    def stop(self) -> None:
        if self._active is not None:
            self._active.__exit__(None, None, None)
            self._active = None
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._stack = [], []

    # -- which module called ----------------------------------------------------------------------
    def _push(self, module: nn.Module, args: Any) -> None:
        name = self.names.get(id(module))
        if name is not None:
            self._stack.append(name)
            if id(module) in self.attention_like:
                self.ran.add(name)

    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:
        if id(module) in self.names and self._stack:
            self._stack.pop()

    def _caller(self) -> str:
        return self._stack[-1] if self._stack else "<model>"

    def _skip(self, layer: str, reason: str) -> None:
        """An attention the monitor cannot measure: one warning and one info event per layer and reason."""
        if (layer, reason) in self.skipped:
            return
        self.skipped.add((layer, reason))
        rank_zero_warn(f"{self.owner}: the attention of {layer} is not measured: {reason}.")
        self.pending.append(layer)

    # -- the calls --------------------------------------------------------------------------------
    def inside_mha(self, fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        # multi_head_attention_forward calls scaled_dot_product_attention itself (need_weights=False):
        # that call is the same layer, measured already from the projections
        self._in_mha += 1
        try:
            return fn(*args, **kwargs)
        finally:
            self._in_mha -= 1

    def sdpa_call(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        if self._in_mha:
            return
        bound = dict(zip(SDPA_PARAMS, args))
        bound.update(kwargs)
        q, k = bound.get("query"), bound.get("key")
        if not (isinstance(q, Tensor) and isinstance(k, Tensor)) or q.dim() != 4 or k.dim() != 4:
            shapes = tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__
            self._skip(self._caller(), f"scaled_dot_product_attention called with query of shape {shapes}, not "
                       "(batch, heads, length, dim)")
            return
        self._record(q, k, bound.get("attn_mask"), bool(bound.get("is_causal", False)), bound.get("scale"))

    def mha_call(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """q and k of ``nn.MultiheadAttention`` recomputed from the call's own projection weights, with its masks."""
        layer = self._caller()
        missing = [p for p in MHA_PARAMS if p not in _MHA_SIGNATURE.parameters]
        if missing:
            self._skip(layer, f"torch's multi_head_attention_forward no longer takes {missing}")
            return
        try:
            bound = _MHA_SIGNATURE.bind(*args, **kwargs)
        except TypeError as err:
            self._skip(layer, f"multi_head_attention_forward called in an unknown way ({err})")
            return
        bound.apply_defaults()
        arg = bound.arguments
        if arg["query"].dim() != 3:
            self._skip(layer, "an unbatched call of nn.MultiheadAttention")
            return
        if arg["bias_k"] is not None or arg["add_zero_attn"]:
            self._skip(layer, "nn.MultiheadAttention with add_bias_kv or add_zero_attn (keys the input does not have)")
            return
        q, k, mask, causal = mha_query_key(
            arg["query"], arg["key"], int(arg["num_heads"]), arg["in_proj_weight"], arg["in_proj_bias"],
            arg["attn_mask"], arg["key_padding_mask"], arg["is_causal"], bool(arg["use_separate_proj_weight"]),
            arg["q_proj_weight"], arg["k_proj_weight"],
        )
        self._record(q, k, mask, causal, None)

    def _record(self, q: Tensor, k: Tensor, mask: Any, causal: bool, scale: Any) -> None:
        try:
            self._measure(q, k, mask, causal, scale)
        except (RuntimeError, ValueError, IndexError) as err:  # a layout it does not know: skipped, said why
            self._skip(self._caller(), f"{type(err).__name__}: {err}")

    def _measure(self, q: Tensor, k: Tensor, mask: Any, causal: bool, scale: Any) -> None:
        rows = sample_rows(q.shape[2], self.rows, self.generator)
        if q.shape[0] > self.batch:  # a few sequences of the batch, the same for q, k and mask
            pick = torch.randperm(q.shape[0], generator=self.generator)[: self.batch].to(q.device)
            q, k = q.index_select(0, pick), k.index_select(0, pick)
            if isinstance(mask, Tensor) and mask.dim() == 4 and mask.shape[0] > 1:
                mask = mask.index_select(0, pick.to(mask.device))
        stats = attention_stats(
            q, k, rows=rows, scale=scale, is_causal=causal, attn_mask=mask if isinstance(mask, Tensor) else None,
            dtype=q.dtype,
        )
        self.calls.setdefault(self._caller(), []).append(stats)

    # -- coverage ---------------------------------------------------------------------------------
    def unreported(self) -> list[str]:
        """The layers to report as not measured (each once a fit): every attention-like module that ran
        must have been measured, itself or inside, else a warning (Hugging Face's eager attention, a
        FlashAttention kernel called directly, a torch change in nn.MultiheadAttention)."""
        measured = list(self.calls) + [layer for layer, _ in self.skipped]
        for name in sorted(self.ran):
            if not any(m == name or m.startswith(name + ".") for m in measured):
                self._skip(name, "it ran, but made no call of torch.nn.functional.scaled_dot_product_attention or "
                           "nn.MultiheadAttention's multi_head_attention_forward the monitor could see (eager "
                           "attention written out as matmul and softmax, a FlashAttention/FlexAttention kernel called "
                           "directly, or scaled_dot_product_attention imported by name: try capture='mode'); for "
                           "Hugging Face models use attn_implementation='sdpa'")
        self.ran = set()
        pending, self.pending = self.pending, []
        return pending
