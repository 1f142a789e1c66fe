"""Attention-softmax statistics recomputed from q and k, and the soft-capped attention.
Pure torch, no Lightning."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_stability.ops.softmax_losses import softcap
from lightning_stability.ops.softmax_stats import collapse_headroom

# An additive attention mask hides a key with -inf, or with a large finite negative: Hugging Face
# transformers adds ``torch.finfo(dtype).min``, the original BERT code -10000. At or below this value a
# key is counted as hidden (its probability is below e^-10000 whatever the logits): else a padded key
# would count among the keys a row sees, and the entropy would be divided by the wrong log n_i.
MASKED = -1e4


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


def reduce_attention_calls(calls: Sequence[dict[str, Tensor]]) -> tuple[dict[str, Tensor], Tensor | None]:
    """One layer's statistics from several :func:`attention_stats` results (its calls in one optimizer
    step, one per micro-batch usually): each head's mean entropy averaged over the calls, then the
    minimum and median over heads; extremes over all. Also the per-head largest logits over the calls
    (for QK-clip) where every call has the same heads, else ``None``."""
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


@torch.no_grad()
def mha_query_key(
    query: Tensor,
    key: Tensor,
    num_heads: int,
    in_proj_weight: Tensor | None,
    in_proj_bias: Tensor | None,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    is_causal: bool = False,
    use_separate_proj_weight: bool = False,
    q_proj_weight: Tensor | None = None,
    k_proj_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, bool]:
    """q ``(N, H, L, D)`` and k ``(N, H, S, D)`` of ``nn.MultiheadAttention``'s functional core
    (``multi_head_attention_forward``, which builds them inside) recomputed from its arguments:
    ``query (L, N, E)``, ``key (S, N, E)``, the projection weights (``in_proj_weight``, or
    ``q_proj_weight``/``k_proj_weight`` with ``use_separate_proj_weight``) and bias. Also one additive mask ``(N, H, L, S)``
    (or ``None``) from ``attn_mask`` (``(L, S)`` or ``(N * H, L, S)``) and ``key_padding_mask``
    ``(N, S)``, whose boolean values mark what must NOT be attended, and the causal flag left once the
    mask is there (an ``attn_mask`` given with ``is_causal`` is the causal one)."""
    e = query.shape[-1]
    if use_separate_proj_weight:
        assert q_proj_weight is not None and k_proj_weight is not None
        w_q, w_k = q_proj_weight, k_proj_weight
    else:
        assert in_proj_weight is not None
        w_q, w_k = in_proj_weight[:e], in_proj_weight[e : 2 * e]
    b_q = in_proj_bias[:e].detach() if in_proj_bias is not None else None
    b_k = in_proj_bias[e : 2 * e].detach() if in_proj_bias is not None else None
    q = F.linear(query.detach().transpose(0, 1), w_q.detach(), b_q)
    k = F.linear(key.detach().transpose(0, 1), w_k.detach(), b_k)
    n, lq, _ = q.shape
    s = k.shape[1]
    q = q.view(n, lq, num_heads, e // num_heads).transpose(1, 2)  # (N, H, L, D)
    k = k.view(n, s, num_heads, e // num_heads).transpose(1, 2)  # (N, H, S, D)
    mask = torch.zeros(1, 1, 1, 1, device=q.device)
    for m, shape in ((attn_mask, (1, 1, lq, s) if attn_mask is None or attn_mask.dim() == 2 else (n, num_heads, lq, s)),
                     (key_padding_mask, (n, 1, 1, s))):
        if isinstance(m, Tensor):
            add = torch.zeros(m.shape, device=q.device).masked_fill(m, -math.inf) if m.dtype == torch.bool else m.float()
            mask = mask + add.reshape(shape)
    causal = bool(is_causal) and not isinstance(attn_mask, Tensor)
    return q, k, mask.expand(n, num_heads, lq, s) if mask.numel() > 1 else None, causal


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
