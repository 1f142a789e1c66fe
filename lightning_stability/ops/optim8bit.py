"""Plain-torch optimizer state to bitsandbytes 8-bit state, and which torch optimizer maps to which
8-bit one. Pure torch plus bitsandbytes (imported when called), no Lightning."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

# bitsandbytes quantises optimizer state in blocks of 256 values with a dynamic map: signed for first
# moments, unsigned for second moments (bitsandbytes.optim.optimizer, init_state)
BLOCKSIZE = 256
# torch state key -> bitsandbytes state slot and whether its map is signed, per optimizer family
TORCH_STATE_SLOTS: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "adam": (("exp_avg", "1", True), ("exp_avg_sq", "2", False)),
    "sgd": (("momentum_buffer", "1", True),),
    "lion": (("exp_avg", "1", True),),
}


def _maps(device: torch.device) -> dict[bool, Tensor]:
    import bitsandbytes.functional as bnbf

    return {True: bnbf.create_dynamic_map(signed=True).to(device), False: bnbf.create_dynamic_map(signed=False).to(device)}


@torch.no_grad()
def torch_state_to_8bit(state: Mapping[str, Any], param: Tensor, family: str, eight_bit: bool) -> dict[str, Any]:
    """One parameter's plain-torch optimizer state (``exp_avg``/``exp_avg_sq``, or ``momentum_buffer``)
    as a bitsandbytes 8-bit optimizer keeps it: ``state1``/``state2`` quantised blockwise with
    ``qmap``/``absmax`` where ``eight_bit``, float32 otherwise (small or overridden parameters), and
    ``step`` as an int. The moments keep their values up to the 8-bit quantisation error."""
    import bitsandbytes.functional as bnbf

    slots = TORCH_STATE_SLOTS.get(family)
    if slots is None:
        raise ValueError(f"no conversion of {family!r} optimizer state to 8-bit; expected one of {list(TORCH_STATE_SLOTS)}")
    step = state.get("step", 0)
    out: dict[str, Any] = {"step": int(step.item() if isinstance(step, Tensor) else step)}
    maps = _maps(param.device) if eight_bit else {}
    for key, slot, signed in slots:
        value = state.get(key)
        if value is None:
            raise ValueError(f"optimizer state for a {family!r} optimizer has no {key!r}; has {sorted(state)}")
        value = value.to(param.device, torch.float32).reshape(param.shape)
        if not eight_bit:
            out[f"state{slot}"] = value.clone()
            continue
        q, qstate = bnbf.quantize_blockwise(value, code=maps[signed], blocksize=BLOCKSIZE)
        out[f"state{slot}"] = q.view(param.shape)
        out[f"qmap{slot}"] = maps[signed]
        out[f"absmax{slot}"] = qstate.absmax
    return out


@torch.no_grad()
def dequantize_state(state: Mapping[str, Any], slot: str = "1") -> Tensor:
    """A bitsandbytes state slot as float32 (for tests and reports)."""
    import bitsandbytes.functional as bnbf

    value = state[f"state{slot}"]
    if value.dtype == torch.float32:
        return value
    out = bnbf.dequantize_blockwise(value, absmax=state[f"absmax{slot}"], code=state[f"qmap{slot}"], blocksize=BLOCKSIZE)
    return out.view(value.shape)
