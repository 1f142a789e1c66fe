from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lightning_stability.ops.optim_state import (
    dequantize_blockwise_8bit,
    moment_family,
    reset_moments_,
    second_moment,
    unwrap_optimizer,
)

bnb = pytest.importorskip("bitsandbytes")


def _stepped(opt_cls, shapes=((64, 128), (10,)), **kw):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    opt = opt_cls(params, lr=1e-3, **kw)
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    return opt, params, grads


def test_families():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert moment_family(torch.optim.AdamW(p)) == "torch_adam"
    assert moment_family(torch.optim.Adam(p)) == "torch_adam"
    assert moment_family(torch.optim.SGD(p, lr=0.1)) is None
    assert moment_family(bnb.optim.AdamW8bit(p)) == "bnb_adam"
    assert moment_family(bnb.optim.Adam32bit(p)) == "bnb_adam"
    assert moment_family(bnb.optim.Lion8bit(p)) is None


def test_torch_second_moment_is_one_minus_beta2_g2():
    opt, params, grads = _stepped(torch.optim.AdamW, betas=(0.9, 0.99))
    assert_close(second_moment(opt, params[0]), 0.01 * grads[0].square())


@pytest.mark.parametrize("cls", [bnb.optim.AdamW8bit, bnb.optim.Adam8bit, bnb.optim.AdamW32bit])
def test_bnb_second_moment_decodes(cls):
    opt, params, grads = _stepped(cls, betas=(0.9, 0.999))
    v = second_moment(opt, params[0])
    expected = 0.001 * grads[0].square()
    # 8-bit blockwise quantisation: within a few percent of each block's absmax
    assert_close(v, expected, atol=2e-2 * float(expected.max()), rtol=0.0)
    small = second_moment(opt, params[1])  # below min_8bit_size: fp32 state
    assert_close(small, 0.001 * grads[1].square(), rtol=1e-5, atol=1e-9)


def test_own_decoder_matches_bitsandbytes():
    import bitsandbytes.functional as F

    opt, params, _ = _stepped(bnb.optim.AdamW8bit, shapes=((37, 129),))  # not a multiple of 256
    st = opt.state[params[0]]
    ours = dequantize_blockwise_8bit(st["state2"], st["qmap2"], st["absmax2"])
    theirs = F.dequantize_blockwise(st["state2"], absmax=st["absmax2"], code=st["qmap2"], blocksize=256)
    assert torch.equal(ours, theirs)


def test_decoder_rejects_wrong_block_count():
    with pytest.raises(ValueError, match="block scales"):
        dequantize_blockwise_8bit(torch.zeros(600, dtype=torch.uint8), torch.zeros(256), torch.ones(2))


def test_reset_torch_moments_exact_and_keeps_step():
    opt, params, _ = _stepped(torch.optim.Adam, amsgrad=True)
    assert reset_moments_(opt, params) == 6
    for p in params:
        st = opt.state[p]
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert torch.count_nonzero(st[key]) == 0
        assert float(st["step"]) == 1.0


def test_reset_bnb_8bit_moments_decode_to_exact_zero_and_tables_untouched():
    import bitsandbytes.functional as F

    opt, params, _ = _stepped(bnb.optim.AdamW8bit)
    st = opt.state[params[0]]
    qmap1, qmap2 = st["qmap1"].clone(), st["qmap2"].clone()
    absmax1 = st["absmax1"].clone()
    assert st["state1"].dtype == torch.uint8
    reset_moments_(opt, params)
    for key, qkey, amax in (("state1", "qmap1", "absmax1"), ("state2", "qmap2", "absmax2")):
        decoded = F.dequantize_blockwise(st[key], absmax=st[amax], code=st[qkey], blocksize=256)
        assert torch.count_nonzero(decoded) == 0
    assert torch.equal(st["qmap1"], qmap1) and torch.equal(st["qmap2"], qmap2)
    assert torch.equal(st["absmax1"], absmax1)
    small = opt.state[params[1]]
    assert torch.count_nonzero(small["state1"]) == 0 and torch.count_nonzero(small["state2"]) == 0
    # the optimizer keeps working from the zeroed state
    params[0].grad = torch.randn_like(params[0])
    params[1].grad = torch.randn_like(params[1])
    opt.step()
    assert torch.isfinite(params[0]).all()


def test_unwrap_lightning_optimizer():
    from lightning.pytorch.core.optimizer import LightningOptimizer

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert unwrap_optimizer(LightningOptimizer(opt)) is opt
    assert unwrap_optimizer(opt) is opt
