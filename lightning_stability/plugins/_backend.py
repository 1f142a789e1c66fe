"""Which FP8 backend ``FP8Precision`` runs, and with which recipe: Transformer Engine, torchao's
float8 training, or the emulator, from what is installed and what the GPU can do; and which layer
shapes an FP8 GEMM takes."""

from __future__ import annotations

from collections import Counter

from torch import nn

from lightning_stability.plugins import _te, _torchao

BACKENDS = ("auto", "te", "torchao", "emulated")
TE_RECIPES = ("delayed", "current", "block", "mxfp8", "nvfp4")
RECIPES = (*TE_RECIPES, *_torchao.RECIPES)
EMULATED_RECIPES = ("delayed", "current", "tensorwise", "rowwise")  # torchao's two: to study them anywhere


def choose_backend(owner: str, backend: str, recipe: str | None) -> tuple[str, str, str]:
    """``(backend, why, recipe)``: ``"te"`` or ``"torchao"`` where asked for (a clear error naming what
    is missing where it cannot run), ``"auto"``'s pick (Transformer Engine where it can run the recipe,
    else torchao on SM 8.9+ for a recipe both or torchao serve, else the emulator), or the emulator.
    ``recipe=None`` is the backend's default (``"delayed"``; ``"tensorwise"`` on torchao)."""
    if backend not in BACKENDS:
        raise ValueError(f"{owner}(backend={backend!r}): expected one of {list(BACKENDS)}")
    if recipe is not None and recipe not in RECIPES:
        raise ValueError(f"{owner}(recipe={recipe!r}): expected one of {list(RECIPES)}")
    if backend == "auto":
        te_ok, te_why = _te.te_usable(recipe or "delayed") if recipe in (None, *TE_RECIPES) else (False, "")
        ao_ok, ao_why = _torchao.torchao_usable() if recipe in (None, *_torchao.RECIPES) else (False, "")
        if te_ok:
            backend, why = "te", te_why
        elif ao_ok:
            backend, why = "torchao", f"{ao_why} ({te_why or 'recipe ' + repr(recipe)})"
        else:
            backend, why = "emulated", te_why or ao_why
    elif backend == "te":
        _te.check_te(recipe or "delayed")  # a clear error naming the fix where TE cannot run here
        why = _te.te_usable(recipe or "delayed")[1]
    elif backend == "torchao":
        _torchao.check_torchao()
        why = _torchao.torchao_usable()[1]
    else:
        why = "requested"
    recipe = recipe or ("tensorwise" if backend == "torchao" else "delayed")
    allowed = {"te": TE_RECIPES, "torchao": _torchao.RECIPES, "emulated": EMULATED_RECIPES}[backend]
    if recipe not in allowed:
        if backend == "emulated" and recipe in TE_RECIPES:
            raise ValueError(
                f"{owner}(recipe={recipe!r}): the emulator runs per-tensor and row-wise scaling ({list(EMULATED_RECIPES)}); "
                f"block-scaled recipes need Transformer Engine on a GPU with SM>={_te.RECIPE_SM[recipe][0]}."
                f"{_te.RECIPE_SM[recipe][1]} ({why}).")
        raise ValueError(f"{owner}(recipe={recipe!r}): the {backend} backend runs {list(allowed)}"
                         + (f" ({why})" if backend == "emulated" else ""))
    return backend, why, recipe


# block-scaled recipes quantise in blocks along both dimensions: their GEMMs need whole blocks; torchao's
# (torch._scaled_mm) need both dimensions divisible by 16
_BLOCK_MULTIPLE = {"block": 128, "mxfp8": 32, "nvfp4": 32, "tensorwise": 16, "rowwise": 16}


def fp8_shape_reason(linear: nn.Linear, recipe: str = "delayed") -> str | None:
    """Why an FP8 GEMM cannot run this layer, or ``None``: Transformer Engine needs ``in_features``
    divisible by 16 and ``out_features`` by 8, and block-scaled recipes whole blocks (128 for
    ``"block"``, 32 for MXFP8 and NVFP4) along both."""
    multiple = _BLOCK_MULTIPLE.get(recipe)
    if multiple is not None:
        for name in ("in_features", "out_features"):
            if getattr(linear, name) % multiple:
                return f"{name}={getattr(linear, name)} is not divisible by {multiple} (recipe {recipe!r})"
    if linear.in_features % 16:
        return f"in_features={linear.in_features} is not divisible by 16"
    if linear.out_features % 8:
        return f"out_features={linear.out_features} is not divisible by 8"
    return None


CONV1D = ("transformers' Conv1D (GPT-2's projections: a linear layer whose weight is stored transposed); "
          "FP8 GEMMs convert nn.Linear layers only")


def linear_like(module: nn.Module) -> dict[str, str]:
    """The layers that compute a linear map but are no ``nn.Linear``, by name, with the reason none is
    converted: transformers' ``Conv1D`` (GPT-2's: ``x @ W + b`` with ``W`` stored as (in, out))."""
    return {name: CONV1D for name, sub in module.named_modules() if type(sub).__name__ == "Conv1D" and hasattr(sub, "nf")}


def why_nothing_converted(skipped: dict[str, str]) -> str:
    """What kept every layer out of FP8, the commonest reasons first, for the warning at fit start."""
    if not skipped:
        return "the model has no nn.Linear layer"
    counts = Counter(skipped.values()).most_common(3)
    return "; ".join(f"{n} x {reason}" for reason, n in counts) + ("; ..." if len(set(skipped.values())) > 3 else "")
