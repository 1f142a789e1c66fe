"""Which weight matrices a spectral monitor tracks, and how each is read as an ``(out, in)`` matrix.

A weight of more than two dimensions (a convolution kernel ``(out, in, *k)``) is read as the matrix
``(out, in * prod(k))``. That matrix's singular values are not those of the convolution operator
(which depend on the input size); they are what WeightWatcher and spectral-norm papers track.
"""

from __future__ import annotations

import fnmatch
import re
import sys
from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor, nn

EPS = 1e-12  # the floor of every norm the spectral math divides by


class WeightMatrix(NamedTuple):
    """One weight matrix a monitor tracks.

    ``name`` is the owning module's qualified name for a module's ``weight`` (``"blocks.0.mlp"``) and
    the parameter's qualified name otherwise (``"attn.in_proj_weight"``, ``"lstm.weight_hh_l0"``).
    ``transposed``: the weight is stored ``(in, out)`` (transformers' ``Conv1D``); :func:`matrix_view`
    then reads it as the ``(out, in)`` matrix an ``nn.Linear`` of the same layer would hold, so that
    the left singular vectors live in the output space for every layer type. ``embedding``: an
    ``nn.Embedding`` holds it (under any of its names).
    """

    name: str
    param: nn.Parameter
    transposed: bool
    embedding: bool


def _conv1d_type() -> type | None:
    # transformers' Conv1D (GPT-2 and its family: weight (in, out), forward x @ W + b); looked up only
    # where transformers is already imported, so this module never imports it
    utils = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(utils, "Conv1D", None)
    return cls if isinstance(cls, type) else None


_RNN_WEIGHT = re.compile(r"weight_(ih|hh|hr)_l\d+(_reverse)?")
_LAYER_TYPES = (
    "Linear, Conv1d/2d/3d, transformers' Conv1D, Embedding, MultiheadAttention (in_proj_weight or "
    "q/k/v_proj_weight), RNN/LSTM/GRU (weight_ih/hh/hr), or a module with in_features/out_features and "
    "a weight of shape (out_features, in_features)"
)


def _classify(mod: nn.Module, pname: str, p: Tensor, conv1d: type | None) -> tuple[bool, str | None]:
    """``(transposed, None)`` for a weight matrix of a known layer type, ``(False, reason)`` for any
    other parameter of two or more dimensions."""
    if not p.is_floating_point():
        return False, f"a {p.dtype} weight (quantised): power iteration and the interventions need floats"
    if pname == "weight":
        if conv1d is not None and isinstance(mod, conv1d):
            nx, nf = getattr(mod, "nx", None), getattr(mod, "nf", None)
            if p.dim() == 2 and tuple(p.shape) == (nx, nf):
                return True, None
            return False, (
                f"a transformers Conv1D whose weight {tuple(p.shape)} is not (nx, nf) = ({nx}, {nf}): its (in, out) "
                "layout has changed, so its orientation is unknown"
            )
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return False, None
        if isinstance(mod, (nn.Linear, nn.Embedding)) and p.dim() == 2:
            return False, None
        out_f, in_f = getattr(mod, "out_features", None), getattr(mod, "in_features", None)
        if isinstance(out_f, int) and isinstance(in_f, int) and tuple(p.shape) == (out_f, in_f):
            return False, None  # a Linear-like layer of another library (TE, quantised Linear wrappers)
        if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            return False, "a transposed-convolution kernel (in, out / groups, *k): no (out, in) reading"
    if isinstance(mod, nn.MultiheadAttention) and pname in ("in_proj_weight", "q_proj_weight", "k_proj_weight",
                                                              "v_proj_weight") and p.dim() == 2:
        return False, None  # (3E, E) or (E, kdim / vdim): used as F.linear(x, W), Linear's orientation
    if isinstance(mod, nn.RNNBase) and _RNN_WEIGHT.fullmatch(pname) and p.dim() == 2:
        return False, None  # (gates * hidden, in): F.linear's orientation
    return False, (
        f"a {p.dim()}-D parameter of {type(mod).__name__}, which is not one of the layer types measured ({_LAYER_TYPES}): "
        "its (out, in) orientation is unknown"
    )


