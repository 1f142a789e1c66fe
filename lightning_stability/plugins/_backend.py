"""Which FP8 backend ``FP8Precision`` runs, and with which recipe: Transformer Engine, torchao's
float8 training, or the emulator, from what is installed and what the GPU can do."""

from __future__ import annotations

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
