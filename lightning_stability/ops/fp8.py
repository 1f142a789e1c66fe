"""FP8 numerics in pure torch: formats, saturating casts, Transformer Engine's scaling rules, and the
health of a quantised tensor.

Pure torch, no Lightning. The emulator (:func:`fp8_linear`) quantises a linear layer's input and
weight to E4M3 and its output gradient to E5M2 with per-tensor scales, as Transformer Engine's
``HYBRID`` format does, and computes the products in high precision from the dequantised values: the
rounding and saturation of FP8 are reproduced exactly, the accumulation is not (FP8 GEMMs accumulate
in higher precision too, in another order).

Formats (OCP 8-bit floating point): **E4M3** has no infinities, its all-ones exponent with mantissa
``111`` is NaN, so the largest value is ``1.75 * 2^8 = 448``; **E5M2** is IEEE-like, largest
``1.75 * 2^15 = 57344``. :meth:`FP8Format.custom` gives IEEE-like formats of any width, to sweep
precision down and see where training breaks.

Scaling: a tensor ``x`` is stored as ``q = cast(x * scale)`` and read back as ``q / scale``. Delayed
scaling (TE's default recipe) computes the scale from a history of past amaxes,
``scale = fp8_max / amax / 2^margin``, keeping the previous scale where ``amax`` is zero or not finite;
current scaling computes it from the tensor itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

AmaxAlgo = Literal["max", "most_recent"]


@dataclass(frozen=True)
class FP8Format:
    """An 8-bit (or narrower or wider) floating-point format: sign, ``exp_bits``, ``man_bits``."""

    name: str
    exp_bits: int
    man_bits: int
    max_value: float

    def __post_init__(self) -> None:
        if not (2 <= self.exp_bits <= 8 and 0 <= self.man_bits <= 10):
            raise ValueError(f"FP8Format: exp_bits must be in [2, 8] and man_bits in [0, 10], got {self.exp_bits}, {self.man_bits}")
        if not self.max_value > 0:
            raise ValueError(f"FP8Format: max_value must be > 0, got {self.max_value!r}")

    @property
    def bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1

    @property
    def min_normal(self) -> float:
        return 2.0 ** (1 - self.bias)

    @property
    def min_subnormal(self) -> float:
        """The smallest positive value; anything below half of it rounds to zero."""
        return 2.0 ** (1 - self.bias - self.man_bits)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype with exactly this format's values, where there is one."""
        if (self.exp_bits, self.man_bits, self.max_value) == (4, 3, 448.0):
            return torch.float8_e4m3fn
        if (self.exp_bits, self.man_bits, self.max_value) == (5, 2, 57344.0):
            return torch.float8_e5m2
        return None

    @classmethod
    def custom(cls, exp_bits: int, man_bits: int) -> FP8Format:
        """An IEEE-like format (the all-ones exponent reserved for inf and NaN):
        ``max = (2 - 2^-man_bits) * 2^(2^exp_bits - 2 - bias)``."""
        bias = 2 ** (exp_bits - 1) - 1
        top = (2.0 - 2.0**-man_bits) * 2.0 ** (2**exp_bits - 2 - bias)
        return cls(f"e{exp_bits}m{man_bits}", exp_bits, man_bits, top)


E4M3 = FP8Format("e4m3", 4, 3, 448.0)
E5M2 = FP8Format("e5m2", 5, 2, 57344.0)


def round_to_format(x: Tensor, fmt: FP8Format) -> Tensor:
    """``x`` rounded to the nearest value of ``fmt`` (ties to even), saturating at ``+-max_value``;
    NaN stays NaN. Computed in float32 (float64 for float64 input) and returned in that dtype.

    Uses torch's own FP8 cast where the format has a torch dtype (after clamping: a plain cast turns
    out-of-range values into NaN for E4M3 and inf for E5M2), else the arithmetic: the spacing of
    representable values around ``|x|`` is ``2^(e - man_bits)`` with ``e = max(floor(log2 |x|), 1 -
    bias)`` (subnormals share the smallest exponent), and ``torch.round`` rounds ties to even.
    """
    xf = x if x.dtype == torch.float64 else x.float()
    dtype = fmt.torch_dtype
    if dtype is None:
        return _round_arithmetic(xf, fmt)
    return xf.clamp(-fmt.max_value, fmt.max_value).to(dtype).to(xf.dtype)  # NaN passes through clamp


