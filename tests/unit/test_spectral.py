from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lightning_stability.ops.spectral import (
    PowerLawFit,
    SpectralUpdateClip,
    alignment,
    analyze_model,
    analyze_spectrum,
    as_matrix,
    decay_exponent,
    find_weight_matrices,
    fit_power_law,
    full_spectrum,
    init_vectors,
    inverse_sqrt_newton_schulz,
    marchenko_pastur_spikes,
    matrix_view,
    power_iteration,
    pss_delta,
    randomized_svd,
    singular_values,
    smooth_values,
    soft_spectral_clip,
    spectral_cap_delta,
    spectral_weights,
    stable_rank,
    subspace_iteration,
    tracking_step,
    tracking_step_rows,
    update_power_step,
)


# -- helpers ---------------------------------------------------------------------------------------
def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q  # (rows, cols)


def _with_spectrum(s: list[float] | torch.Tensor, m: int, n: int, g: torch.Generator) -> torch.Tensor:
    """``U diag(s) V^T`` in float64 with random orthonormal ``U (m, r)``, ``V (n, r)``."""
    s = torch.as_tensor(s, dtype=torch.float64)
    r = s.numel()
    return (_orthonormal(m, r, g) * s) @ _orthonormal(n, r, g).T


def _soft_clip_ref(x: torch.Tensor, c: float) -> torch.Tensor:
    """SPECTRA's soft clip from an SVD in float64: ``U diag(s / sqrt(1 + s^2 / c^2)) V^T``."""
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return (u * (s / torch.sqrt(1 + s.square() / c**2)).unsqueeze(-2)) @ vh


def _pareto(n: int, alpha: float, x_min: float, g: torch.Generator) -> torch.Tensor:
    """Samples of the density ``p(x) ~ x^-alpha`` for ``x >= x_min`` (inverse CDF)."""
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return x_min * (1 - u) ** (-1 / (alpha - 1))


def _brute_force_power_law(x: torch.Tensor, min_tail: int = 10) -> list[tuple[float, float, int, float]]:
    """``(alpha, x_min, n_tail, ks)`` for every candidate x_min, one candidate at a time (Clauset et al.)."""
    xs = np.sort(x.double().numpy())
    out = []
    for i in range(xs.size - min_tail + 1):
        tail = xs[i:]
        nt = tail.size
        alpha = 1 + nt / np.log(tail / xs[i]).sum()
        cdf = 1 - (tail / xs[i]) ** (1 - alpha)
        r = np.arange(nt)
        ks = max(np.abs((r + 1) / nt - cdf).max(), np.abs(r / nt - cdf).max())
        out.append((alpha, xs[i], nt, ks))
    return out


# -- which weights ---------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.mlp = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(4)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv2d(3, 5, kernel_size=(2, 3))
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: listed once, as "embed"


def test_spectral_weights_picks_matrix_weights_by_module_name():
    net = _Net()
    got = spectral_weights(net)
    assert [name for name, _ in got] == [
        "embed",
        "conv",
        "blocks.0.attn",
        "blocks.0.mlp",
        "blocks.1.attn",
        "blocks.1.mlp",
    ]  # no LayerNorm, no biases, the tied head not repeated
    assert got[0][1] is net.embed.weight and got[1][1] is net.conv.weight
    assert got[3][1] is net.blocks[0].mlp.weight


def test_spectral_weights_include_and_exclude_patterns():
    net = _Net()
    names = lambda **kw: [name for name, _ in spectral_weights(net, **kw)]  # noqa: E731
    assert names(include=["blocks.*.attn"]) == ["blocks.0.attn", "blocks.1.attn"]
    assert names(include=["blocks.*"], exclude=["*.mlp"]) == ["blocks.0.attn", "blocks.1.attn"]
    assert names(exclude=["blocks.1.*", "conv"]) == ["embed", "blocks.0.attn", "blocks.0.mlp"]
    # a tied weight goes under the first name that passes the filters
    assert names(include=["head"]) == ["head"]
    assert names(exclude=["embed", "blocks.*"]) == ["conv", "head"]
    assert names(include=[]) == []


def test_spectral_weights_tied_weight_listed_under_first_name_only():
    emb = nn.Embedding(6, 3)
    head = nn.Linear(3, 6, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(head, nn.Linear(3, 3), emb)  # the head comes first here
    got = spectral_weights(model)
    assert [name for name, _ in got] == ["0", "1"]
    assert got[0][1] is emb.weight


def test_spectral_weights_skips_vector_weights():
    lin = nn.Linear(4, 3)
    lin.weight = nn.Parameter(torch.randn(3))  # a 1-D weight on a spectral module type
    model = nn.Sequential(lin, nn.Linear(3, 2), nn.LayerNorm(2), nn.BatchNorm1d(2))
    assert [name for name, _ in spectral_weights(model)] == ["1"]


def test_multihead_attention_and_rnn_weights_are_tracked_by_parameter_name():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)  # one in_proj_weight (24, 8); out_proj a Linear
            self.cross = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)  # q/k/v_proj_weight of their own
            self.rnn = nn.LSTM(8, 5, num_layers=1, proj_size=3)

    net = Net()
    tracked, skipped = find_weight_matrices(net)
    names = {w.name: w for w in tracked}
    assert sorted(names) == sorted([
        "attn.in_proj_weight", "attn.out_proj", "cross.q_proj_weight", "cross.k_proj_weight", "cross.v_proj_weight",
        "cross.out_proj", "rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_hr_l0",
    ])
    assert skipped == {}
    assert names["attn.in_proj_weight"].param is net.attn.in_proj_weight and not names["attn.in_proj_weight"].transposed
    assert names["cross.k_proj_weight"].param.shape == (8, 4)
    # the owning module's name selects its parameters too
    assert sorted(w.name for w in find_weight_matrices(net, exclude=["cross"])[0]) == [
        "attn.in_proj_weight", "attn.out_proj", "cross.out_proj", "rnn.weight_hh_l0", "rnn.weight_hr_l0",
        "rnn.weight_ih_l0",
    ]
    _, left_out = find_weight_matrices(net, include=["attn*"])
    assert left_out["rnn.weight_ih_l0"] == "left out by include/exclude"


