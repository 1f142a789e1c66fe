"""Softmax saturation: the statistics of output and attention softmaxes, and the remedies.

Pure torch, no Lightning. Every statistic is computed in float32 (or float64 where the input is)
from the logits, on their device, and returned as device tensors: callers move the few scalars
they log to the host once per logging step.

Three instabilities live in softmaxes:

- **Output logit drift**: the log-partition ``log Z = logsumexp(z)`` moves far from 0; PaLM's z-loss
  ``c (log Z)^2`` holds it there (:func:`z_loss`, :func:`z_loss_grad`).
- **Attention entropy collapse**: attention logits grow until attention is nearly one-hot
  (:func:`attention_stats`; remedies: soft-capping :func:`softcap`, QK-clip :func:`qk_clip_factors`).
- **Softmax Collapse**: past overfitting, logits scale up until the floating-point softmax of the top
  class is exactly 1, so the loss and its gradient are exactly 0 and learning stops. The *collapse
  headroom* (:func:`collapse_headroom`) says in nats how far a row is from it; StableMax
  (:func:`stablemax_cross_entropy`) and perpendicular gradients (:func:`perpendicular_grad_`) avoid it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_stability.ops.sharded import held_rows, local

Reduction = Literal["mean", "sum", "none"]
_LN2 = math.log(2.0)
# An additive attention mask hides a key with -inf, or with a large finite negative: Hugging Face
# transformers adds ``torch.finfo(dtype).min``, the original BERT code -10000. At or below this value a
# key is counted as hidden (its probability is below e^-10000 whatever the logits): else a padded key
# would count among the keys a row sees, and the entropy would be divided by the wrong log n_i.
MASKED = -1e4


def significand_bits(dtype: torch.dtype) -> int:
    """Bits of precision of a floating-point dtype, the implicit bit included: float64 53, float32 24,
    float16 11, bfloat16 8 (``1 - log2(eps)``)."""
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    return int(round(1.0 - math.log2(torch.finfo(dtype).eps)))


def _rows(logits: Tensor) -> Tensor:
    """The logits as ``(rows, classes)`` in at least float32."""
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a class dimension, got shape {tuple(logits.shape)}")
    z = logits.detach().reshape(-1, logits.shape[-1])
    return z if z.dtype == torch.float64 else z.float()


@torch.no_grad()
def collapse_headroom(logits: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Per row, how far the softmax is from rounding to exactly one-hot, in nats.

    ``h = p ln 2 + log sum_{j != top} exp(z_j - z_top)``, ``p`` the significand bits of ``dtype`` (the
    dtype the loss is computed in; default the logits'). The top probability is ``1 / (1 + S)`` with
    ``S`` the sum; it rounds to 1 once ``S`` is below ``2^-p``, that is ``h <= 0``. Computed in the log
    domain, so it stays exact however large the gap (a float32 ``exp`` would underflow first).
    Returns ``(rows,)``; a row with one class has ``-inf`` (nothing to compete with the top).
    """
    z = _rows(logits)
    bits = significand_bits(dtype or logits.dtype)
    top, idx = z.max(dim=-1, keepdim=True)
    rest = z.scatter(-1, idx, float("-inf"))
    log_s = torch.logsumexp(rest - top, dim=-1)
    return bits * _LN2 + log_s