def _round_arithmetic(xf: Tensor, fmt: FP8Format) -> Tensor:
    clamped = xf.clamp(-fmt.max_value, fmt.max_value)
    mag = clamped.abs()
    exp = torch.floor(torch.log2(mag.clamp_min(fmt.min_subnormal))).clamp_min(1 - fmt.bias)
    step = torch.exp2(exp - fmt.man_bits)
    out = torch.round(clamped / step) * step
    return out.clamp(-fmt.max_value, fmt.max_value)


def quantize(x: Tensor, scale: Tensor | float, fmt: FP8Format) -> Tensor:
    """``x`` stored in ``fmt`` with ``scale`` and read back: ``round_to_format(x * scale) / scale``,
    in ``x``'s dtype."""
    return (round_to_format(x.float() * scale, fmt) / scale).to(x.dtype)


# -- scaling -----------------------------------------------------------------------------------------
def amax_from_history(history: Tensor, algo: AmaxAlgo = "max") -> Tensor:
    """The amax a delayed-scaling recipe computes its scale from: the largest in ``history``
    (``"max"``) or the newest entry, ``history[0]`` (``"most_recent"``)."""
    if algo == "max":
        return history.amax(dim=0)
    if algo == "most_recent":
        return history[0]
    raise ValueError(f"amax algorithm must be 'max' or 'most_recent', got {algo!r}")


def delayed_scale(amax: Tensor, previous: Tensor, fmt: FP8Format, margin: int = 0) -> Tensor:
    """Transformer Engine's delayed-scaling rule: ``fp8_max / amax / 2^margin``, keeping ``previous``
    where ``amax`` is zero or not finite (a step without information does not move the scale)."""
    # TE computes (fp8_max * 2^-margin) / amax: the same float32 value, dividing by 2^margin is exact;
    # not rounded to a power of two; a quotient that overflows becomes float32's largest value
    new = ((fmt.max_value * 2.0**-margin) / amax.float()).clamp(max=torch.finfo(torch.float32).max)
    ok = (amax > 0) & torch.isfinite(amax)
    return torch.where(ok, new, previous)


def current_scale(x: Tensor, fmt: FP8Format, margin: int = 0) -> Tensor:
    """Current (per-tensor) scaling, as Transformer Engine's ``Float8CurrentScaling``: the scale from the
    tensor's own amax, ``fp8_max / amax`` (``/ 2^margin``, 0 in TE), and 1 where the amax is zero or not
    finite (not the previous scale, unlike delayed scaling)."""
    amax = x.detach().abs().amax().float()
    ok = (amax > 0) & torch.isfinite(amax)
    new = ((fmt.max_value * 2.0**-margin) / amax).clamp(max=torch.finfo(torch.float32).max)
    return torch.where(ok, new, torch.ones_like(amax))


def axiswise_scale(x: Tensor, dim: int, fmt: FP8Format) -> Tensor:
    """Row-wise (axiswise) dynamic scaling, as torchao's ``rowwise`` recipe: one scale per slice of ``x``
    along ``dim`` (the GEMM's contracted dimension), ``fp8_max / amax`` of the slice rounded down to a
    power of two (so dequantising is exact), and 1 where the slice's amax is zero or not finite.
    Shaped to broadcast against ``x`` (``dim`` kept, of size 1)."""
    amax = x.detach().abs().amax(dim=dim, keepdim=True).float()
    ok = (amax > 0) & torch.isfinite(amax)
    new = torch.exp2(torch.floor(torch.log2((fmt.max_value / amax).clamp(max=torch.finfo(torch.float32).max))))
    return torch.where(ok, new, torch.ones_like(amax))