def test_transformers_conv1d_is_tracked_transposed_and_its_layout_is_pinned():
    transformers = pytest.importorskip("transformers")
    conv1d = transformers.pytorch_utils.Conv1D(7, 5)  # nf=7 outputs, nx=5 inputs
    # the layout the monitor relies on: weight (nx, nf) = (in, out), forward x @ W + b
    assert (conv1d.nx, conv1d.nf) == (5, 7) and conv1d.weight.shape == (5, 7)
    x = torch.randn(3, 5)
    assert_close(conv1d(x), nn.functional.linear(x, matrix_view(conv1d.weight, transposed=True), conv1d.bias))
    (w,), skipped = find_weight_matrices(nn.Sequential(conv1d))
    assert w.name == "0" and w.transposed and skipped == {}
    view = matrix_view(w.param, w.transposed)
    assert view.shape == (7, 5) and view.data_ptr() == conv1d.weight.data_ptr()  # a view: edits reach it
    # a Conv1D whose layout moved is listed as skipped, not measured in a wrong orientation
    conv1d.nf = 9
    tracked, skipped = find_weight_matrices(nn.Sequential(conv1d))
    assert tracked == [] and "is not (nx, nf) = (5, 9)" in skipped["0"]


def test_other_matrix_shaped_parameters_are_skipped_with_a_reason():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.randn(4, 3))
            self.up = nn.ConvTranspose2d(3, 2, 2)
            self.codes = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)

    tracked, skipped = find_weight_matrices(Odd())
    assert tracked == []
    assert "2-D parameter of Odd" in skipped["table"] and "orientation is unknown" in skipped["table"]
    assert "transposed-convolution" in skipped["up"]
    assert "torch.int8 weight" in skipped["codes"]


def test_as_matrix_of_a_conv_kernel_is_out_by_in_times_kernel():
    conv = nn.Conv2d(3, 5, kernel_size=(2, 4))
    mat = as_matrix(conv.weight)
    assert mat.shape == (5, 3 * 2 * 4)
    assert torch.equal(mat[2], conv.weight[2].flatten())  # row i is output channel i
    assert as_matrix(torch.ones(3, 4)).shape == (3, 4)
    assert as_matrix(nn.Conv1d(2, 7, 3).weight).shape == (7, 6)


# -- power iteration -------------------------------------------------------------------------------
def _gapped_stack(g: torch.Generator) -> torch.Tensor:
    """Three 12 x 20 matrices whose two largest singular values are a factor 2 or more apart."""
    tails = [[1.0, 0.9, 0.5], [0.7, 0.6, 0.1, 0.05], [2.0, 1.9, 1.0]]
    tops = [4.0, 1.4, 10.0]
    mats = [_with_spectrum([top, *tail], 12, 20, g) for top, tail in zip(tops, tails)]
    return torch.stack(mats).float()  # (3, 12, 20)


def test_init_vectors_are_unit_reproducible_and_leave_global_rng_alone():
    state = torch.get_rng_state()
    u, v = init_vectors(3, 5, 7, generator=_gen(4))
    assert torch.equal(state, torch.get_rng_state())
    assert u.shape == (3, 5) and v.shape == (3, 7) and u.dtype == torch.float32
    assert_close(torch.linalg.vector_norm(u, dim=-1), torch.ones(3))
    assert_close(torch.linalg.vector_norm(v, dim=-1), torch.ones(3))
    u2, v2 = init_vectors(3, 5, 7, generator=_gen(4))
    assert torch.equal(u, u2) and torch.equal(v, v2)
    assert not torch.equal(u[0], u[1])  # every matrix gets its own start


def test_power_iteration_converges_to_spectral_norm_on_a_stack():
    w = _gapped_stack(_gen(1))
    u, v = init_vectors(3, 12, 20, generator=_gen(2))
    u, v, sigma, _ = power_iteration(w, u, v, iters=30)
    true = torch.linalg.matrix_norm(w.double(), 2).float()
    assert_close(sigma, true, rtol=1e-3, atol=0)
    # the pair is the top singular pair (up to a common sign)
    uu, _, vh = torch.linalg.svd(w.double())
    ones = torch.ones(3, dtype=torch.float64)
    assert_close((u.double() * uu[..., 0]).sum(-1).abs(), ones, rtol=0, atol=1e-4)
    assert_close((v.double() * vh[:, 0]).sum(-1).abs(), ones, rtol=0, atol=1e-4)
    # and u = W v / sigma: the returned sigma belongs to the returned pair
    assert_close(torch.einsum("bm,bmn,bn->b", u, w, v), sigma, rtol=1e-5, atol=0)


def test_power_iteration_warm_start_converges_with_one_iteration_per_call():
    w = _gapped_stack(_gen(3))
    u0, v0 = init_vectors(3, 12, 20, generator=_gen(4))
    u, v = u0, v0
    for _ in range(25):
        u, v, sigma, _ = power_iteration(w, u, v, iters=1)
    true = torch.linalg.matrix_norm(w.double(), 2).float()
    assert_close(sigma, true, rtol=1e-3, atol=0)
    # feeding the pair back is the same as iterating in one call
    u25, v25, sigma25, _ = power_iteration(w, u0, v0, iters=25)
    assert_close(sigma, sigma25, rtol=1e-6, atol=0)
    assert_close(u, u25, rtol=0, atol=1e-6)

    # the weights move a little: one warm iteration tracks the new norm, one cold iteration does not
    w2 = w + 0.01 * torch.randn(w.shape, generator=_gen(5))
    true2 = torch.linalg.matrix_norm(w2.double(), 2).float()
    _, _, warm, _ = power_iteration(w2, u, v, iters=1)
    _, _, cold, _ = power_iteration(w2, u0, v0, iters=1)
    assert_close(warm, true2, rtol=1e-3, atol=0)
    assert ((true2 - cold) / true2).max() > 1e-2  # the warm start is what made the difference


