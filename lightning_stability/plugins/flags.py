"""``resolve_precision``: one flag string to the Trainer arguments that set precision up."""

from __future__ import annotations

from typing import Any

import torch
from lightning_utilities.core.imports import RequirementCache

from lightning_stability.callbacks.low_bit_optimizer import TARGETS, LowBitOptimizer
from lightning_stability.plugins._backend import choose_backend
from lightning_stability.plugins.fp8 import FP8Precision

# Lightning's own precision strings (``Trainer(precision=...)``), passed through as they are
LIGHTNING_FLAGS = (
    "64-true", "64", "32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true",
    "transformer-engine", "transformer-engine-float16",
)
# ours: an FP8 precision plugin, or a low-bit optimizer callback
FP8_FLAGS: dict[str, dict[str, Any]] = {
    "fp8": {"backend": "auto"},
    "fp8-emulated": {"backend": "emulated"},
    "fp8-current": {"backend": "auto", "recipe": "current"},
    "fp8-torchao": {"backend": "torchao"},
}
OPTIMIZER_FLAGS = tuple(TARGETS)
_TE = RequirementCache("transformer_engine>=2.0")
_TORCHAO = RequirementCache("torchao")
_BNB = RequirementCache("bitsandbytes>=0.45")


def valid_flags() -> list[str]:
    return [*LIGHTNING_FLAGS, *FP8_FLAGS, *OPTIMIZER_FLAGS]


def resolve_precision(flag: str) -> dict[str, Any]:
    """The Trainer arguments for a precision flag: ``{"precision": ..., "plugins": [...], "callbacks": [...]}``.

    ``flag`` is one of Lightning's precision strings (``"bf16-mixed"``, ``"32-true"``, ...), one of
    ours (``"fp8"``: :class:`FP8Precision` with the automatic backend; ``"fp8-emulated"``;
    ``"fp8-current"``: current scaling; ``"fp8-torchao"``: torchao's float8 training; ``"adamw8bit"``, ``"paged-adamw8bit"``, ``"lion8bit"``,
    ``"ademamix8bit"``, ... : :class:`LowBitOptimizer` with that optimizer), or one of each joined by
    ``+`` (``"fp8+adamw8bit"``, ``"bf16-mixed+adamw8bit"``). ``precision`` is present only for
    Lightning's strings (Lightning refuses a precision string beside a precision plugin)::

        setup = resolve_precision("bf16-mixed+adamw8bit")
        trainer = pl.Trainer(**{**setup, "callbacks": [*my_callbacks, *setup["callbacks"]]})
    """
    if not isinstance(flag, str) or not flag.strip():
        raise ValueError(f"resolve_precision(flag={flag!r}): expected a non-empty str; valid: {valid_flags()}")
    out: dict[str, Any] = {"plugins": [], "callbacks": []}
    precision_part: str | None = None
    optimizer_part: str | None = None
    for part in (p.strip() for p in flag.split("+")):
        if part in LIGHTNING_FLAGS or part in FP8_FLAGS:
            if precision_part is not None:
                raise ValueError(f"resolve_precision(flag={flag!r}): two precisions, {precision_part!r} and {part!r}; "
                                 "combine one precision with one optimizer")
            precision_part = part
            if part in FP8_FLAGS:
                out["plugins"].append(FP8Precision(**FP8_FLAGS[part]))
            else:
                out["precision"] = part
        elif part in OPTIMIZER_FLAGS:
            if optimizer_part is not None:
                raise ValueError(f"resolve_precision(flag={flag!r}): two optimizers, {optimizer_part!r} and {part!r}")
            optimizer_part = part
            out["callbacks"].append(LowBitOptimizer(optimizer=part))
        else:
            raise ValueError(f"resolve_precision(flag={flag!r}): unknown part {part!r}; valid flags: {valid_flags()}, "
                             "or one precision and one optimizer joined by '+'")
    return out


def doctor_report() -> str:
    """What this machine has, and what each flag would do on it (``lightning-stability doctor``)."""
    lines = [f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        lines.append(f"GPU: {torch.cuda.get_device_name()} (SM {major}.{minor})")
        fp8_hw = (major, minor) >= (8, 9)
    else:
        lines.append("GPU: none (CUDA not available)")
        fp8_hw = False
    te_line = "installed" if _TE else 'not installed (pip install "lightning-stability[fp8]", CUDA machines only)'
    lines.append(f"Transformer Engine: {te_line}")
    ao_line = "installed" if _TORCHAO else 'not installed (pip install "lightning-stability[fp8-torchao]", CUDA machines only)'
    lines.append(f"torchao: {ao_line}")
    lines.append(f"FP8 GEMMs on this hardware: {'yes' if fp8_hw else 'no'} (they need SM >= 8.9)")
    if _BNB:
        import importlib.metadata

        lines.append(f"bitsandbytes: {importlib.metadata.version('bitsandbytes')} (8-bit optimizers run on CPU from 0.50)")
    else:
        lines.append("bitsandbytes: not installed (pip install bitsandbytes)")
    lines.append("")
    lines.append("flag                 what it does here")
    for flag, kwargs in FP8_FLAGS.items():
        try:  # the backend FP8Precision would pick here, as it picks it
            backend, why, recipe = choose_backend("FP8Precision", kwargs["backend"], kwargs.get("recipe"))
        except (ModuleNotFoundError, RuntimeError, ValueError) as err:
            what = f"unavailable: {err}"
        else:
            what = {"te": f"Transformer Engine FP8 ({recipe} scaling; {why})",
                    "torchao": f"torchao float8 ({recipe} scaling; {why})",
                    "emulated": f"emulated FP8 ({recipe} scaling)" + ("" if kwargs["backend"] == "emulated" else f": {why}"),
                    }[backend]
        lines.append(f"{flag:<20} FP8Precision: {what}")
    for flag in OPTIMIZER_FLAGS:
        cls_name = TARGETS[flag][0]
        where = "on CPU, unpaged with a warning" if flag.startswith("paged-") and not torch.cuda.is_available() else ""
        state = f"bitsandbytes.optim.{cls_name}" if _BNB else "unavailable: bitsandbytes not installed"
        lines.append(f"{flag:<20} LowBitOptimizer -> {state}{' (' + where + ')' if where and _BNB else ''}")
    lines.append(f"{'bf16-mixed, 32-true':<20} Lightning's own precision strings, passed through")
    return "\n".join(lines)
