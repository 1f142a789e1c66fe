from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from lightning_stability.ops.saturation import (
    QKProjection,
    apply_qk_clip,
    attention_stats,
    collapse_headroom,
    find_qk_projection,
    log_stablemax,
    nlm_alignment,
    perpendicular_grad_,
    qk_clip_factors,
    sample_rows,
    significand_bits,
    softcap,
    softcapped_attention,
    softmax_stats,
    stablemax,
    stablemax_cross_entropy,
    z_loss,
    z_loss_grad,
    zero_loss_fraction,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_significand_bits():
    assert significand_bits(torch.float64) == 53
    assert significand_bits(torch.float32) == 24
    assert significand_bits(torch.float16) == 11
    assert significand_bits(torch.bfloat16) == 8
    with pytest.raises(ValueError, match="floating-point"):
        significand_bits(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_collapse_headroom_sign_is_whether_the_softmax_rounds_to_one_hot(dtype):
    # a two-class row with gap g: the top probability is 1 / (1 + e^-g); h = p ln2 - g
    p = significand_bits(dtype)
    edge = p * math.log(2.0)
    gaps = torch.tensor([edge - 3.0, edge - 0.5, edge + 0.5, edge + 3.0], dtype=torch.float64)
    logits = torch.stack([gaps, torch.zeros_like(gaps)], dim=-1)
    h = collapse_headroom(logits, dtype)
    assert_close(h, (edge - gaps), rtol=0, atol=1e-9)
    # against floating point itself: the softmax's sum 1 + S, in that dtype, is exactly 1 (the top
    # probability exp(0) / sum is then exactly 1 and its cross-entropy exactly 0)
    one = torch.ones(4, dtype=dtype)
    one_hot = (one + torch.exp(-gaps).to(dtype)) == one
    assert one_hot.tolist() == [False, False, True, True]
    assert ((h <= 0) == one_hot).all()


def test_collapse_headroom_many_classes_and_huge_gaps_stay_finite_in_log_domain():
    z = torch.tensor([[1000.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    h = collapse_headroom(z, torch.float32)
    expected0 = 24 * math.log(2.0) + math.log(3.0) - 1000.0
    expected1 = 24 * math.log(2.0) + math.log(3.0)
    assert_close(h, torch.tensor([expected0, expected1]), rtol=1e-6, atol=1e-4)


def test_softmax_stats_against_direct_formulas():
    z = torch.randn(6, 5, 11, generator=_gen(1)) * 4
    z[0, 0] = torch.tensor([30.0] + [0.0] * 10)  # one collapsed row in float32, not in float64
    stats = softmax_stats(z)
    flat = z.reshape(-1, 11).double()
    lse = torch.logsumexp(flat, -1)
    assert_close(stats["logz_mean"].double(), lse.mean(), rtol=1e-5, atol=1e-5)
    assert_close(stats["logz_std"].double(), lse.std(unbiased=False), rtol=1e-4, atol=1e-5)
    assert_close(stats["logz_max"].double(), lse.max(), rtol=1e-6, atol=1e-5)
    assert float(stats["max_logit"]) == 30.0
    assert_close(stats["pmax_mean"].double(), torch.softmax(flat, -1).max(-1).values.mean(), rtol=1e-5, atol=1e-6)
    assert float(stats["sc_frac"]) == pytest.approx(1 / 30)
    assert float(stats["sc_headroom_p01"]) < 0  # the collapsed row is the lowest percentile
    # in float64 the same row still has headroom
    assert float(softmax_stats(z, torch.float64)["sc_frac"]) == 0.0


def test_zero_loss_fraction_counts_exactly_zero_losses():
    z = torch.tensor([[25.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 200.0, 0.0], [5.0, 0.0, 0.0]])
    t = torch.tensor([0, 0, 1, 1])
    assert float(zero_loss_fraction(z, t)) == pytest.approx(0.5)
    assert float(zero_loss_fraction(z.double(), t)) == pytest.approx(0.25)  # float64 has more room
    t_ignored = torch.tensor([0, -100, -100, -100])
    assert float(zero_loss_fraction(z, t_ignored)) == 1.0
    with pytest.raises(ValueError, match="one class per logits row"):
        zero_loss_fraction(z, torch.tensor([0, 1]))


def test_nlm_alignment_is_the_cosine_of_minus_gradient_and_weight():
    w = torch.randn(4, 5, generator=_gen(2))
    assert float(nlm_alignment(w, -3 * w)) == pytest.approx(1.0, abs=1e-6)
    assert float(nlm_alignment(w, w)) == pytest.approx(-1.0, abs=1e-6)
    g = torch.randn(4, 5, generator=_gen(3))
    expected = F.cosine_similarity(-g.reshape(1, -1), w.reshape(1, -1)).item()
    assert float(nlm_alignment(w, g)) == pytest.approx(expected, abs=1e-6)


def test_z_loss_and_its_gradient_agree_with_autograd():
    z = (torch.randn(3, 4, 7, generator=_gen(4)) * 5).requires_grad_()
    lse = torch.logsumexp(z.detach().double(), -1)
    assert float(z_loss(z.detach(), 1e-3)) == pytest.approx(float(1e-3 * lse.pow(2).mean()), rel=1e-5)
    assert z_loss(z, 1e-3, reduction="none").shape == (3, 4)
    z_loss(z, 1e-3).backward()
    assert_close(z_loss_grad(z, 1e-3), z.grad, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="reduction"):
        z_loss(z, reduction="avg")  # type: ignore[arg-type]


def test_softcap_bounds_and_is_near_identity_for_small_values():
    x = torch.tensor([-1e4, -30.0, -0.1, 0.0, 0.1, 30.0, 1e4])
    y = softcap(x, 30.0)
    assert (y.abs() <= 30.0).all() and float(y[-1]) == pytest.approx(30.0)
    assert float(y[4]) == pytest.approx(0.1, rel=1e-5)
    assert float(y[5]) == pytest.approx(30 * math.tanh(1.0))
    with pytest.raises(ValueError, match="cap must be > 0"):
        softcap(x, 0.0)


def test_stablemax_matches_its_definition_and_float64():
    x = torch.tensor([[-3.0, -0.5, 0.0, 2.0, 10.0]])
    s = torch.tensor([[1 / 4, 1 / 1.5, 1.0, 3.0, 11.0]])
    assert_close(stablemax(x), s / s.sum(), rtol=1e-6, atol=0)
    assert_close(log_stablemax(x).exp(), stablemax(x), rtol=1e-6, atol=0)
    # float32 against float64 on logits large enough that softmax would collapse
    z = torch.randn(64, 113, generator=_gen(5), dtype=torch.float64) * 1e3
    t = torch.randint(0, 113, (64,), generator=_gen(6))
    ref = stablemax_cross_entropy(z, t)
    got = stablemax_cross_entropy(z.float(), t)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(ref), rel=1e-5)
    ref_direct = -torch.log(stablemax(z)[torch.arange(64), t]).mean()
    assert float(ref) == pytest.approx(float(ref_direct), rel=1e-10)
    # ignore_index and reductions
    t2 = t.clone()
    t2[:10] = -100
    assert float(stablemax_cross_entropy(z, t2)) == pytest.approx(float(stablemax_cross_entropy(z[10:], t[10:])), rel=1e-12)
    assert stablemax_cross_entropy(z.reshape(8, 8, 113), t.reshape(8, 8), reduction="none").shape == (8, 8)
    # it has a gradient where cross-entropy's is exactly zero
    big = torch.tensor([[200.0, 0.0, 0.0]], requires_grad=True)
    F.cross_entropy(big, torch.tensor([0])).backward()
    assert float(big.grad.abs().sum()) == 0.0
    big.grad = None
    stablemax_cross_entropy(big, torch.tensor([0])).backward()
    assert float(big.grad.abs().sum()) > 0.0


def test_perpendicular_grad_is_orthogonal_to_the_weight_with_the_same_norm():
    p = torch.nn.Parameter(torch.randn(6, 4, generator=_gen(7)))
    g = torch.randn(6, 4, generator=_gen(8)) + 0.5 * p.detach()
    p.grad = g.clone()
    q = torch.nn.Parameter(torch.zeros(3))
    q.grad = torch.ones(3)
    r = torch.nn.Parameter(torch.ones(2))  # no gradient: left alone
    perpendicular_grad_([p, q, r])
    assert abs(float((p.grad * p.detach()).sum())) < 1e-5
    assert float(p.grad.norm()) == pytest.approx(float(g.norm()), rel=1e-6)
    # the perpendicular part's direction is kept
    perp = g - (g * p.detach()).sum() / (p.detach() ** 2).sum() * p.detach()
    assert_close(p.grad / p.grad.norm(), perp / perp.norm(), rtol=1e-5, atol=1e-6)
    assert torch.equal(q.grad, torch.ones(3))  # zero weight: unchanged
    assert r.grad is None


def test_qk_clip_factors_follow_megatrons_rule():
    max_logit = torch.tensor([50.0, 100.0, 400.0])
    fq, fk = qk_clip_factors(max_logit, tau=100.0, alpha=0.5)
    assert_close(fq, torch.tensor([1.0, 1.0, 0.5]))
    assert_close(fq * fk * max_logit, torch.tensor([50.0, 100.0, 100.0]))
    fq, fk = qk_clip_factors(max_logit, tau=100.0, alpha=1.0)
    assert_close(fq, torch.tensor([1.0, 1.0, 0.25])) and assert_close(fk, torch.ones(3))
    with pytest.raises(ValueError, match="alpha"):
        qk_clip_factors(max_logit, alpha=1.5)


def test_sample_rows():
    rows = sample_rows(1000, 64, _gen(9))
    assert rows.numel() == 65 and int(rows[-1]) == 999 and rows.unique().numel() == 65
    assert torch.equal(rows, sample_rows(1000, 64, _gen(9)))
    assert torch.equal(sample_rows(10, 64, _gen(9)), torch.arange(10))


def _eager_attention(q, k, scale, causal, mask=None, cap=None):
    h, hk = q.shape[1], k.shape[1]
    k = k.repeat_interleave(h // hk, dim=1)
    s = (q.double() @ k.double().transpose(-2, -1)) * scale
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    t, n = q.shape[2], k.shape[2]
    visible = torch.ones(t, n, dtype=torch.bool)
    if causal:
        visible = torch.tril(visible)  # top-left aligned, as scaled_dot_product_attention's is_causal
    visible = visible.expand_as(s).clone()
    if mask is not None:
        visible &= mask.expand_as(s)
    s = s.masked_fill(~visible, float("-inf"))
    return s, torch.softmax(s, -1), visible


@pytest.mark.parametrize("gqa", [1, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_stats_match_eager_materialised_attention(gqa, causal):
    b, h, t, d = 2, 4, 12, 8
    q = torch.randn(b, h, t, d, generator=_gen(10)) * 2
    k = torch.randn(b, h // gqa, t, d, generator=_gen(11)) * 2
    scale = 1 / math.sqrt(d)
    stats = attention_stats(q, k, is_causal=causal)
    s, p, visible = _eager_attention(q, k, scale, causal)
    n = visible.sum(-1)
    ent = -(p * torch.where(visible, p.log(), torch.zeros_like(p))).sum(-1)
    norm = torch.where(n > 1, ent / n.clamp_min(2).double().log(), torch.full_like(ent, float("nan")))
    per_head = norm.transpose(0, 1).reshape(h, -1)
    assert_close(stats["entropy_mean"].double(), torch.nanmean(per_head, 1), rtol=1e-5, atol=1e-6)
    expected_min = torch.where(per_head.isnan(), torch.full_like(per_head, math.inf), per_head).amin(1)
    assert_close(stats["entropy_min"].double(), expected_min, rtol=1e-5, atol=1e-6)
    assert_close(stats["max_logit"].double(), s.transpose(0, 1).reshape(h, -1).amax(1), rtol=1e-5, atol=1e-5)
    pmax = torch.where(n > 1, p.amax(-1), torch.full_like(ent, float("nan"))).transpose(0, 1).reshape(h, -1)
    assert_close(stats["pmax_p99"].double(), torch.nanquantile(pmax, 0.99, dim=1), rtol=1e-5, atol=1e-6)
    # entropies are normalised: within [0, 1]
    assert ((stats["entropy_min"] >= -1e-6) & (stats["entropy_mean"] <= 1 + 1e-6)).all()


def test_attention_stats_on_sampled_rows_with_masks_and_cap():
    b, h, t, d = 1, 2, 20, 4
    q = torch.randn(b, h, t, d, generator=_gen(12)) * 5
    k = torch.randn(b, h, t, d, generator=_gen(13)) * 5
    mask = torch.rand(1, 1, t, t, generator=_gen(14)) > 0.3
    mask[..., 0] = True  # every row sees a key
    rows = torch.tensor([0, 3, 7, 19])
    stats = attention_stats(q, k, rows=rows, scale=0.3, attn_mask=mask, cap=5.0, is_causal=True)
    s, p, visible = _eager_attention(q, k, 0.3, True, mask=mask, cap=5.0)
    s, p, visible = s[:, :, rows], p[:, :, rows], visible[:, :, rows]
    assert_close(stats["max_logit"].double(), s.amax(-1).amax(-1)[0], rtol=1e-5, atol=1e-5)
    assert (stats["max_logit"] <= 5.0).all()  # the cap bounds it
    # an additive float mask is the same as the boolean one
    fmask = torch.zeros(1, 1, t, t).masked_fill(~mask, float("-inf"))
    stats_f = attention_stats(q, k, rows=rows, scale=0.3, attn_mask=fmask, cap=5.0, is_causal=True)
    for key in stats:
        assert_close(stats_f[key], stats[key])
    # a one-hot head: entropy 0, p_max 1, no headroom in float32
    q1 = torch.zeros(1, 1, 4, 2)
    q1[..., 0] = 1e3
    k1 = torch.zeros(1, 1, 4, 2)
    k1[0, 0, 0, 0] = 1.0
    one = attention_stats(q1, k1, scale=1.0)
    assert float(one["entropy_min"]) == pytest.approx(0.0, abs=1e-6)
    assert float(one["pmax_p99"]) == pytest.approx(1.0)
    assert float(one["headroom_min"]) < 0
    with pytest.raises(ValueError, match="multiple of key heads"):
        attention_stats(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, 2))


class _HFStyle(torch.nn.Module):
    def __init__(self, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, head_dim
        self.q_proj = torch.nn.Linear(16, heads * head_dim)
        self.k_proj = torch.nn.Linear(16, kv_heads * head_dim)

    def logits(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        return attention_stats(q, k, scale=1.0)["max_logit"]


class _Fused(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.n_head = 4
        self.qkv = torch.nn.Linear(16, 48)

    def logits(self, x):
        b, t, _ = x.shape
        q, k, _ = self.qkv(x).split(16, dim=2)
        q, k = (z.view(b, t, 4, 4).transpose(1, 2) for z in (q, k))
        return attention_stats(q, k, scale=1.0)["max_logit"]


@pytest.mark.parametrize("make", [lambda: _HFStyle(4, 4, 4), lambda: _HFStyle(4, 2, 4), _Fused])
def test_qk_clip_brings_every_head_above_tau_down_to_tau_and_leaves_the_rest(make):
    torch.manual_seed(0)
    module = make()
    proj = find_qk_projection(module)
    assert proj is not None and proj.n_head == 4
    x = torch.randn(2, 6, 16) * 3
    before = module.logits(x).detach()
    tau = float(before.median())  # some heads above, some below
    v_before = module.qkv.weight[32:].detach().clone() if isinstance(module, _Fused) else None
    apply_qk_clip(proj, before, tau=tau, alpha=0.5)
    after = module.logits(x).detach()
    above = before > tau
    assert above.any() and (~above).any()
    torch.testing.assert_close(after[above], torch.full_like(after[above], tau), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after[~above], before[~above], rtol=1e-5, atol=1e-5)
    if v_before is not None:
        assert torch.equal(module.qkv.weight[32:], v_before)  # the values are untouched


def test_qk_clip_on_hugging_face_gpt2s_conv1d_attention():
    # GPT-2's fused c_attn is a transformers Conv1D (weight (in, out), y = x @ W + b), not an nn.Linear
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    torch.manual_seed(0)
    attn = GPT2Attention(transformers.GPT2Config(n_embd=16, n_head=4, n_positions=8), layer_idx=0)
    proj = find_qk_projection(attn)
    assert proj is not None and (proj.n_head, proj.n_kv_head, proj.head_dim) == (4, 4, 4)

    def logits(x):
        b, t, _ = x.shape
        q, k, _ = attn.c_attn(x).split(16, dim=2)
        q, k = (z.view(b, t, 4, 4).transpose(1, 2) for z in (q, k))
        return attention_stats(q, k, scale=1.0)["max_logit"]

    x = torch.randn(2, 6, 16) * 3
    before = logits(x).detach()
    tau = float(before.median())
    values = attn.c_attn.weight[:, 32:].detach().clone(), attn.c_attn.bias[32:].detach().clone()
    apply_qk_clip(proj, before, tau=tau, alpha=0.5)
    after = logits(x).detach()
    above = before > tau
    assert above.any() and (~above).any()
    torch.testing.assert_close(after[above], torch.full_like(after[above], tau), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after[~above], before[~above], rtol=1e-5, atol=1e-5)
    assert torch.equal(attn.c_attn.weight[:, 32:], values[0]) and torch.equal(attn.c_attn.bias[32:], values[1])


def test_qk_clip_on_multihead_attentions_packed_in_proj_weight():
    # nn.MultiheadAttention keeps q, k and v as rows of one in_proj_weight (and in_proj_bias); the logits
    # are read back through its own forward (need_weights: softmax of the scaled logits, head by head)
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    torch.nn.init.normal_(mha.in_proj_bias, std=0.5)
    proj = find_qk_projection(mha)
    assert proj is not None and (proj.n_head, proj.n_kv_head, proj.head_dim) == (4, 4, 4)

    def logits(x):
        q, k, _ = torch.nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias).split(16, dim=2)
        b, t, _ = x.shape
        q, k = (z.view(b, t, 4, 4).transpose(1, 2) for z in (q, k))
        return attention_stats(q, k, scale=1.0)["max_logit"]

    x = torch.randn(2, 6, 16) * 3
    before = logits(x).detach()
    tau = float(before.median())
    probs_before = mha(x, x, x, need_weights=True, average_attn_weights=False)[1].detach()
    values = mha.in_proj_weight[32:].detach().clone(), mha.in_proj_bias[32:].detach().clone()
    apply_qk_clip(proj, before, tau=tau, alpha=0.5)
    after = logits(x).detach()
    above = before > tau
    assert above.any() and (~above).any()
    torch.testing.assert_close(after[above], torch.full_like(after[above], tau), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after[~above], before[~above], rtol=1e-5, atol=1e-5)
    assert torch.equal(mha.in_proj_weight[32:], values[0]) and torch.equal(mha.in_proj_bias[32:], values[1])
    # the module's own attention: unchanged where no head was clipped, flatter where one was
    probs_after = mha(x, x, x, need_weights=True, average_attn_weights=False)[1].detach()
    heads = above.reshape(-1)
    torch.testing.assert_close(probs_after[:, ~heads], probs_before[:, ~heads], rtol=1e-5, atol=1e-6)
    assert (probs_after[:, heads].amax(-1) < probs_before[:, heads].amax(-1) + 1e-6).all()
    # q/k/v of other widths (kdim, vdim) are separate weights: not found, the user passes a QKProjection
    assert find_qk_projection(torch.nn.MultiheadAttention(16, 4, kdim=12, vdim=12)) is None


def test_find_qk_projection_returns_none_for_unknown_layouts():
    assert find_qk_projection(torch.nn.Linear(4, 4)) is None
    with pytest.raises(ValueError, match="query rows"):
        QKProjection(torch.nn.Linear(4, 8), torch.nn.Linear(4, 8), slice(0, 8), slice(0, 8), 3, 3, 2)


@pytest.mark.parametrize("case", ["causal", "bool_mask", "float_mask", "gqa", "cross"])
def test_softcapped_attention_with_a_far_cap_is_scaled_dot_product_attention(case):
    b, h, t, d = 2, 4, 10, 8
    q = torch.randn(b, h, t, d, generator=_gen(30))
    k = torch.randn(b, h, t + (3 if case == "cross" else 0), d, generator=_gen(31))
    v = torch.randn(b, h, k.shape[2], 6, generator=_gen(32))
    kwargs: dict = {"scale": 0.2}
    if case == "causal" or case == "cross":
        kwargs["is_causal"] = True
    elif case == "bool_mask":
        kwargs["attn_mask"] = torch.rand(b, 1, t, t, generator=_gen(33)) > 0.4
        kwargs["attn_mask"][..., 0] = True
    elif case == "float_mask":
        kwargs["attn_mask"] = torch.randn(1, h, t, t, generator=_gen(34))
    else:
        k, v = k[:, :2], v[:, :2]
        kwargs["enable_gqa"] = True
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert_close(softcapped_attention(q, k, v, cap=1e7, **kwargs), expected, rtol=1e-5, atol=1e-5)


def test_softcapped_attention_caps_the_logits_and_differentiates_like_the_formula():
    b, h, t, d = 1, 2, 7, 4
    q = (torch.randn(b, h, t, d, generator=_gen(35)) * 6).requires_grad_()
    k = (torch.randn(b, h, t, d, generator=_gen(36)) * 6).requires_grad_()
    v = torch.randn(b, h, t, d, generator=_gen(37)).requires_grad_()
    out = softcapped_attention(q, k, v, is_causal=True, cap=5.0)
    # the formula in float64: cap tanh(q.k / sqrt(d) / cap), causal mask, softmax, @ v
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    logits = 5.0 * torch.tanh(q64 @ k64.transpose(-2, -1) / math.sqrt(d) / 5.0)
    logits = logits.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    ref = torch.softmax(logits, -1) @ v64
    assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    # the logits here reach far above the cap: uncapped attention is a different function
    assert (out - F.scaled_dot_product_attention(q, k, v, is_causal=True)).abs().max() > 0.1
    grad = torch.randn(out.shape, generator=_gen(38))
    out.backward(grad)
    ref.backward(grad.double())
    for ours, theirs in ((q, q64), (k, k64), (v, v64)):
        assert_close(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="attn_mask or is_causal"):
        softcapped_attention(q, k, v, attn_mask=torch.ones(t, t, dtype=torch.bool), is_causal=True)


def test_attention_stats_causal_mask_is_top_left_aligned_as_in_sdpa():
    # more keys than queries: SDPA's is_causal lets row i see keys 0..i, not the last i + S - T
    q = torch.randn(1, 2, 5, 4, generator=_gen(40)) * 3
    k = torch.randn(1, 2, 9, 4, generator=_gen(41)) * 3
    causal = attention_stats(q, k, is_causal=True)
    explicit = attention_stats(q, k, attn_mask=torch.ones(5, 9, dtype=torch.bool).tril().view(1, 1, 5, 9))
    bottom_right = attention_stats(q, k, attn_mask=torch.ones(5, 9, dtype=torch.bool).tril(4).view(1, 1, 5, 9))
    for key in ("entropy_mean", "max_logit", "pmax_p99"):
        assert_close(causal[key], explicit[key])
    assert not torch.allclose(causal["entropy_mean"], bottom_right["entropy_mean"])


@pytest.mark.parametrize("hidden", [float("-inf"), torch.finfo(torch.float32).min, torch.finfo(torch.float16).min, -10000.0])
def test_attention_stats_additive_masks_hide_keys_as_a_boolean_mask_does(hidden):
    # Hugging Face adds finfo(dtype).min, the original BERT -10000, others -inf: each hides the key, so
    # the row's keys (the entropy's log n_i) are the unmasked ones; an additive mask read as "finite
    # means visible" would count the padded keys and divide by log 10 instead of log 6
    q = torch.randn(2, 2, 5, 4, generator=_gen(3))
    k = torch.randn(2, 2, 10, 4, generator=_gen(4))
    keep = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    keep[1, ..., 6:] = False
    additive = torch.zeros(2, 1, 1, 10).masked_fill(~keep, hidden)
    ref = attention_stats(q, k, attn_mask=keep)
    got = attention_stats(q, k, attn_mask=additive)
    for key in ("entropy_mean", "entropy_min", "max_logit", "pmax_p99"):
        assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6)
    # and the boolean reference is the materialised attention over the 6 keys
    p = torch.softmax((q[1] @ k[1, :, :6].transpose(-1, -2)) / 2.0, -1)
    ent = (-(p * p.log()).sum(-1) / math.log(6)).min(-1).values
    assert_close(ref["entropy_min"], torch.minimum(ent, attention_stats(q[:1], k[:1])["entropy_min"]), rtol=1e-5, atol=1e-6)


def test_softmax_rows_of_micro_batches_reduce_as_one_batch():
    from lightning_stability.ops.saturation import reduce_softmax_rows, softmax_row_stats, zero_loss_counts

    z = torch.randn(6, 7, 11, generator=_gen(5)) * 5
    z[4, 2] = torch.tensor([200.0] + [0.0] * 10)
    t = torch.randint(0, 11, (6, 7), generator=_gen(6))
    t[4, 2] = 0
    whole = softmax_stats(z)
    parts = reduce_softmax_rows([softmax_row_stats(z[:2]), softmax_row_stats(z[2:])])
    for key in whole:
        assert_close(parts[key], whole[key], rtol=1e-6, atol=1e-6)
    counts = zero_loss_counts(z[:2], t[:2]) + zero_loss_counts(z[2:], t[2:])
    assert_close(counts[0] / counts[1], zero_loss_fraction(z, t))
    assert float(counts[0]) == 1.0


def test_z_loss_grad_scale_is_applied_before_the_cast():
    # float16 logits: the gradient 2 c lse p / rows (~1e-9 here) flushes to zero in float16 unless it is
    # scaled (an AMP loss scale of 2^16) in float32 first
    z = (torch.randn(64, 50, generator=_gen(7)) * 3).half()
    plain = z_loss_grad(z, 1e-4, rows=4096)
    scaled = z_loss_grad(z, 1e-4, rows=4096, scale=torch.tensor(65536.0))
    exact = z_loss_grad(z.double(), 1e-4, rows=4096) * 65536.0
    assert float(plain.abs().max()) < float(exact.abs().max()) / 1000  # mostly flushed to zero
    assert_close(scaled.double(), exact, rtol=2e-3, atol=1e-7)