@torch.no_grad()
def softmax_row_stats(logits: Tensor, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Per row of ``logits (..., classes)``, the numbers :func:`softmax_stats` reduces, as ``(rows,)``
    float32 (or float64) device tensors: ``lse`` (``logsumexp``), ``top`` (the largest logit) and
    ``headroom`` (:func:`collapse_headroom` in ``dtype``, default the logits'). Far smaller than the
    logits, so the rows of several micro-batches can be kept and reduced once per optimizer step."""
    z = _rows(logits)
    return {
        "lse": torch.logsumexp(z, dim=-1),
        "top": z.max(dim=-1).values,
        "headroom": collapse_headroom(z, dtype or logits.dtype),
    }


@torch.no_grad()
def reduce_softmax_rows(parts: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """:func:`softmax_stats` of the rows of several :func:`softmax_row_stats` results (micro-batches of
    one optimizer step), as if their logits had come in one batch."""
    if not parts:
        raise ValueError("reduce_softmax_rows needs at least one part")
    lse = torch.cat([p["lse"] for p in parts])
    top = torch.cat([p["top"] for p in parts])
    head = torch.cat([p["headroom"] for p in parts])
    finite = torch.where(torch.isfinite(head), head, torch.full_like(head, -1e30))
    return {
        "logz_mean": lse.mean(),
        "logz_std": lse.std(unbiased=False) if lse.numel() > 1 else torch.zeros_like(lse[0]),
        "logz_max": lse.max(),
        "max_logit": top.max(),
        "pmax_mean": torch.exp(top - lse).mean(),
        "sc_frac": (head <= 0).float().mean(),
        "sc_headroom_p01": torch.quantile(finite, 0.01),
    }


@torch.no_grad()
def softmax_stats(logits: Tensor, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The output-softmax statistics of a batch of logits ``(..., classes)``, as 0-d device tensors.

    ``logz_mean``, ``logz_std``, ``logz_max``: the log-partition ``logsumexp(z)`` per row;
    ``max_logit``; ``pmax_mean``: the mean top probability; ``sc_frac``: the fraction of rows whose
    softmax is exactly one-hot in ``dtype`` (headroom ``<= 0``); ``sc_headroom_p01``: the 1st
    percentile of the collapse headroom (nats; :func:`collapse_headroom`).
    """
    return reduce_softmax_rows([softmax_row_stats(logits, dtype)])


@torch.no_grad()
def zero_loss_counts(logits: Tensor, targets: Tensor, dtype: torch.dtype | None = None, ignore_index: int = -100) -> Tensor:
    """``(2,)``: how many samples have a cross-entropy, computed in ``dtype`` (default the logits'), of
    exactly zero, and how many samples count (targets not ``ignore_index``). Sums of several batches
    give their joint :func:`zero_loss_fraction`."""
    z = logits.detach().reshape(-1, logits.shape[-1]).to(dtype or logits.dtype)
    t = targets.detach().reshape(-1)
    if t.numel() != z.shape[0]:
        raise ValueError(
            f"targets must hold one class per logits row: {t.numel()} targets for {z.shape[0]} rows"
        )
    keep = t != ignore_index
    if not bool(keep.any()):
        return torch.zeros(2, device=z.device)
    loss = F.cross_entropy(z[keep], t[keep], reduction="none")
    return torch.stack([(loss == 0).float().sum(), keep.float().sum()])


def zero_loss_fraction(logits: Tensor, targets: Tensor, dtype: torch.dtype | None = None, ignore_index: int = -100) -> Tensor:
    """The fraction of samples whose cross-entropy, computed in ``dtype`` (default the logits'), is
    exactly zero: rows that have stopped contributing any gradient (Softmax Collapse)."""
    counts = zero_loss_counts(logits, targets, dtype, ignore_index)
    return counts[0] / counts[1].clamp_min(1.0)


@torch.no_grad()
def nlm_alignment(weight: Tensor, grad: Tensor) -> Tensor:
    """``cos(-g, w)``: how far the update direction points along the weights themselves. Near 1 the
    optimizer mostly scales the weights up (naive loss minimisation, the road to Softmax Collapse)."""
    w, g = weight.detach().float().reshape(-1), grad.detach().float().reshape(-1)
    denom = (torch.linalg.vector_norm(w) * torch.linalg.vector_norm(g)).clamp_min(1e-30)
    return -(w @ g) / denom


# -- remedies ----------------------------------------------------------------------------------------
def _reduce(x: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    if reduction == "none":
        return x
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def z_loss(logits: Tensor, coef: float = 1e-4, reduction: Reduction = "mean") -> Tensor:
    """PaLM's auxiliary loss ``coef * (log Z)^2`` per row, ``log Z = logsumexp`` over the last dim
    (computed in at least float32). Add it to the task loss."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    lse = torch.logsumexp(z, dim=-1)
    return _reduce(coef * lse.pow(2), reduction)


@torch.no_grad()
def z_loss_grad(logits: Tensor, coef: float, rows: int | None = None, scale: float | Tensor = 1.0) -> Tensor:
    """The gradient of ``coef * mean((log Z)^2)`` with respect to ``logits``:
    ``2 coef log Z softmax(z) / rows`` (``rows`` defaults to the number of logit rows, the mean's
    denominator), times ``scale`` (a float or a device tensor: ``1 / accumulate_grad_batches``, an AMP
    loss scale), applied in float32 before the cast, so a small gradient scaled up for float16 is not
    flushed to zero first. Returned in the logits' dtype and shape."""
    z = logits.detach()
    zf = z if z.dtype == torch.float64 else z.float()
    lse = torch.logsumexp(zf, dim=-1, keepdim=True)
    n = rows if rows is not None else max(1, zf.numel() // max(1, zf.shape[-1]))
    return (2.0 * coef / n * lse * torch.softmax(zf, dim=-1) * scale).to(z.dtype)


def softcap(x: Tensor, cap: float) -> Tensor:
    """Logit soft-capping ``cap * tanh(x / cap)`` (Gemma 2): smooth, odd, bounded by ``cap``."""
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap!r}")
    return cap * torch.tanh(x / cap)


def _stablemax_s(x: Tensor) -> Tensor:
    return torch.where(x >= 0, x + 1.0, 1.0 / (1.0 - x.clamp(max=0.0)))


def _log_stablemax_s(x: Tensor) -> Tensor:
    return torch.where(x >= 0, torch.log1p(x.clamp(min=0.0)), -torch.log1p(-x.clamp(max=0.0)))


def stablemax(logits: Tensor, dim: int = -1) -> Tensor:
    """StableMax probabilities ``s(x_i) / sum_j s(x_j)`` with ``s(x) = x + 1`` for ``x >= 0`` and
    ``1 / (1 - x)`` for ``x < 0``: no exponential, so no top class absorbs the rest in float32."""
    s = _stablemax_s(logits)
    return s / s.sum(dim=dim, keepdim=True)


def log_stablemax(logits: Tensor, dim: int = -1) -> Tensor:
    """``log`` of :func:`stablemax`, computed from ``log s`` (``log1p``) for accuracy."""
    return _log_stablemax_s(logits) - torch.log(_stablemax_s(logits).sum(dim=dim, keepdim=True))


def stablemax_cross_entropy(
    logits: Tensor, targets: Tensor, reduction: Reduction = "mean", ignore_index: int = -100
) -> Tensor:
    """Cross-entropy under StableMax (the grokking-at-the-edge work's log-StableMax loss):
    ``-log stablemax(z)[target]``, a drop-in for ``F.cross_entropy`` on ``(N, C)`` or ``(..., C)``
    logits with matching integer targets. Stable in float32 (no exponential)."""
    z = logits.reshape(-1, logits.shape[-1])
    z = z if z.dtype == torch.float64 else z.float()
    t = targets.reshape(-1)
    if t.numel() != z.shape[0]:
        raise ValueError(f"targets must hold one class per logits row: {t.numel()} targets for {z.shape[0]} rows")
    keep = t != ignore_index
    safe = torch.where(keep, t, torch.zeros_like(t))
    nll = -log_stablemax(z).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    nll = torch.where(keep, nll, torch.zeros_like(nll))
    if reduction == "mean":
        return nll.sum() / keep.sum().clamp_min(1)
    out = _reduce(nll, reduction)
    return out if reduction == "sum" else out.reshape(targets.shape)


@torch.no_grad()
def perpendicular_grad_(params: Iterable[torch.nn.Parameter], eps: float = 1e-30) -> None:
    """Project each parameter's gradient orthogonal to the parameter, then rescale it to its original
    norm (the perpendicular gradient of the grokking-at-the-edge work): ``g <- ||g|| g_perp /
    ||g_perp||`` with ``g_perp = g - (w.g / w.w) w``. The update then cannot just scale the weights up.
    In place and without a host sync; parameters without a gradient are skipped, and a zero weight or
    a gradient parallel to the weight leaves the gradient as it was."""
    for p in params:
        g = p.grad
        if g is None:
            continue
        w = p.detach().float()
        gf = g.float()
        ww = (w * w).sum()
        perp = gf - (w * gf).sum() / ww.clamp_min(eps) * w
        perp_norm = torch.linalg.vector_norm(perp)
        out = perp * (torch.linalg.vector_norm(gf) / perp_norm.clamp_min(eps))
        keep = (ww <= eps) | (perp_norm <= eps)
        g.copy_(torch.where(keep, gf, out).to(g.dtype))


@torch.no_grad()
def sharded_nlm_and_perp_sums(params: Sequence[torch.nn.Parameter], reduce: Callable[[Tensor], Tensor]) -> Tensor:
    """``(k, 3)``: ``w.g``, ``w.w``, ``g.g`` of each parameter with a gradient, summed over the ranks'
    shards with one ``reduce`` (an all-reduce): the whole tensors' sums, from which both
    :func:`nlm_alignment` and the perpendicular gradient follow without gathering."""
    rows = []
    for p in params:
        w, g = local(p.detach()).float(), local(p.grad).float()  # type: ignore[arg-type]
        rows.append(torch.stack([(w * g).sum(), (w * w).sum(), (g * g).sum()]))
    return reduce(torch.stack(rows))


def nlm_from_sums(sums: Tensor) -> Tensor:
    """:func:`nlm_alignment` of each row of :func:`sharded_nlm_and_perp_sums`, ``(k,)``."""
    return -sums[:, 0] / (sums[:, 1].sqrt() * sums[:, 2].sqrt()).clamp_min(1e-30)


@torch.no_grad()
def sharded_perpendicular_grad_(params: Sequence[torch.nn.Parameter], sums: Tensor, eps: float = 1e-30) -> None:
    """:func:`perpendicular_grad_` on each rank's shards, from the whole tensors' sums (the rows of
    :func:`sharded_nlm_and_perp_sums`): ``||g_perp||^2 = g.g - (w.g)^2 / w.w``, so every rank rescales
    its rows by the same factor."""
    for p, (wg, ww, gg) in zip(params, sums):
        g = local(p.grad)  # type: ignore[arg-type]
        w, gf = local(p.detach()).float(), g.float()
        coef = wg / ww.clamp_min(eps)
        perp_norm = (gg - wg * coef).clamp_min(0.0).sqrt()
        out = (gf - coef * w) * (gg.sqrt() / perp_norm.clamp_min(eps))
        keep = (ww <= eps) | (perp_norm <= eps)
        g.copy_(torch.where(keep, gf, out).to(g.dtype))


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


# -- attention -----------------------------------------------------------------------------------------
def sample_rows(length: int, count: int, generator: torch.Generator) -> Tensor:
    """``count`` distinct query rows drawn from ``generator`` plus always the last row, sorted
    (every row when ``length <= count + 1``)."""
    if length <= count + 1:
        return torch.arange(length)
    picked = torch.randperm(length - 1, generator=generator)[:count]
    return torch.sort(torch.cat([picked, torch.tensor([length - 1])])).values


def _causal_visible(rows: Tensor, s: int) -> Tensor:
    """``(R, S)``: which of ``S`` keys each query row sees under ``is_causal``. As in
    ``scaled_dot_product_attention``, the mask is aligned top-left: row ``i`` sees keys ``j <= i``,
    also when there are more keys than queries (a KV cache needs an explicit mask)."""
    key = torch.arange(s, device=rows.device)
    return key.view(1, -1) <= rows.view(-1, 1)


@torch.no_grad()
def attention_stats(
    q: Tensor,
    k: Tensor,
    rows: Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    attn_mask: Tensor | None = None,
    cap: float | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Per-head statistics of the attention of ``q (B, H, T, D)`` on ``k (B, Hk, S, D)`` for the
    query ``rows`` (default all), recomputed in float32 without materialising ``T x S`` for every row.

    ``scale`` defaults to ``1 / sqrt(D)``; ``is_causal`` masks keys after the query (row ``i`` sees
    keys ``j <= i``, top-left aligned as in ``scaled_dot_product_attention``); ``attn_mask`` is a boolean mask
    (True attends) or an additive float mask broadcastable to ``(B, H, T, S)`` (a value at or below
    ``MASKED``, -1e4, hides the key: -inf, ``finfo.min``, BERT's -10000); ``cap`` soft-caps the
    scaled logits; grouped-query ``k`` (``H`` a multiple of ``Hk``) is expanded here. ``dtype`` is the
    dtype the attention runs in, for the precision headroom.

    Returns ``(H,)`` tensors: ``entropy_mean`` and ``entropy_min`` (row entropy divided by
    ``log n_i``, ``n_i`` the keys row ``i`` sees), ``max_logit`` (the largest visible logit),
    ``pmax_p99`` (99th percentile of each row's top probability) and
    ``headroom_min`` (the smallest :func:`collapse_headroom`, nats). Rows that see one key have no
    choice to make and are left out of all but ``max_logit``.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (batch, heads, length, dim), got {tuple(q.shape)} and {tuple(k.shape)}")
    b, h, t, d = q.shape
    hk, s = k.shape[1], k.shape[2]
    if h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key heads ({hk})")
    idx = torch.arange(t, device=q.device) if rows is None else rows.to(q.device)
    qs = q.detach()[:, :, idx].float()  # (B, H, R, D)
    kf = k.detach().float()
    if hk != h:
        kf = kf.repeat_interleave(h // hk, dim=1)
    logits = torch.matmul(qs, kf.transpose(-2, -1)) * (scale if scale is not None else 1.0 / math.sqrt(d))
    if cap is not None:
        logits = softcap(logits, cap)
    visible = torch.ones(b, h, idx.numel(), s, dtype=torch.bool, device=q.device)
    if is_causal:
        visible = visible & _causal_visible(idx, s)
    if attn_mask is not None:
        mask = attn_mask.expand(b, h, t, s)[:, :, idx]
        if mask.dtype == torch.bool:
            visible = visible & mask
        else:
            logits = logits + mask.float()
            visible = visible & (mask > MASKED)  # -inf and NaN are hidden too
    logits = logits.masked_fill(~visible, float("-inf"))
    n = visible.sum(-1)  # (B, H, R)
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    ent = -(p * torch.where(visible, logp, torch.zeros_like(logp))).sum(-1)
    has_choice = n > 1
    norm = torch.where(has_choice, ent / torch.log(n.clamp_min(2).float()), torch.full_like(ent, math.nan))
    per_head = norm.transpose(0, 1).reshape(h, -1)  # (H, B * R)
    seen = logits.amax(dim=-1)  # (B, H, R); hidden keys are -inf already
    pmax = torch.where(has_choice, p.amax(dim=-1), torch.full_like(ent, math.nan)).transpose(0, 1).reshape(h, -1)
    head = collapse_headroom(logits, dtype or q.dtype).reshape(b, h, -1).transpose(0, 1).reshape(h, -1)
    head = torch.where(has_choice.transpose(0, 1).reshape(h, -1), head, torch.full_like(head, math.inf))
    return {
        "entropy_mean": torch.nanmean(per_head, dim=1),
        "entropy_min": torch.where(torch.isnan(per_head), torch.full_like(per_head, math.inf), per_head).amin(dim=1),
        "max_logit": seen.transpose(0, 1).reshape(h, -1).amax(dim=1),
        "pmax_p99": torch.nanquantile(pmax, 0.99, dim=1),
        "headroom_min": head.amin(dim=1),
    }


def softcapped_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    cap: float = 50.0,
) -> Tensor:
    """``scaled_dot_product_attention`` with the scaled logits soft-capped, ``cap tanh(q.k scale / cap)``
    (Gemma 2 used 50), before the mask is added: the same arguments and result layout ``(..., T, Dv)``.

    No fused SDPA kernel applies a cap, so this is the math: it materialises the ``(..., T, S)`` logits
    (and autograd keeps them for the backward), computes the softmax in float32 and returns the
    query's dtype. ``enable_gqa`` expands grouped key/value heads (dim -3) as SDPA does.
    """
    if attn_mask is not None and is_causal:
        raise ValueError("softcapped_attention: pass attn_mask or is_causal, not both (as scaled_dot_product_attention)")
    d = query.shape[-1]
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        groups = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(groups, dim=-3), value.repeat_interleave(groups, dim=-3)
    factor = scale if scale is not None else 1.0 / math.sqrt(d)
    logits = softcap(torch.matmul(query.float(), key.float().transpose(-2, -1)) * factor, cap)  # (..., T, S)
    if is_causal:
        t = query.shape[-2]
        logits = logits.masked_fill(~_causal_visible(torch.arange(t, device=query.device), key.shape[-2]), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask.float()
    p = torch.softmax(logits, dim=-1)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    return torch.matmul(p.to(value.dtype), value)


# -- QK-clip -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QKProjection:
    """Where an attention module's queries and keys come from: the rows of one or two ``nn.Linear``
    weights, laid out head after head (``n_head * head_dim`` query rows, ``n_kv_head * head_dim`` key
    rows)."""

    q: nn.Linear
    k: nn.Linear
    q_rows: slice
    k_rows: slice
    n_head: int
    n_kv_head: int
    head_dim: int

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
    ``None`` otherwise (pass your own :class:`QKProjection`)."""
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
        if not isinstance(fused, nn.Linear):
            continue
        n_head = _head_count(module, ("n_head", "num_heads", "n_heads", "num_attention_heads"))
        if not n_head:
            return None
        # grouped key heads where the module or its config says so (litgpt: n_query_groups, head_size)
        n_kv = _head_count(module, ("n_query_groups", "num_key_value_heads", "n_kv_heads", "n_kv_head")) or n_head
        head_dim = _head_count(module, ("head_size", "head_dim")) or fused.out_features // (n_head + 2 * n_kv)
        q_width, k_width = n_head * head_dim, n_kv * head_dim
        if n_head % n_kv or fused.out_features != q_width + 2 * k_width:
            return None
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
    # one factor per output row of each linear (q and k may be rows of one fused linear)
    rows: dict[int, tuple[nn.Linear, Tensor]] = {}
    for linear, span, factor in ((proj.q, proj.q_rows, fq), (proj.k, proj.k_rows, fk)):
        _, f = rows.setdefault(id(linear), (linear, torch.ones(linear.out_features, device=eta.device)))
        f[span] *= factor.to(f.device).repeat_interleave(proj.head_dim)
    with torch.no_grad():
        for linear, f in rows.values():
            for t in (linear.weight, linear.bias):
                if t is None:
                    continue
                start, stop = held_rows(t)
                shard = local(t.data)
                factor = f[start:stop].to(shard.device, shard.dtype)
                shard.mul_(factor.reshape(-1, *([1] * (shard.ndim - 1))))
    return eta