def row_scales(x: Tensor, fmt: FP8Format) -> tuple[Tensor, Tensor]:
    """``x`` as rows along its last dimension, and each row's :func:`axiswise_scale`: how torchao's
    ``rowwise`` recipe scales a GEMM operand that contracts its last dimension (an input per token, a
    weight per output feature, an output gradient per token for the input's gradient)."""
    rows = x.detach().reshape(-1, x.shape[-1])
    return rows, axiswise_scale(rows, -1, fmt)


def roll_history(history: Tensor, amax: Tensor) -> Tensor:
    """The amax history with ``amax`` as its newest entry, ``history[0]``, the oldest dropped. In place."""
    history.copy_(torch.roll(history, 1, dims=0))
    history[0] = amax
    return history


# -- health --------------------------------------------------------------------------------------------
@torch.no_grad()
def fp8_health(x: Tensor, scale: Tensor | float, fmt: FP8Format) -> dict[str, Tensor]:
    """How well ``x`` fits ``fmt`` at ``scale``, as 0-d device tensors:

    ``amax``; ``scale``; ``headroom``: ``log2(fp8_max / max |x * scale|)`` bits (negative: the largest
    values saturate); ``overflow_frac``: values whose scaled magnitude exceeds ``fp8_max``, counted
    before the saturating cast; ``underflow_frac``: nonzero values that round to zero; ``snr_db``: the
    quantisation signal-to-noise ratio ``10 log10(sum x^2 / sum (x - q(x))^2)`` (``inf`` when exact).

    ``scale`` may also hold one scale per row (:func:`axiswise_scale`, broadcasting against ``x``):
    then ``scale`` is the smallest of them (the row with the largest values) and ``headroom`` the
    tightest row's.
    """
    xf = x.detach().float()
    s = torch.as_tensor(scale, dtype=torch.float32, device=xf.device)
    amax = xf.abs().amax()
    scaled = xf * s
    q = round_to_format(scaled, fmt)
    nonzero = xf != 0
    n = max(1, xf.numel())
    signal = (xf * xf).sum()
    noise = ((q / s - xf) ** 2).sum()
    return {
        "amax": amax,
        "scale": s if s.dim() == 0 else s.amin(),
        "headroom": torch.log2(fmt.max_value / (amax * s if s.dim() == 0 else scaled.abs().amax())),
        "overflow_frac": (scaled.abs() > fmt.max_value).sum() / n,
        "underflow_frac": (nonzero & (q == 0)).sum() / n,
        "snr_db": 10.0 * torch.log10(signal / noise),
    }


# -- the emulated FP8 linear --------------------------------------------------------------------------
class _FP8Linear(torch.autograd.Function):
    """``y = q_e4m3(x) q_e4m3(W)^T + b`` with per-tensor scales, computed in float32; in the backward
    the output gradient is quantised to E5M2 and both products use the quantised forward operands, as
    an FP8 GEMM does. The bias gradient is the sum of the unquantised output gradient, as Transformer
    Engine and torchao compute it (the bias is added outside the FP8 GEMM). Gradients come back in their
    inputs' dtypes."""

    @staticmethod
    def forward(ctx, x, weight, bias, x_scale, w_scale, g_scale, fwd_fmt, bwd_fmt):  # type: ignore[no-untyped-def]
        xq = quantize(x.float(), x_scale, fwd_fmt)
        wq = quantize(weight.float(), w_scale, fwd_fmt)
        ctx.save_for_backward(xq, wq)
        ctx.g_scale = g_scale  # not saved: a delayed-scaling caller sets it in place before the backward
        ctx.bwd_fmt = bwd_fmt
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return torch.nn.functional.linear(xq, wq, None if bias is None else bias.float())

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def]
        xq, wq = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        gq = quantize(grad_out.float(), ctx.g_scale, ctx.bwd_fmt)
        g2 = gq.reshape(-1, gq.shape[-1])  # (tokens, out)
        grad_x = (gq @ wq).to(x_dtype)  # (..., in)
        grad_w = (g2.t() @ xq.reshape(-1, xq.shape[-1])).to(w_dtype)  # (out, in)
        grad_b = None if b_dtype is None else grad_out.float().reshape(-1, gq.shape[-1]).sum(0).to(b_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def fp8_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    x_scale: Tensor,
    w_scale: Tensor,
    g_scale: Tensor,
    fwd_fmt: FP8Format = E4M3,
    bwd_fmt: FP8Format = E5M2,
) -> Tensor:
    """An emulated FP8 linear layer: see :class:`_FP8Linear`. The scales are 0-d tensors; ``g_scale``
    is read in the backward, so a delayed-scaling caller may update it in between."""
    return _FP8Linear.apply(x, weight, bias, x_scale, w_scale, g_scale, fwd_fmt, bwd_fmt)