def test_power_iteration_residual_decreases_and_is_zero_at_the_exact_pair():
    w = _gapped_stack(_gen(6))
    u, v = init_vectors(3, 12, 20, generator=_gen(7))
    residuals = []
    for _ in range(16):
        u, v, _, res = power_iteration(w, u, v, iters=1)
        residuals.append(res)
    assert torch.isfinite(residuals[0]).all() and (residuals[0] > 1e-2).all()
    assert (residuals[5] < residuals[0]).all() and (residuals[10] < residuals[5]).all()
    assert (residuals[-1] < 1e-4).all()

    uu, s, vh = torch.linalg.svd(w.double())
    u_true, v_true = uu[..., 0].float(), vh[:, 0].float()
    _, _, sigma, res = power_iteration(w, u_true, v_true, iters=1)
    assert (res < 1e-5).all()
    assert_close(sigma, s[:, 0].float(), rtol=1e-5, atol=0)
    # the residual is a distance: the flipped vector is as far as it can be
    _, _, _, res_flipped = power_iteration(w, u_true, -v_true, iters=1)
    assert_close(res_flipped, torch.full((3,), 2.0), rtol=1e-5, atol=0)


def test_power_iteration_sigma_is_a_rising_lower_bound():
    # no spectral gap needed: a plain Gaussian stack
    w = torch.randn(4, 10, 7, generator=_gen(8))
    true = torch.linalg.matrix_norm(w.double(), 2)
    u, v = init_vectors(4, 10, 7, generator=_gen(9))
    prev = torch.zeros(4, dtype=torch.float64)
    for _ in range(12):
        u, v, sigma, _ = power_iteration(w, u, v, iters=1)
        sigma = sigma.double()
        assert (sigma <= true * (1 + 1e-6)).all()
        assert (sigma >= prev * (1 - 1e-6)).all()  # ||W v|| of a power iteration never falls
        prev = sigma
    assert (sigma > 0.5 * true).all()


def test_stable_rank_matches_svd():
    w = torch.randn(3, 6, 9, generator=_gen(10))
    s = torch.linalg.svdvals(w.double())
    expected = s.square().sum(-1) / s[:, 0].square()
    assert_close(stable_rank(w, s[:, 0].float()).double(), expected, rtol=1e-5, atol=0)
    # rank one: 1; an orthogonal matrix: its size
    rank_one = torch.outer(torch.arange(1.0, 5.0), torch.arange(1.0, 4.0)).unsqueeze(0)
    assert_close(stable_rank(rank_one, torch.linalg.matrix_norm(rank_one, 2)), torch.ones(1))
    q = _orthonormal(5, 5, _gen(11)).float().unsqueeze(0)
    assert_close(stable_rank(q, torch.ones(1)), torch.full((1,), 5.0))


def test_alignment_is_the_share_of_gradient_energy_on_the_top_pair():
    w = torch.randn(3, 6, 8, generator=_gen(12))
    uu, _, vh = torch.linalg.svd(w)
    u, v = uu[..., 0], vh[:, 0]
    grad = torch.randn(3, 6, 8, generator=_gen(13))
    expected = torch.einsum("bm,bmn,bn->b", u, grad, v).square() / grad.square().sum((-2, -1))
    got = alignment(grad, u, v)
    assert_close(got, expected)
    assert ((got > 0) & (got < 1)).all()

    scales = torch.tensor([3.7, -0.2, 1e3])
    assert_close(alignment(scales[:, None, None] * u[:, :, None] * v[:, None, :], u, v), torch.ones(3))
    # a gradient that u^T . v cannot see: projected off u on the left
    off = grad - u[:, :, None] * (u[:, None, :] @ grad)
    assert (alignment(off, u, v) < 1e-10).all()
    # and the same on the right, with a large norm
    off_right = 50 * (grad - (grad @ v[:, :, None]) * v[:, None, :])
    assert (alignment(off_right, u, v) < 1e-10).all()


def test_tracking_step_is_a_power_iteration_that_applies_the_weights_to_extra_vectors():
    w = _gapped_stack(_gen(30))
    u, v = init_vectors(3, 12, 20, generator=_gen(31))
    left, right = torch.randn(3, 12, 2, generator=_gen(32)), torch.randn(3, 20, 2, generator=_gen(33))
    for block in (1, 3):
        basis = torch.linalg.qr(torch.randn(3, 20, block, generator=_gen(34))).Q
        if block == 1:
            basis = v.unsqueeze(-1)
        t = tracking_step(w, u, basis, left, right, iters=2)
        # the extra products are exact
        assert_close(t.w_right, w @ right, rtol=1e-5, atol=1e-5)
        assert_close(t.wt_left, w.transpose(1, 2) @ left, rtol=1e-5, atol=1e-5)
        # and the top pair is the plain iteration's
        if block == 1:
            pu, pv, ps, pr = power_iteration(w, u, v, iters=2)
            assert_close(t.sigma, ps) and assert_close(t.u, pu) and assert_close(t.v, pv)
            assert_close(t.residual, pr)
        else:
            su, sv, ss, sb, sr = subspace_iteration(w, basis, iters=2)
            assert_close(t.sigma, ss) and assert_close(t.basis.abs(), sb.abs(), rtol=1e-4, atol=1e-5)
    # warm-started, it converges to sigma_max
    basis = v.unsqueeze(-1)
    for _ in range(25):
        t = tracking_step(w, u, basis, left, right)
        u, basis = t.u, t.basis
    assert_close(t.sigma, torch.linalg.matrix_norm(w.double(), 2).float(), rtol=1e-3, atol=0)


@pytest.mark.parametrize("iters", [1, 3])
def test_tracking_step_rows_gives_the_numbers_of_tracking_step(iters):
    w = _gapped_stack(_gen(40))
    u, v = init_vectors(3, 12, 20, generator=_gen(41))
    left, right = torch.randn(3, 12, 2, generator=_gen(42)), torch.randn(3, 20, 2, generator=_gen(43))
    v_prev = torch.randn(3, 20, generator=_gen(44))  # not v: the residual is measured against it
    t = tracking_step(w, u, v_prev.unsqueeze(-1), left, right, iters=iters)
    ru, rv, rs, rr, w_right, wt_left = tracking_step_rows(w, u, v_prev, left.unbind(-1), right.unbind(-1), iters)
    # the same products on the same operands: equal, not merely close
    for got, want in ((ru, t.u), (rv, t.v), (rs, t.sigma), (rr, t.residual)):
        assert torch.equal(got, want)
    assert torch.equal(torch.stack(w_right, -1), t.w_right) and torch.equal(torch.stack(wt_left, -1), t.wt_left)


