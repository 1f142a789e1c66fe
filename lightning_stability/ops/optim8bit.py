"""Plain-torch optimizer state to bitsandbytes 8-bit state and back, and which torch optimizer maps to
which 8-bit one. Pure torch plus bitsandbytes (imported when called), no Lightning.

The 8-bit layout read and written here is bitsandbytes' (``bitsandbytes.optim.optimizer``,
``init_state``): per parameter ``state1``/``state2`` (uint8 codes shaped like the parameter, or float32
where the state is 32-bit), ``qmap1``/``qmap2`` (the dynamic maps) and ``absmax1``/``absmax2`` (one
float32 scale per block of 256), and an int ``step``. ``tests/unit/test_optim_state.py`` pins it."""

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


# bitsandbytes' ``state_dict`` nests each parameter's quantisation tensors (state1, qmap1, absmax1, ...)
# under this key, for FSDP (``Optimizer8bit._FSDP_WRAPPED_QUANT_STATE_KEY``, bitsandbytes >= 0.49; its
# ``load_state_dict`` unnests them); the live ``optimizer.state`` is flat
BNB_WRAPPED_KEY = "__bnb_optimizer_quant_state__"


def flat_bnb_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """One parameter's entry of a bitsandbytes optimizer ``state_dict``, its nested quantisation state
    brought up beside ``step`` (the layout of the live ``optimizer.state``)."""
    out = {k: v for k, v in state.items() if k != BNB_WRAPPED_KEY}
    out.update(state.get(BNB_WRAPPED_KEY, {}))
    return out


def is_8bit_layout(state: Mapping[str, Any]) -> bool:
    """Whether a parameter's optimizer state (live, or from a ``state_dict``) is bitsandbytes' layout."""
    return "state1" in state or BNB_WRAPPED_KEY in state


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
    if value.dtype != torch.uint8:
        return value.float()
    out = bnbf.dequantize_blockwise(value, absmax=state[f"absmax{slot}"], code=state[f"qmap{slot}"], blocksize=BLOCKSIZE)
    return out.view(value.shape)


@torch.no_grad()
def eight_bit_to_torch_state(state: Mapping[str, Any], family: str) -> dict[str, Any]:
    """The inverse of :func:`torch_state_to_8bit`: one parameter's bitsandbytes state (``state1`` /
    ``state2``, 8-bit or float32) as the plain-torch optimizer of ``family`` keeps it, float32 moments
    decoded (``exp_avg``/``exp_avg_sq`` and a float32 ``step`` tensor for Adam, as torch's Adam and AdamW
    store it; ``momentum_buffer`` for SGD; ``exp_avg`` for Lion). Exact for 32-bit state; 8-bit moments
    come back as the optimizer would decode them."""
    state = flat_bnb_state(state)
    slots = TORCH_STATE_SLOTS.get(family)
    if slots is None:
        raise ValueError(f"no conversion of 8-bit {family!r} optimizer state to torch; expected one of "
                         f"{list(TORCH_STATE_SLOTS)}")
    out: dict[str, Any] = {}
    if family == "adam":
        step = state.get("step", 0)
        out["step"] = torch.tensor(float(step.item() if isinstance(step, Tensor) else step), dtype=torch.float32)
    for key, slot, _signed in slots:
        if f"state{slot}" not in state:
            raise ValueError(f"bitsandbytes optimizer state has no 'state{slot}' (has {sorted(state)}): its layout "
                             "changed; cannot write the torch state")
        out[key] = dequantize_state(state, slot).clone()
    return out