class _FP8LinearRowwise(torch.autograd.Function):
    """``y = q(x) q(W)^T + b`` with torchao's row-wise scaling (:func:`axiswise_scale`), every operand in
    E4M3 as its ``rowwise`` recipe: each GEMM's operands are scaled along the dimension it contracts.
    Forward: ``x`` per token, ``W`` per output feature. Backward: for ``dx = g W``, ``g`` per token and
    ``W`` per input feature; for ``dW = g^T x``, ``g`` per output feature and ``x`` per input feature
    (both over the tokens). So the backward quantises the high-precision ``x`` and ``W`` again, each
    along its other axis, as an FP8 GEMM of row-scaled operands must. Each GEMM writes bfloat16, as
    torchao's does (``torch._scaled_mm`` has no float32 output with row-wise scales; torchao casts to the
    caller's dtype after), and the bias is added after it, its gradient the unquantised sum."""

    @staticmethod
    def forward(ctx, x, weight, bias, fmt):  # type: ignore[no-untyped-def]
        x2 = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        w = weight.float()  # (out, in)
        ctx.save_for_backward(x2, w)
        ctx.fmt, ctx.x_shape = fmt, x.shape
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        y = _bf16(quantize(x2, axiswise_scale(x2, -1, fmt), fmt) @ quantize(w, axiswise_scale(w, -1, fmt), fmt).t())
        if bias is not None:
            y = y + bias.float()
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def]
        x2, w = ctx.saved_tensors
        fmt = ctx.fmt
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g2 = grad_out.reshape(-1, grad_out.shape[-1]).float()  # (tokens, out)
        grad_x = _bf16(quantize(g2, axiswise_scale(g2, -1, fmt), fmt) @ quantize(w, axiswise_scale(w, 0, fmt), fmt))
        grad_w = _bf16(quantize(g2, axiswise_scale(g2, 0, fmt), fmt).t() @ quantize(x2, axiswise_scale(x2, 0, fmt), fmt))
        grad_b = None if b_dtype is None else g2.sum(0).to(b_dtype)
        return grad_x.reshape(ctx.x_shape).to(x_dtype), grad_w.to(w_dtype), grad_b, None


def _bf16(gemm: Tensor) -> Tensor:
    """A row-scaled FP8 GEMM's output: its float32 accumulation rounded to bfloat16, and back to float32
    as torchao casts it for the caller."""
    return gemm.to(torch.bfloat16).float()


def fp8_linear_rowwise(x: Tensor, weight: Tensor, bias: Tensor | None, fmt: FP8Format = E4M3) -> Tensor:
    """An emulated FP8 linear layer with row-wise scaling: see :class:`_FP8LinearRowwise`. The scales are
    the tensors' own (dynamic), so there is no scaling state to carry between steps."""
    return _FP8LinearRowwise.apply(x, weight, bias, fmt)


def snr_db(x: Tensor, approx: Tensor) -> float:
    """``10 log10(sum x^2 / sum (x - approx)^2)`` on the host, for tests and reports."""
    noise = float(((x.double() - approx.double()) ** 2).sum())
    return math.inf if noise == 0 else 10.0 * math.log10(float((x.double() ** 2).sum()) / noise)