def test_update_power_step_converges_to_the_update_norm():
    g = _gen(14)
    d = torch.stack([_with_spectrum(s, 8, 12, g) for s in ([0.3, 0.1, 0.05], [2.0, 1.2, 0.2])]).float()
    w = 10 * torch.randn(2, 8, 12, generator=g)  # much larger than the update: its norm must not leak in
    true = torch.linalg.matrix_norm(d.double(), 2).float()
    u, v = init_vectors(2, 8, 12, generator=_gen(15))

    def products(w, u, v):
        return torch.einsum("bmn,bn->bm", w, v), torch.einsum("bmn,bm->bn", w, u)

    # first step, against the definition: D v and D^T u from probes taken before the update
    probes = products(w, u, v)
    w = w + d
    u1, v1, sigma = update_power_step(*products(w, u, v), *probes, u, v)
    dv, dtu = torch.einsum("bmn,bn->bm", d, v), torch.einsum("bmn,bm->bn", d, u)
    assert_close(sigma, torch.maximum(dv.norm(dim=-1), dtu.norm(dim=-1)), rtol=1e-4, atol=0)
    assert_close(u1, dv / dv.norm(dim=-1, keepdim=True), rtol=0, atol=1e-4)
    assert_close(v1, dtu / dtu.norm(dim=-1, keepdim=True), rtol=0, atol=1e-4)

    u, v = u1, v1
    for _ in range(20):
        probes = products(w, u, v)  # taken before the update, the only view of W_old
        w = w + d
        u, v, sigma = update_power_step(*products(w, u, v), *probes, u, v)
        assert (sigma <= true * (1 + 1e-3)).all()
    assert_close(sigma, true, rtol=1e-3, atol=0)
    assert (torch.linalg.matrix_norm(w, 2) > 10 * true).all()  # a wrong difference would show

    # no update along the vectors (a skipped step): the vectors are kept, not zeroed
    probes = products(w, u, v)
    u2, v2, sigma = update_power_step(*products(w, u, v), *probes, u, v)
    assert (sigma == 0).all()
    assert torch.equal(u2, u) and torch.equal(v2, v)


def test_the_monitor_scheme_of_two_generations_tracks_the_update_norm():
    # the monitor's bookkeeping: (du, dv) measured against last step's probes, (du', dv') probed now
    g = _gen(35)
    d = torch.stack([_with_spectrum([0.5, 0.2, 0.1], 8, 12, g), _with_spectrum([1.0, 0.6, 0.1], 8, 12, g)]).float()
    w = 5 * torch.randn(2, 8, 12, generator=g)
    true = torch.linalg.matrix_norm(d.double(), 2).float()
    u, v = init_vectors(2, 8, 12, generator=_gen(36))
    du, dv = init_vectors(2, 8, 12, generator=_gen(37))
    du_next, dv_next, basis, probes = du, dv, v.unsqueeze(-1), None
    for _ in range(60):
        w = w + d
        t = tracking_step(w, u, basis, torch.stack([du, du_next], -1), torch.stack([dv, dv_next], -1))
        u, basis = t.u, t.basis
        new_u, new_v = du_next, dv_next
        if probes is not None:
            new_u, new_v, sigma = update_power_step(t.w_right[..., 0], t.wt_left[..., 0], *probes, du_next, dv_next)
        du, dv, probes = du_next, dv_next, (t.w_right[..., 1], t.wt_left[..., 1])
        du_next, dv_next = new_u, new_v
    assert_close(sigma, true, rtol=1e-3, atol=0)


# -- interventions ---------------------------------------------------------------------------------
def test_spectral_cap_delta_sets_the_top_value_and_keeps_the_rest():
    w = torch.stack([_with_spectrum([5.0, 2.0, 1.0, 0.5], 6, 9, _gen(16 + i)) for i in range(3)]).float()
    uu, s, vh = torch.linalg.svd(w.double())
    u, v, sigma = uu[..., 0].float(), vh[:, 0].float(), s[:, 0].float()
    for cap in (3.0, 2.0, 4.999):  # between sigma_2 and sigma_1
        new = torch.linalg.svdvals((w + spectral_cap_delta(u, v, sigma, cap)).double())
        assert_close(new[:, 0], torch.full((3,), cap, dtype=torch.float64), rtol=1e-5, atol=0)
        assert_close(new[:, 1:], s[:, 1:], rtol=1e-5, atol=1e-6)
    # below sigma_2 the capped value drops into the spectrum; nothing else moves
    new = torch.linalg.svdvals((w + spectral_cap_delta(u, v, sigma, 0.7)).double())
    expected = torch.cat([torch.full((3, 1), 0.7, dtype=torch.float64), s[:, 1:]], 1)
    assert_close(new, expected.sort(descending=True).values, rtol=1e-5, atol=1e-6)


def test_spectral_cap_delta_is_zero_under_the_cap_and_takes_a_cap_per_matrix():
    w = torch.stack([_with_spectrum([5.0, 2.0, 1.0], 6, 9, _gen(20 + i)) for i in range(2)]).float()
    uu, s, vh = torch.linalg.svd(w.double())
    u, v, sigma = uu[..., 0].float(), vh[:, 0].float(), s[:, 0].float()
    assert torch.equal(spectral_cap_delta(u, v, sigma, 5.5), torch.zeros(2, 6, 9))
    assert torch.equal(spectral_cap_delta(u, v, sigma, torch.tensor(float("inf"))), torch.zeros(2, 6, 9))
    delta = spectral_cap_delta(u, v, sigma, torch.tensor([6.0, 3.0]))
    assert torch.equal(delta[0], torch.zeros(6, 9))
    assert_close(torch.linalg.matrix_norm(w[1] + delta[1], 2), torch.tensor(3.0), rtol=1e-5, atol=0)
    assert_close(torch.linalg.matrix_norm(delta[1], 2), torch.tensor(2.0), rtol=1e-5, atol=0)


