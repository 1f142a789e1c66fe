"""Megatron's QK-clip: the factors, where an attention module's q and k come from, and the in-place
rescaling of their rows (also on row-sharded weights). Pure torch, no Lightning."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_stability.ops.sharded import held_rows, local


def qk_clip_factors(max_logit: Tensor, tau: float = 100.0, alpha: float = 0.5) -> tuple[Tensor, Tensor]:
    """Megatron's QK-clip: ``eta = min(tau / max_logit, 1)``; the query projection is scaled by
    ``eta^alpha`` and the key projection by ``eta^(1 - alpha)``, so every logit ``q.k`` scales by
    ``eta`` and the largest lands on ``tau``. Per head where ``max_logit`` has a head dimension."""
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    eta = (tau / max_logit.float().clamp_min(1e-30)).clamp(max=1.0)
    return eta.pow(alpha), eta.pow(1.0 - alpha)


def output_axis(module: nn.Module) -> tuple[int, int] | None:
    """``(outputs, axis)`` of a linear-like module's weight: an ``nn.Linear`` keeps its outputs along
    axis 0; a ``Conv1D`` (Hugging Face GPT-2, ``y = x @ W + b`` with ``W`` of shape ``(in, out)``, known
    by its ``nf`` attribute) along axis 1. ``None`` for anything else."""
    if isinstance(module, nn.Linear):
        return module.out_features, 0
    weight, nf = getattr(module, "weight", None), getattr(module, "nf", None)
    if isinstance(nf, int) and isinstance(weight, Tensor) and weight.ndim == 2 and weight.shape[1] == nf:
        return nf, 1
    return None


@dataclass(frozen=True)
class QKProjection:
    """Where an attention module's queries and keys come from: the outputs of one or two linear-like
    modules (``nn.Linear``, or a ``Conv1D`` as in GPT-2: :func:`output_axis`), laid out head after head
    (``n_head * head_dim`` query outputs, ``n_kv_head * head_dim`` key outputs). ``weight`` and
    ``bias`` name the modules' parameters: ``nn.MultiheadAttention`` keeps its packed ``[q | k | v]``
    projection as ``in_proj_weight`` and ``in_proj_bias``."""

    q: nn.Module
    k: nn.Module
    q_rows: slice
    k_rows: slice
    n_head: int
    n_kv_head: int
    head_dim: int
    weight: str = "weight"
    bias: str = "bias"

    def __post_init__(self) -> None:
        nq = self.q_rows.stop - self.q_rows.start
        nk = self.k_rows.stop - self.k_rows.start
        if nq != self.n_head * self.head_dim or nk != self.n_kv_head * self.head_dim:
            raise ValueError(
                f"QKProjection: {nq} query rows and {nk} key rows do not make {self.n_head} query heads and "
                f"{self.n_kv_head} key heads of dimension {self.head_dim}"
            )
        if self.n_head % self.n_kv_head:
            raise ValueError(f"QKProjection: {self.n_head} query heads are not a multiple of {self.n_kv_head} key heads")


def _output_axis(module: nn.Module, weight: str = "weight") -> tuple[int, int]:
    if weight != "weight":  # a named 2-D parameter with its outputs along axis 0 (in_proj_weight)
        return module.get_parameter(weight).shape[0], 0
    shape = output_axis(module)
    if shape is None:
        raise TypeError(f"QKProjection: {type(module).__name__} is not an nn.Linear or a Conv1D")
    return shape


def _head_count(module: nn.Module, names: Sequence[str]) -> int | None:
    for owner in (module, getattr(module, "config", None)):
        for name in names:
            value = getattr(owner, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def find_qk_projection(module: nn.Module) -> QKProjection | None:
    """The q/k projections of an attention module, where its layout is a known one: separate
    ``q_proj``/``k_proj`` linears (Hugging Face Llama, Mistral, Qwen, ...; heads from the module or its
    ``config``) or ``query``/``key`` linears (Hugging Face BERT, ViT: ``num_attention_heads``,
    ``attention_head_size``), or one fused ``qkv``/``c_attn``/``Wqkv`` linear whose output is ``[q | k | v]``
    (nanoGPT-style, the demo's ``TinyGPT``; litgpt, whose key/value part has ``n_query_groups`` heads of
    ``head_size``; heads from the module or its ``config``).
    The fused linear may be a ``Conv1D`` (Hugging Face GPT-2's ``c_attn``). ``nn.MultiheadAttention``
    with q, k and v of one width (packed in ``in_proj_weight``: Lightning's ``demos.Transformer``).
    ``None`` otherwise (pass your own :class:`QKProjection`)."""
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim or module.in_proj_weight is None:
            return None  # separate q/k/v weights of other widths: pass a QKProjection
        e, n_head = module.embed_dim, module.num_heads
        return QKProjection(module, module, slice(0, e), slice(e, 2 * e), n_head, n_head, module.head_dim,
                            weight="in_proj_weight", bias="in_proj_bias")
    for q_name, k_name in (("q_proj", "k_proj"), ("query", "key")):
        q, k = getattr(module, q_name, None), getattr(module, k_name, None)
        if not (isinstance(q, nn.Linear) and isinstance(k, nn.Linear)):
            continue
        n_head = _head_count(module, ("num_heads", "num_attention_heads", "n_head", "n_heads"))
        head_dim = _head_count(module, ("head_dim", "attention_head_size")) or (
            q.out_features // n_head if n_head else None)
        if not n_head or not head_dim or k.out_features % head_dim or q.out_features != n_head * head_dim:
            return None
        return QKProjection(q, k, slice(0, q.out_features), slice(0, k.out_features), n_head,
                            k.out_features // head_dim, head_dim)
    for name in ("qkv", "c_attn", "Wqkv"):
        fused = getattr(module, name, None)
        shape = output_axis(fused) if isinstance(fused, nn.Module) else None
        if shape is None:
            continue
        outputs = shape[0]
        n_head = _head_count(module, ("n_head", "num_heads", "n_heads", "num_attention_heads"))
        if not n_head:
            return None
        # grouped key heads where the module or its config says so (litgpt: n_query_groups, head_size)
        n_kv = _head_count(module, ("n_query_groups", "num_key_value_heads", "n_kv_heads", "n_kv_head")) or n_head
        head_dim = _head_count(module, ("head_size", "head_dim")) or outputs // (n_head + 2 * n_kv)
        q_width, k_width = n_head * head_dim, n_kv * head_dim
        if n_head % n_kv or outputs != q_width + 2 * k_width:
            return None
        assert isinstance(fused, nn.Module)
        return QKProjection(fused, fused, slice(0, q_width), slice(q_width, q_width + k_width), n_head, n_kv, head_dim)
    return None


@torch.no_grad()
def apply_qk_clip(proj: QKProjection, head_max_logit: Tensor, tau: float = 100.0, alpha: float = 0.5) -> Tensor:
    """Scale the query and key rows of every head whose largest logit exceeds ``tau`` so that it
    becomes ``tau`` (:func:`qk_clip_factors`); biases too, so the logits scale exactly. Where key heads
    are shared (grouped-query attention) only the queries are scaled (by the whole ``eta``), since a
    shared key head serves heads with different factors. In place, on the device, no host sync.

    Row-sharded weights (FSDP2's ``Shard(0)``) are scaled on each rank's own rows, where a head's rows
    may span two ranks: with the same ``head_max_logit`` on every rank, the whole weight ends up as it
    would unsharded. Returns ``eta`` per query head."""
    if head_max_logit.numel() != proj.n_head:
        raise ValueError(f"head_max_logit has {head_max_logit.numel()} values for {proj.n_head} heads")
    fq, fk = qk_clip_factors(head_max_logit, tau, alpha)
    eta = fq * fk
    if proj.n_kv_head != proj.n_head:
        fq, fk = eta, torch.ones(proj.n_kv_head, device=eta.device)
    # one factor per output of each linear (q and k may be outputs of one fused linear)
    rows: dict[int, tuple[nn.Module, int, Tensor]] = {}
    for linear, span, factor in ((proj.q, proj.q_rows, fq), (proj.k, proj.k_rows, fk)):
        outputs, axis = _output_axis(linear, proj.weight)
        _, _, f = rows.setdefault(id(linear), (linear, axis, torch.ones(outputs, device=eta.device)))
        f[span] *= factor.to(f.device).repeat_interleave(proj.head_dim)
    with torch.no_grad():
        for linear, axis, f in rows.values():
            for t in (linear.get_parameter(proj.weight), getattr(linear, proj.bias, None)):
                if not isinstance(t, Tensor):
                    continue
                shard = local(t.data)
                if axis == 1 and t.ndim == 2:  # outputs along the columns (Conv1D): every held row scales alike
                    shard.mul_(f.to(shard.device, shard.dtype).reshape(1, -1))
                    continue
                start, stop = held_rows(t)
                factor = f[start:stop].to(shard.device, shard.dtype)
                shard.mul_(factor.reshape(-1, *([1] * (shard.ndim - 1))))
    return eta
