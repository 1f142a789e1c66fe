"""Read and reset optimizer moments, whatever optimizer holds them.

Supported second moments:

- torch ``Adam`` / ``AdamW`` (and subclasses): ``state["exp_avg_sq"]``, float tensors.
- bitsandbytes Adam-family optimizers (``optimizer_name == "adam"``: ``Adam``, ``AdamW``, their 8-bit,
  32-bit and paged variants). 8-bit state is blockwise quantised: ``state2`` holds uint8 codes,
  ``qmap2`` the shared (unsigned) code table and ``absmax2`` one float32 scale per block of 256
  elements, so ``v = qmap2[code] * absmax2[block]``. Tensors smaller than ``min_8bit_size`` keep
  float32 ``state1`` / ``state2``.

bitsandbytes is never imported here: the optimizer is recognised by its attributes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

BNB_BLOCKSIZE = 256
_TORCH_ADAM_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def unwrap_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """The torch optimizer behind a Lightning ``LightningOptimizer`` (or the optimizer itself)."""
    inner = getattr(optimizer, "_optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer  # type: ignore[return-value]


def is_bnb_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer).__module__.startswith("bitsandbytes")


def moment_family(optimizer: torch.optim.Optimizer) -> str | None:
    """``"torch_adam"``, ``"bnb_adam"``, or ``None`` for an optimizer without a readable second moment."""
    if is_bnb_optimizer(optimizer):
        return "bnb_adam" if getattr(optimizer, "optimizer_name", None) == "adam" else None
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return "torch_adam"
    return None


@torch.no_grad()
def dequantize_blockwise_8bit(codes: Tensor, qmap: Tensor, absmax: Tensor, blocksize: int = BNB_BLOCKSIZE) -> Tensor:
    """Decode bitsandbytes blockwise 8-bit state: ``qmap[code] * absmax[block]`` (float32, ``codes``' shape)."""
    n = codes.numel()
    blocks = -(-n // blocksize)
    if absmax.numel() != blocks:
        raise ValueError(
            f"dequantize_blockwise_8bit(blocksize={blocksize}): {n} codes need {blocks} block scales, "
            f"the state has {absmax.numel()}"
        )
    values = qmap[codes.reshape(-1).long()]
    padded = blocks * blocksize
    if padded != n:
        values = torch.nn.functional.pad(values, (0, padded - n))
    values = (values.view(blocks, blocksize) * absmax.view(blocks, 1).float()).reshape(-1)[:n]
    return values.view(codes.shape)


@torch.no_grad()
def second_moment(optimizer: torch.optim.Optimizer, param: Tensor) -> Tensor | None:
    """The optimizer's current second moment ``v`` of ``param`` (8-bit states decoded to float32), or ``None``."""
    return second_moments(optimizer, [param])[0]


@torch.no_grad()
def second_moments(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[Tensor | None]:
    """:func:`second_moment` of each parameter (the optimizer's family is looked up once)."""
    family = moment_family(optimizer)
    if family is None:
        return [None] * len(params)
    states = optimizer.state
    out: list[Tensor | None] = []
    for p in params:
        state = states.get(p)
        if not state:
            out.append(None)
        elif family == "torch_adam":
            out.append(state.get("exp_avg_sq"))
        else:
            v = state.get("state2")
            if v is not None and v.dtype == torch.uint8:
                v = dequantize_blockwise_8bit(v, state["qmap2"], state["absmax2"])
            out.append(v)
    return out


@torch.no_grad()
def reset_moments_(optimizer: torch.optim.Optimizer, params: Iterable[Tensor]) -> int:
    """Zero the first and second moments of ``params`` in place; returns how many tensors were reset.

    Step counters are kept (SPAM keeps them too), so bias correction does not restart. For
    bitsandbytes 8-bit states, every code is set to the index of the exact zero of its code table,
    so the decoded moment is exactly 0; the shared code tables and the block scales are not written.
    """
    family = moment_family(optimizer)
    reset = 0
    for p in params:
        state = optimizer.state.get(p)
        if not state:
            continue
        if family == "bnb_adam" or (family is None and is_bnb_optimizer(optimizer)):
            for key, qkey in (("state1", "qmap1"), ("state2", "qmap2")):
                t = state.get(key)
                if t is None:
                    continue
                if t.dtype == torch.uint8:
                    t.fill_(_zero_code(state[qkey], key))
                else:
                    t.zero_()
                reset += 1
        else:
            for key in _TORCH_ADAM_KEYS + ("momentum_buffer", "square_avg", "acc_delta", "sum"):
                t = state.get(key)
                if isinstance(t, Tensor) and t.shape == p.shape:
                    t.zero_()
                    reset += 1
    return reset


def _zero_code(qmap: Tensor, key: str) -> int:
    zeros = (qmap == 0).nonzero()
    if zeros.numel() == 0:
        raise RuntimeError(f"reset_moments_: the code table of {key} has no exact zero; cannot reset exactly")
    return int(zeros[0, 0])