_PSS_SPECTRUM = [40.0, 20.0, 10.0, 5.0, *torch.linspace(1.0, 0.5, 12).tolist()]  # gap after the 4th value


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_randomized_svd_recovers_the_top_triplets(shape):
    w = _with_spectrum(_PSS_SPECTRUM, *shape, _gen(30)).float()
    u, s, v = randomized_svd(w, 4, generator=_gen(31))
    assert u.shape == (shape[0], 4) and s.shape == (4,) and v.shape == (shape[1], 4)
    uu, ss, vh = torch.linalg.svd(w.double(), full_matrices=False)
    assert_close(s.double(), ss[:4], rtol=1e-5, atol=0)
    signs = torch.sign((u.double() * uu[:, :4]).sum(0))
    assert_close(u.double(), uu[:, :4] * signs, rtol=0, atol=1e-4)
    assert_close(v.double(), vh[:4].T * signs, rtol=0, atol=1e-4)  # the same sign on both sides
    assert_close(u.T @ u, torch.eye(4), rtol=0, atol=1e-5)


def test_randomized_svd_draws_from_the_given_generator_only():
    w = _with_spectrum(_PSS_SPECTRUM, 24, 16, _gen(32)).float()
    gen = _gen(33)
    gen_state, global_state = gen.get_state(), torch.get_rng_state()
    first = randomized_svd(w, 4, niter=0, generator=gen)
    assert torch.equal(torch.get_rng_state(), global_state)
    assert not torch.equal(gen.get_state(), gen_state)  # the test matrix came from it
    again = randomized_svd(w, 4, niter=0, generator=_gen(33))
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    other = randomized_svd(w, 4, niter=0, generator=_gen(34))
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("fn", ["log", "clip"])
@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_pss_delta_smooths_the_top_k_and_keeps_the_rest(fn, shape):
    w = _with_spectrum(_PSS_SPECTRUM, *shape, _gen(35)).float()
    k = 3
    s = torch.linalg.svdvals(w.double())  # of the float32 matrix the function sees
    delta, new, u1, v1 = pss_delta(w, k, fn, generator=_gen(36))
    assert delta.shape == shape and new.shape == (k,)
    expected_top = smooth_values(s[:k], s[k], fn)
    assert_close(new.double(), expected_top, rtol=1e-4, atol=0)
    after = torch.linalg.svdvals((w + delta).double())
    assert_close(after[:k], expected_top, rtol=1e-4, atol=0)
    assert_close(after[k:], s[k:], rtol=1e-4, atol=0)  # the (k+1)-th value on: untouched
    assert int(torch.linalg.matrix_rank(delta.double(), atol=1e-3)) == k
    uu, _, vh = torch.linalg.svd(w.double())
    assert_close((u1.double() @ uu[:, 0]).abs(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-5)
    assert_close((v1.double() @ vh[0]).abs(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-5)


def test_pss_delta_clamps_k_to_leave_one_value_as_the_level():
    w = _with_spectrum([8.0, 6.0, 4.0, 2.0, 1.0, 0.5], 6, 10, _gen(37)).float()
    delta, new, _, _ = pss_delta(w, 100, "clip", generator=_gen(38))
    assert new.shape == (5,)
    after = torch.linalg.svdvals((w + delta).double())
    assert_close(after, torch.full((6,), 0.5, dtype=torch.float64), rtol=1e-4, atol=0)
    _, new, _, _ = pss_delta(w, 0, "clip", generator=_gen(38))  # at least one value is smoothed
    assert_close(new, torch.tensor([6.0]), rtol=1e-4, atol=0)


def test_smooth_values_log_and_clip():
    level = torch.tensor(2.0)
    s = torch.tensor([2.0 * math.e, 2.0 * math.e**2, 2.0, 1.0])
    assert_close(smooth_values(s, level, "log"), torch.tensor([4.0, 6.0, 2.0, 1.0]))
    assert_close(smooth_values(s, level, "clip"), torch.tensor([2.0, 2.0, 2.0, 1.0]))
    # log: continuous with slope 1 at the level
    eps = 1e-3
    above = smooth_values(torch.tensor([2.0 + eps], dtype=torch.float64), level.double(), "log")
    assert_close(above, torch.tensor([2.0 + eps], dtype=torch.float64), rtol=0, atol=1e-6)


def test_unknown_smoothing_function_raises():
    with pytest.raises(ValueError, match="fn='sqrt'"):
        smooth_values(torch.ones(2), torch.tensor(0.5), "sqrt")  # type: ignore[arg-type]
    w = _with_spectrum([3.0, 2.0, 1.0], 5, 6, _gen(39)).float()
    with pytest.raises(ValueError, match="expected 'clip' or 'log'"):
        pss_delta(w, 1, "tanh", generator=_gen(40))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "shape",
    [(6, 10), (10, 6), (7, 7), (3, 5, 8), (3, 8, 5)],
    ids=["wide", "tall", "square", "bwide", "btall"],
)
@pytest.mark.parametrize("scale", [1e-2, 1.0, 1e2])
def test_soft_spectral_clip_matches_svd(shape, scale):
    c = 2.5
    x = scale * c * torch.randn(shape, generator=_gen(41))
    out = soft_spectral_clip(x, c)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_close(out.double(), _soft_clip_ref(x, c), rtol=1e-4, atol=1e-4 * c)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)], ids=["wide", "tall"])
def test_soft_spectral_clip_of_row_shards_equals_the_whole_matrix_clip(shape):
    # two ranks' rows (uneven); ``reduce`` stands in for the all-reduce: it adds the other rank's Gram
    c = 2.5
    x = 3 * c * torch.randn(shape, generator=_gen(43))
    split = shape[0] // 2 + 1
    shards = (x[:split], x[split:])
    grams = [s.double().T @ s.double() for s in shards]
    out = [soft_spectral_clip(s, c, reduce=lambda g, other=grams[1 - i]: g + other) for i, s in enumerate(shards)]
    assert_close(torch.cat(out).double(), _soft_clip_ref(x, c), rtol=1e-4, atol=1e-4 * c)
    alone = soft_spectral_clip(shards[0], c)  # a shard clipped as a matrix of its own is another thing
    assert not torch.allclose(alone, out[0], atol=1e-3)