def find_weight_matrices(
    module: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] = ()
) -> tuple[list[WeightMatrix], dict[str, str]]:
    """Every weight matrix of ``module`` to track, and every other parameter of two or more dimensions
    with the reason it is not tracked (``{name: reason}``).

    Tracked: the weights of ``nn.Linear`` (and Linear-like modules: ``in_features``/``out_features``
    with a weight ``(out_features, in_features)``), ``nn.Embedding``, ``nn.Conv1d/2d/3d``,
    transformers' ``Conv1D`` (``transposed``), ``nn.MultiheadAttention``'s ``in_proj_weight`` (or its
    ``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ) and the RNN/LSTM/GRU weight matrices.

    ``include``/``exclude`` are shell-style patterns on the names (``"blocks.*.attn.*"``); for a
    parameter of a module other than its ``weight`` the owning module's name matches too. A weight
    is kept if one of its names matches an include pattern (all, when ``include`` is ``None``) and
    no exclude pattern. A weight shared by several modules (tied embeddings) is listed once, under
    its first name that passes the filters.
    """
    conv1d = _conv1d_type()
    candidates: list[tuple[str, str, nn.Parameter, bool, str | None]] = []  # (name, module name, p, transposed, reason)
    embeddings: set[int] = set()
    for mod_name, mod in module.named_modules():
        for pname, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            if p.dim() < 2:
                continue
            if isinstance(mod, nn.Embedding) and pname == "weight":
                embeddings.add(id(p))
            name = mod_name if pname == "weight" else (f"{mod_name}.{pname}" if mod_name else pname)
            transposed, reason = _classify(mod, pname, p, conv1d)
            candidates.append((name, mod_name, p, transposed, reason))

    def passes(name: str, mod_name: str) -> bool:
        names = {name, mod_name}
        if include is not None and not any(fnmatch.fnmatchcase(n, pat) for n in names for pat in include):
            return False
        return not any(fnmatch.fnmatchcase(n, pat) for n in names for pat in exclude)

    tracked: list[WeightMatrix] = []
    seen: set[int] = set()
    reasons: dict[int, tuple[str, str]] = {}  # id(p) -> (first name, reason) of the untracked ones
    for name, mod_name, p, transposed, reason in candidates:
        if id(p) in seen:
            continue
        if reason is None and passes(name, mod_name):
            seen.add(id(p))
            tracked.append(WeightMatrix(name, p, transposed, id(p) in embeddings))
        elif id(p) not in reasons or (reasons[id(p)][1].startswith("left out") and reason is not None):
            reasons[id(p)] = (name, reason if reason is not None else "left out by include/exclude")
    skipped = {name: why for key, (name, why) in reasons.items() if key not in seen}
    return tracked, skipped


def check_patterns(owner: str, name: str, value: object) -> tuple[str, ...]:
    """``value`` as the tuple of shell-style patterns ``include``/``exclude`` expect, or a TypeError
    naming ``owner``'s argument ``name``."""
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"{owner}({name}={value!r}): expected a sequence of shell-style patterns (str)")
    return tuple(value)


def spectral_weights(
    module: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] = ()
) -> list[tuple[str, nn.Parameter]]:
    """``(name, weight)`` of every weight :func:`find_weight_matrices` tracks, filtered the same way.
    Read a ``Conv1D`` weight with ``matrix_view(w, transposed=True)`` for its ``(out, in)`` matrix
    (the singular values are the same either way)."""
    return [(w.name, w.param) for w in find_weight_matrices(module, include, exclude)[0]]


def as_matrix(weight: Tensor) -> Tensor:
    """The ``(out, rest)`` matrix view of a weight (conv kernels flattened over input and kernel dims)."""
    return weight if weight.dim() == 2 else weight.reshape(weight.shape[0], -1)


def matrix_view(weight: Tensor, transposed: bool = False) -> Tensor:
    """The ``(out, in)`` matrix of a weight, a view (in-place writes reach it): :func:`as_matrix`, or
    the transpose of a weight stored ``(in, out)`` (``transposed``, transformers' ``Conv1D``)."""
    return weight.t() if transposed else as_matrix(weight)
