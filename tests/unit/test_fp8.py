from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from lightning_stability.ops.fp8 import (
    E4M3,
    E5M2,
    FP8Format,
    _round_arithmetic,
    amax_from_history,
    axiswise_scale,
    current_scale,
    delayed_scale,
    fp8_health,
    fp8_linear,
    fp8_linear_rowwise,
    quantize,
    roll_history,
    round_to_format,
)


def _all_values(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of an FP8 dtype, from its 256 bit patterns."""
    v = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    return v[torch.isfinite(v)]


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_formats_match_torch_dtypes(fmt):
    values = _all_values(fmt.torch_dtype)
    assert float(values.max()) == fmt.max_value
    assert float(values[values > 0].min()) == fmt.min_subnormal
    assert float(values[values >= fmt.min_normal].min()) == fmt.min_normal


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_arithmetic_rounding_is_torchs_cast_exactly(fmt):
    values = _all_values(fmt.torch_dtype).sort().values.double()
    mids = (values[1:] + values[:-1]) / 2  # exact ties: round to even
    g = torch.Generator().manual_seed(0)
    rand = (torch.randn(20000, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-20, 18, (20000,), generator=g)))
    x = torch.cat([values, mids, rand, torch.tensor([1e9, -1e9, 0.0, fmt.min_subnormal / 2, fmt.min_subnormal * 0.51])])
    xf = x.float()
    expected = xf.clamp(-fmt.max_value, fmt.max_value).to(fmt.torch_dtype).float()
    assert torch.equal(_round_arithmetic(xf, fmt), expected)
    assert torch.equal(round_to_format(xf, fmt), expected)


def test_saturation_nan_and_underflow():
    x = torch.tensor([1e6, -1e6, float("nan"), E4M3.min_subnormal * 0.49, 300.0])
    out = round_to_format(x, E4M3)
    assert out[0] == 448 and out[1] == -448 and math.isnan(out[2]) and out[3] == 0 and out[4] == 288
    # E5M2 has infinities: a plain cast overflows where the saturating one stops at the largest value
    assert math.isinf(float(torch.tensor(1e6).to(torch.float8_e5m2).float()))
    assert float(round_to_format(torch.tensor(1e6), E5M2)) == 57344


def test_custom_formats_are_ieee_like_and_coarser_with_fewer_bits():
    assert FP8Format.custom(5, 2).max_value == E5M2.max_value
    assert FP8Format.custom(4, 3).max_value == 240.0  # IEEE-like E4M3 reserves the top exponent
    e3m2 = FP8Format.custom(3, 2)
    assert e3m2.max_value == 14.0 and e3m2.min_subnormal == 0.0625
    assert round_to_format(torch.tensor([1.1, 5.3, 100.0]), e3m2).tolist() == [1.0, 5.0, 14.0]
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1))
    errors = [float((round_to_format(x * 4, FP8Format.custom(4, m)) / 4 - x).abs().mean()) for m in (1, 2, 3, 5)]
    assert errors == sorted(errors, reverse=True) and errors[-1] > 0
    with pytest.raises(ValueError, match="exp_bits"):
        FP8Format.custom(1, 3)


def test_delayed_scaling_rule():
    history = torch.zeros(4)
    for amax in (2.0, 8.0, 1.0):
        roll_history(history, torch.tensor(amax))
    assert history.tolist() == [1.0, 8.0, 2.0, 0.0]
    assert float(amax_from_history(history, "max")) == 8.0
    assert float(amax_from_history(history, "most_recent")) == 1.0
    prev = torch.tensor(3.0)
    assert float(delayed_scale(torch.tensor(8.0), prev, E4M3)) == 448 / 8
    assert float(delayed_scale(torch.tensor(8.0), prev, E4M3, margin=2)) == 448 / 8 / 4
    for bad in (0.0, float("inf"), float("nan")):  # no information: the scale stays
        assert float(delayed_scale(torch.tensor(bad), prev, E4M3)) == 3.0
    with pytest.raises(ValueError, match="amax algorithm"):
        amax_from_history(history, "mean")
    assert float(current_scale(torch.tensor([0.5, -4.0]), E5M2)) == 57344 / 4
    assert float(current_scale(torch.zeros(3), E5M2)) == 1.0
    assert float(current_scale(torch.tensor([1.0, float("inf")]), E5M2)) == 1.0  # not the previous scale
    # a scale that would overflow becomes float32's largest value
    assert float(delayed_scale(torch.tensor(1e-44), prev, E5M2)) == torch.finfo(torch.float32).max


def test_health_counts_overflow_before_the_cast_and_underflow_after():
    x = torch.tensor([1000.0, -500.0, 1.0, 1e-9, 0.0, 2.0, 3.0, 4.0])
    h = fp8_health(x, 1.0, E4M3)
    assert float(h["overflow_frac"]) == 2 / 8  # 1000 and -500 exceed 448
    assert float(h["underflow_frac"]) == 1 / 8  # 1e-9 rounds to zero; the zero is not counted
    assert float(h["amax"]) == 1000.0
    assert float(h["headroom"]) == pytest.approx(math.log2(448 / 1000))
    q = round_to_format(x, E4M3)
    assert float(h["snr_db"]) == pytest.approx(10 * math.log10(float((x**2).sum() / ((q - x) ** 2).sum())), rel=1e-5)
    exact = fp8_health(torch.tensor([1.0, 2.0, -0.5]), 1.0, E4M3)
    assert math.isinf(float(exact["snr_db"])) and float(exact["overflow_frac"]) == 0


def test_fp8_linear_quantises_forward_operands_and_the_output_gradient():
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(3, 5, 16, generator=g) * 3).requires_grad_()
    w = (torch.randn(8, 16, generator=g) * 0.2).requires_grad_()
    b = torch.randn(8, generator=g).requires_grad_()
    xs, ws, gs = torch.tensor(448 / 12.0), torch.tensor(448 / 0.8), torch.tensor(2.0**10)
    y = fp8_linear(x, w, b, xs, ws, gs)
    xq, wq = quantize(x.detach(), xs, E4M3), quantize(w.detach(), ws, E4M3)
    assert_close(y, F.linear(xq, wq, b.detach()))
    assert not torch.equal(xq, x.detach())  # the quantisation really happened
    grad = torch.randn(y.shape, generator=g) * 1e-3
    y.backward(grad)
    gq = quantize(grad, gs, E5M2)
    assert_close(x.grad, gq @ wq)
    assert_close(w.grad, gq.reshape(-1, 8).t() @ xq.reshape(-1, 16))
    assert not torch.equal(gq, grad)
    # the bias is added outside the FP8 GEMM: its gradient is the unquantised output gradient's sum, as in
    # Transformer Engine and torchao
    assert_close(b.grad, grad.reshape(-1, 8).sum(0), rtol=0, atol=0)
    assert not torch.allclose(b.grad, gq.reshape(-1, 8).sum(0), rtol=1e-4, atol=0)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_axiswise_scales_are_powers_of_two_per_slice_and_one_where_a_slice_is_empty():
    x = torch.tensor([[1.0, -3.0], [0.0, 0.0], [1e-3, 2e-3], [float("inf"), 1.0]])
    rows = axiswise_scale(x, -1, E4M3)
    assert rows.shape == (4, 1)
    # 448 / 3 = 149.3 -> 128; an all-zero row and a row with an inf keep 1; 448 / 2e-3 = 224000 -> 2^17
    assert rows.flatten().tolist() == [128.0, 1.0, 2.0**17, 1.0]
    cols = axiswise_scale(x[:3], 0, E4M3)
    assert cols.shape == (1, 2) and cols.flatten().tolist() == [256.0, 128.0]  # 448/1 -> 256, 448/3 -> 128


def test_rowwise_keeps_rows_a_per_tensor_scale_would_flush_to_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 32, generator=g)
    x[3:] *= 1e-7  # tokens a million times smaller than the others
    w = torch.randn(16, 32, generator=g)
    w[8:] *= 1e-7  # and output features too
    exact = F.linear(x, w)
    rowwise = fp8_linear_rowwise(x, w, None)
    tensorwise = fp8_linear(x, w, None, current_scale(x, E4M3), current_scale(w, E4M3), torch.ones(()))
    for rows, cols in ((slice(3, None), slice(None, 8)), (slice(None, 3), slice(8, None))):
        assert torch.all(tensorwise[rows, cols] == 0)  # flushed: below E4M3's smallest value at the tensor's scale
        assert _rel_err(rowwise[rows, cols], exact[rows, cols]) < 0.1  # one scale per row: E4M3's precision kept
    # the scales are powers of two: a value representable in E4M3 is reproduced exactly at any magnitude
    xr, wr = torch.tensor([[1.5, -3.0], [0.001953125, 0.0]]), torch.tensor([[0.25, 1.0], [-6.0, 0.5]])
    assert torch.equal(fp8_linear_rowwise(xr, wr, None), F.linear(xr, wr))


def test_rowwise_backward_scales_each_gemms_operands_along_what_it_contracts():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 32, generator=g, requires_grad=True)
    w = torch.randn(16, 32, generator=g, requires_grad=True)
    b = torch.randn(16, generator=g, requires_grad=True)
    grad = torch.randn(2, 5, 16, generator=g)
    grad[:, :, 4] *= 1e-7  # one output feature's gradient a million times smaller: dW's row 4 needs its own scale
    fp8_linear_rowwise(x, w, b).backward(grad)
    x2, g2 = x.detach().reshape(-1, 32), grad.reshape(-1, 16)

    def q(t, dim):
        return quantize(t, axiswise_scale(t, dim, E4M3), E4M3)

    def gemm(a, b):  # torchao's row-scaled GEMM writes bfloat16
        return (a @ b).bfloat16().float()

    assert_close(x.grad.reshape(-1, 32), gemm(q(g2, -1), q(w.detach(), 0)), rtol=0, atol=0)  # dx = g W
    assert_close(w.grad, gemm(q(g2, 0).t(), q(x2, 0)), rtol=0, atol=0)  # dW = g^T x, both over the tokens
    assert not torch.equal(w.grad, q(g2, 0).t() @ q(x2, 0))  # the bfloat16 rounding really happened
    assert_close(b.grad, g2.sum(0), rtol=0, atol=0)  # the bias: outside the GEMM, unquantised
    exact = g2.t() @ x2
    assert _rel_err(w.grad[4], exact[4]) < 0.1  # kept, where a per-token scale would flush it
    assert torch.all(q(g2, -1).t()[4] == 0)  # the gradient scaled per token instead: row 4 of dW would be lost


def test_rowwise_health_reports_the_tightest_rows_scale_and_headroom():
    x = torch.tensor([[1.0, -3.0], [1e-3, 2e-3]])
    s = axiswise_scale(x, -1, E4M3)
    health = fp8_health(x, s, E4M3)
    assert float(health["scale"]) == 128.0  # the smallest of 128 and 2^17
    # the tightest row: |x * s| at most 3 * 128 = 384 and 2e-3 * 2^17 = 262.1 -> log2(448 / 384)
    assert float(health["headroom"]) == pytest.approx(math.log2(448 / 384))
    assert float(health["overflow_frac"]) == 0.0 and float(health["underflow_frac"]) == 0.0