@pytest.mark.parametrize("ratio", [1e2, 1e3, 1e4, 1e5])
def test_soft_spectral_clip_of_a_large_rank_one_spike_stays_under_c(ratio):
    # a gradient spike: one direction ``ratio`` times the clip level on top of O(1) noise. Every singular
    # value maps below c, so the output is finite with ||out||_2 < c, and the spike maps to about c.
    g = _gen(42)
    c = 1.0
    a, b = _orthonormal(8, 1, g).float(), _orthonormal(10, 1, g).float()
    x = ratio * c * (a @ b.T) + torch.randn(8, 10, generator=g)
    out = soft_spectral_clip(x, c).double()
    assert torch.isfinite(out).all()
    assert float(torch.linalg.matrix_norm(out, 2)) <= c * (1 + 1e-3)
    u, s, vh = torch.linalg.svd(x.double())
    top = s[0] / torch.sqrt(1 + s[0] ** 2 / c**2)
    assert_close(out @ vh[0], top * u[:, 0], rtol=0, atol=1e-3 * c)  # the spike direction, clipped
    if ratio <= 1e4:  # and the O(1) directions, kept as they are (up to s -> s / sqrt(1 + s^2 / c^2))
        assert_close(out, _soft_clip_ref(x, c), rtol=0, atol=1e-2 * c)


def test_soft_spectral_clip_keeps_the_input_dtype():
    x = torch.randn(4, 6, generator=_gen(43), dtype=torch.float64)
    out = soft_spectral_clip(x, 1.0)
    assert out.dtype == torch.float64
    assert_close(out, _soft_clip_ref(x, 1.0), rtol=1e-4, atol=1e-5)  # computed in float32


def test_inverse_sqrt_newton_schulz_matches_eigh():
    r = torch.randn(3, 6, 6, generator=_gen(44), dtype=torch.float64)
    a = r @ r.transpose(-2, -1) / 6 + 0.3 * torch.eye(6, dtype=torch.float64)  # SPD, condition ~ 10-30
    scale = torch.linalg.matrix_norm(a)  # Frobenius >= lambda_max
    got = inverse_sqrt_newton_schulz(a, scale, iters=30)
    lam, vec = torch.linalg.eigh(a)
    expected = (vec * lam.rsqrt().unsqueeze(-2)) @ vec.transpose(-2, -1)
    assert_close(got, expected, rtol=1e-6, atol=1e-8)
    assert_close(got @ a @ got, torch.eye(6, dtype=torch.float64).expand(3, 6, 6), rtol=0, atol=1e-6)


# -- SpectralUpdateClip ----------------------------------------------------------------------------
class _ClipNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 4)
        self.frozen = nn.Linear(3, 5)  # gets no gradient
        self.conv = nn.Conv2d(2, 3, kernel_size=2)


def _set_grads(net: _ClipNet, g: torch.Generator) -> None:
    net.lin.weight.grad = 20 * torch.randn(net.lin.weight.shape, generator=g)
    net.lin.bias.grad = 20 * torch.randn(net.lin.bias.shape, generator=g)
    net.conv.weight.grad = 20 * torch.randn(net.conv.weight.shape, generator=g)
    net.conv.bias.grad = 20 * torch.randn(net.conv.bias.shape, generator=g)


def test_spectral_update_clip_replaces_the_sgd_update_by_its_soft_clip():
    net = _ClipNet()
    lr, c = 0.1, 2.0
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    clip = SpectralUpdateClip(opt, c=c)
    _set_grads(net, _gen(45))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    opt.step()

    for name in ("lin.weight", "conv.weight"):
        p = dict(net.named_parameters())[name]
        update = as_matrix(p.detach() - before[name])
        plain = as_matrix(-lr * grads[name])  # update / lr = -grad for plain SGD
        assert_close(update, lr * soft_spectral_clip(plain / lr, c), rtol=1e-5, atol=1e-6)
        assert_close(update.double(), lr * _soft_clip_ref(plain / lr, c), rtol=1e-4, atol=1e-5)
        assert float(torch.linalg.matrix_norm(update, 2)) < lr * c  # the clip really acted
        assert float(torch.linalg.matrix_norm(plain, 2)) > 5 * lr * c
    for name in ("lin.bias", "conv.bias"):  # vectors: the plain SGD update
        assert_close(net.get_parameter(name).detach(), before[name] - lr * grads[name], rtol=0, atol=1e-6)
    for name in ("frozen.weight", "frozen.bias"):
        assert torch.equal(net.get_parameter(name).detach(), before[name])
    assert clip.targets[0][0] is net.lin.weight and len(clip.targets) == 3


@pytest.mark.parametrize("spike", [1e3, 1e5])
def test_spectral_update_clip_bounds_a_gradient_spike(spike):
    # SGD: update / lr = -grad, and the soft clip keeps every singular value under c: whatever the
    # gradient, ||update||_2 < lr * c. A rank-one spike of spectral norm ``spike`` on O(1) noise.
    g = _gen(48)
    lin = nn.Linear(16, 12, bias=False)
    lr, c = 0.1, 10.0
    opt = torch.optim.SGD(lin.parameters(), lr=lr)
    SpectralUpdateClip(opt, c=c)
    w0 = lin.weight.detach().clone()
    a, b = _orthonormal(12, 1, g).float(), _orthonormal(16, 1, g).float()
    lin.weight.grad = spike * (a @ b.T) + torch.randn(12, 16, generator=g)
    opt.step()
    update = lin.weight.detach() - w0
    assert torch.isfinite(update).all()
    assert float(torch.linalg.matrix_norm(update.double(), 2)) <= lr * c * (1 + 1e-3)
    assert_close(update.double(), lr * _soft_clip_ref(-lin.weight.grad, c), rtol=0, atol=1e-2 * lr * c)


@pytest.mark.parametrize("first", ["first step", "after a skipped step"])
def test_spectral_update_clip_clips_a_closure_step_whose_gradients_come_inside_it(first):
    # With a closure (Lightning's automatic optimization) the step's pre-hook runs before the closure's
    # backward: on the first step, and on the step after one whose gradients were set to None (a guard's
    # skip), no gradient is there yet when the weights are copied. The update must be clipped anyway.
    g = _gen(49)
    lin = nn.Linear(16, 12, bias=False)
    lr, c = 0.1, 1.0
    opt = torch.optim.SGD(lin.parameters(), lr=lr)
    SpectralUpdateClip(opt, c=c)
    x = 50 * torch.randn(32, 16, generator=g)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = lin(x).pow(2).mean()
        loss.backward()
        return loss

    if first == "after a skipped step":
        opt.step(closure)
        lin.weight.grad = None  # the step's gradients were dropped, as a skip does
    assert lin.weight.grad is None
    w0 = lin.weight.detach().clone()
    opt.step(closure)
    update = lin.weight.detach() - w0
    plain = -lr * lin.weight.grad
    assert float(torch.linalg.matrix_norm(plain, 2)) > 10 * lr * c  # unclipped, it would be far above
    assert_close(update, lr * soft_spectral_clip(plain / lr, c), rtol=1e-5, atol=1e-6)


def test_spectral_update_clip_params_argument_and_remove():
    net = _ClipNet()
    lr, c = 0.1, 2.0
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    clip = SpectralUpdateClip(opt, c=c, params=[net.conv.weight])
    _set_grads(net, _gen(46))
    w_lin, w_conv = net.lin.weight.detach().clone(), net.conv.weight.detach().clone()
    opt.step()
    assert_close(net.lin.weight.detach(), w_lin - lr * net.lin.weight.grad, rtol=0, atol=1e-6)  # not selected
    conv_update = as_matrix(net.conv.weight.detach() - w_conv)
    expected = lr * soft_spectral_clip(as_matrix(-net.conv.weight.grad), c)
    assert_close(conv_update, expected, rtol=1e-5, atol=1e-6)

    clip.remove()
    w_conv = net.conv.weight.detach().clone()
    opt.step()
    assert_close(net.conv.weight.detach(), w_conv - lr * net.conv.weight.grad, rtol=0, atol=1e-6)
    clip.remove()  # a second remove is harmless


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"c": 0.0}, "c="),
        ({"c": -1.0}, "c="),
        ({"c": float("nan")}, "c="),
        ({"c": float("inf")}, "c="),
        ({"c": True}, "c="),
        ({"c": "10"}, "c="),
        ({"iters": 0}, "iters="),
        ({"iters": 2.5}, "iters="),
        ({"iters": True}, "iters="),
    ],
)
def test_spectral_update_clip_rejects_bad_arguments(kwargs, argument):
    opt = torch.optim.SGD(nn.Linear(3, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=f"SpectralUpdateClip\\({argument}"):
        SpectralUpdateClip(opt, **kwargs)


# -- full spectra ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(6, 11), (11, 6), (5, 3, 2, 2)], ids=["wide", "tall", "conv"])
def test_singular_values_and_full_spectrum_match_svd(shape):
    w = torch.randn(shape, generator=_gen(47))
    mat = as_matrix(w).double()
    uu, s, vh = torch.linalg.svd(mat, full_matrices=False)
    assert_close(singular_values(w).double(), s, rtol=1e-4, atol=1e-5)
    sv, u, v = full_spectrum(w)
    assert_close(sv.double(), s, rtol=1e-4, atol=1e-5)
    assert u.shape == (mat.shape[0],) and v.shape == (mat.shape[1],)
    sign = torch.sign(u.double() @ uu[:, 0])
    assert_close(u.double() * sign, uu[:, 0], rtol=0, atol=1e-4)
    assert_close(v.double() * sign, vh[0], rtol=0, atol=1e-4)
    assert_close(u.double() @ mat @ v.double(), s[0], rtol=1e-5, atol=0)  # a consistent pair


@pytest.mark.parametrize("alpha", [2.0, 2.5, 4.0])
def test_fit_power_law_recovers_the_exponent(alpha):
    x = _pareto(3000, alpha, 1.0, _gen(0))
    fit = fit_power_law(x)  # n > max_candidates: the grid path
    assert isinstance(fit, PowerLawFit)
    assert fit.alpha == pytest.approx(alpha, abs=0.1)
    assert 1.0 <= fit.x_min < 1.25 and fit.n_tail == int((x >= fit.x_min).sum())
    few = x[:1200]
    full = fit_power_law(few, max_candidates=1200)  # n <= max_candidates: every value a candidate
    assert full.alpha == pytest.approx(alpha, abs=0.1)
    assert 1.0 <= full.x_min < 1.25
    assert full.ks <= fit_power_law(few, max_candidates=16).ks + 1e-12  # the full search can only do better


def _pareto_over_bulk(n: int, alpha: float, x_min: float, g: torch.Generator) -> torch.Tensor:
    """``n`` power-law values above ``x_min`` and ``n / 2`` uniform ones below it, shuffled."""
    x = torch.cat([_pareto(n, alpha, x_min, g), x_min * torch.rand(n // 2, generator=g, dtype=torch.float64)])
    return x[torch.randperm(x.numel(), generator=g)]


@pytest.mark.parametrize("alpha", [2.0, 2.5, 4.0])
def test_fit_power_law_finds_x_min_above_a_bulk(alpha):
    x_min = 2.0
    x = _pareto_over_bulk(3000, alpha, x_min, _gen(0))
    small = _pareto_over_bulk(1200, alpha, x_min, _gen(0))
    for fit in (fit_power_law(x), fit_power_law(small, max_candidates=2000)):  # grid, every candidate
        assert fit.alpha == pytest.approx(alpha, abs=0.1)
        assert 0.9 * x_min <= fit.x_min <= 1.25 * x_min
    # fitting from the smallest value instead would be far off
    naive = 1 + x.numel() / torch.log(x / x.min()).sum()
    assert abs(float(naive) - alpha) > 0.5


def test_fit_power_law_all_candidates_matches_a_brute_force_search():
    g = _gen(50)
    x = torch.cat([_pareto(200, 3.0, 1.0, g), torch.rand(80, generator=g, dtype=torch.float64)])
    fit = fit_power_law(x, max_candidates=1000)
    table = _brute_force_power_law(x)
    alpha, x_min, n_tail, ks = min(table, key=lambda row: row[3])
    assert fit.alpha == pytest.approx(alpha, rel=1e-9)
    assert fit.x_min == pytest.approx(x_min, rel=1e-12)
    assert fit.n_tail == n_tail
    assert fit.ks == pytest.approx(ks, rel=1e-9)


def test_fit_power_law_grid_path_reports_a_consistent_candidate():
    g = _gen(51)
    x = torch.cat([_pareto(400, 2.5, 1.0, g), torch.rand(200, generator=g, dtype=torch.float64)])
    fit = fit_power_law(x, max_candidates=32)
    by_x_min = {row[1]: row for row in _brute_force_power_law(x)}
    alpha, _, n_tail, ks = by_x_min[fit.x_min]  # the chosen x_min is one of the values
    assert fit.alpha == pytest.approx(alpha, rel=1e-9) and fit.n_tail == n_tail
    assert fit.ks == pytest.approx(ks, rel=1e-9)
    best = min(row[3] for row in by_x_min.values())
    assert best <= fit.ks < best + 0.03  # a coarse grid lands close to the best candidate
    assert fit.alpha == pytest.approx(2.5, abs=0.25)


def test_fit_power_law_needs_enough_positive_values():
    few = fit_power_law(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert math.isnan(few.alpha) and math.isnan(few.x_min) and math.isnan(few.ks) and few.n_tail == 5
    dirty = torch.tensor([0.0, -1.0, float("nan"), float("inf"), *range(1, 10)])  # 9 usable values
    assert math.isnan(fit_power_law(dirty).alpha)
    ten = fit_power_law(torch.arange(1.0, 11.0))  # exactly min_tail: one candidate
    assert ten.n_tail == 10 and ten.x_min == 1.0
    assert ten.alpha == pytest.approx(1 + 10 / math.lgamma(11.0))  # sum ln(k) = ln(10!)


def test_fit_power_law_is_vectorised():
    x = _pareto(20000, 2.5, 1.0, _gen(52))
    start = time.perf_counter()
    fit = fit_power_law(x)
    elapsed = time.perf_counter() - start
    assert fit.alpha == pytest.approx(2.5, abs=0.05)
    assert elapsed < 10.0  # a per-candidate Python loop over 20000 values takes minutes


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_decay_exponent_recovers_beta(beta):
    k = torch.arange(1, 51, dtype=torch.float64)
    assert decay_exponent(k.pow(-beta)) == pytest.approx(beta, rel=1e-9)
    assert decay_exponent(3.0 * k.pow(-beta).float()) == pytest.approx(beta, rel=1e-5)  # scale-free
    with_zeros = torch.cat([k.pow(-beta), torch.zeros(5, dtype=torch.float64)])
    assert decay_exponent(with_zeros) == pytest.approx(beta)  # zeros are dropped


def test_decay_exponent_needs_two_values():
    assert math.isnan(decay_exponent(torch.tensor([1.0])))
    assert math.isnan(decay_exponent(torch.tensor([2.0, 0.0])))


def test_marchenko_pastur_spikes_none_in_noise_and_the_planted_count():
    g = _gen(53)
    m, n = 200, 100
    noise = torch.randn(m, n, generator=g, dtype=torch.float64)
    spikes, edge = marchenko_pastur_spikes(torch.linalg.svdvals(noise), m, n)
    assert spikes <= 1
    assert edge == pytest.approx((1 + math.sqrt(n / m)) ** 2, rel=0.03)  # variance-1 entries
    # the transposed matrix has the same spectrum and the same answer
    spikes_t, edge_t = marchenko_pastur_spikes(torch.linalg.svdvals(noise.T), n, m)
    assert spikes_t == spikes and edge_t == pytest.approx(edge, rel=1e-12)

    planted = noise.clone()
    for theta in (100.0, 130.0, 160.0):  # well above the bulk edge sqrt(m) (1 + sqrt(n / m)) ~ 24
        planted += theta * (_orthonormal(m, 1, g) @ _orthonormal(n, 1, g).T)
    count, _ = marchenko_pastur_spikes(torch.linalg.svdvals(planted), m, n)
    assert count == 3


def test_analyze_spectrum_agrees_with_the_pieces():
    w = torch.randn(20, 12, generator=_gen(54))
    stats = analyze_spectrum(w)
    s = torch.linalg.svdvals(w.double())
    assert stats.sigma_max == pytest.approx(float(s[0]), rel=1e-4)
    assert stats.stable_rank == pytest.approx(float(s.square().sum() / s[0] ** 2), rel=1e-4)
    assert stats.log_norm == pytest.approx(math.log10(float(w.double().square().sum())), rel=1e-5)
    assert stats.n == 12
    sv = singular_values(w)
    fit = fit_power_law(sv.double().square())
    assert stats.alpha == pytest.approx(fit.alpha) and stats.ks == pytest.approx(fit.ks)
    assert stats.alpha_weighted == pytest.approx(fit.alpha * math.log10(float(s[0]) ** 2), rel=1e-4)
    assert stats.decay == pytest.approx(decay_exponent(sv))
    assert stats.mp_spikes == marchenko_pastur_spikes(sv, 20, 12)[0]
    d = stats.as_dict()
    keys = "sigma_max stable_rank alpha alpha_weighted log_norm decay mp_spikes ks n"
    assert set(d) == set(keys.split())
    assert d["n"] == 12.0 and d["sigma_max"] == stats.sigma_max
    # given singular values are used as they are
    assert analyze_spectrum(w, sv=2 * sv).sigma_max == pytest.approx(2 * stats.sigma_max)


def test_analyze_model_agrees_with_power_iteration_and_stable_rank():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Conv1d(4, 6, 3))
    stats = analyze_model(model)
    assert list(stats) == ["0", "2", "3"]
    for name, w in spectral_weights(model):
        mat = as_matrix(w.detach())[None]  # (1, m, n)
        u, v = init_vectors(1, *mat.shape[1:], generator=_gen(55))
        _, _, sigma, _ = power_iteration(mat, u, v, iters=200)
        assert stats[name].sigma_max == pytest.approx(float(sigma), rel=1e-3)
        assert stats[name].sigma_max == pytest.approx(float(torch.linalg.matrix_norm(mat[0], 2)), rel=1e-4)
        assert stats[name].stable_rank == pytest.approx(float(stable_rank(mat, sigma)), rel=2e-3)
        assert stats[name].n == min(mat.shape[1:])
    assert list(analyze_model(model, include=["2", "3"], exclude=["3"])) == ["2"]
