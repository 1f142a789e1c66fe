"""Module discovery, one rule for every part: the output head, attention layers, wrapper names.

The FP8 plugin keeps the head in high precision, ``LowBitOptimizer`` keeps its state in 32 bits, the
softmax monitor measures its logits: all three ask here, so they agree on which layer it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

# top-level names of an output head (the model is the LightningModule itself)
HEAD_NAMES = ("lm_head", "output", "head", "classifier")
# the last name of a head inside a wrapped model (``self.model = GPT2LMHeadModel(...)``); ``decoder`` is
# the head of Lightning's demos.Transformer and of BERT's masked-LM head
HEAD_LEAVES = ("lm_head", "head", "classifier", "decoder", "output")
# segments wrappers add to parameter and module names (FSDP1, activation checkpointing, torch.compile)
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def clean_name(name: str) -> str:
    """``name`` without the segments wrappers add: the name the user wrote."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


def parameter_names(module: nn.Module) -> dict[int, str]:
    """Each parameter's name, by ``id``: its first name in ``named_parameters()`` without the wrappers'
    segments. The one naming of layers in events (the guard's and the spectral monitor's)."""
    return {id(p): clean_name(n) for n, p in module.named_parameters()}


def leaf(name: str) -> str:
    return clean_name(name).rsplit(".", 1)[-1]


def is_output_head(name: str, module: nn.Module) -> bool:
    """An output head, at any depth: a linear layer whose own name is a head's (``lm_head``, ``head``,
    ``classifier``, ``decoder``, ``output``), or a block named ``lm_head``/``output``/``head``/
    ``classifier`` (a ``head = nn.Sequential(...)``; a block named ``decoder`` is a decoder stack)."""
    name_ = leaf(name)
    return name_ in HEAD_LEAVES if isinstance(module, nn.Linear) else name_ in HEAD_NAMES and name != ""


def output_heads(modules: Iterable[tuple[str, nn.Module]]) -> list[str]:
    """The names of every module :func:`is_output_head` accepts (outermost first, in order); a layer
    inside one of them (:func:`within`) belongs to the head too."""
    heads: list[str] = []
    for name, module in modules:
        if is_output_head(name, module) and not within(name, heads):
            heads.append(name)
    return heads


def within(name: str, outer: Iterable[str]) -> bool:
    """Whether module ``name`` is one of ``outer`` or inside one of them."""
    return any(name == o or name.startswith(f"{o}.") for o in outer)


def find_output_head(
    modules: Mapping[str, nn.Module], head: str | None = None, owner: str = "head"
) -> tuple[str | None, nn.Module | None]:
    """The model's one output head: ``head`` by name (``owner`` names the argument in the error);
    else a top-level ``lm_head``/``output``/``head``/``classifier``; else the last linear layer
    :func:`is_output_head` accepts; else the last ``nn.Linear``; else none."""
    if head is not None:
        if head not in modules:
            raise ValueError(f"{owner}={head!r}: no such module; modules include {list(modules)[1:8]}")
        return head, modules[head]
    for name in HEAD_NAMES:
        if name in modules:
            return name, modules[name]
    linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    heads = [(n, m) for n, m in linears if is_output_head(n, m)]
    if heads:
        return heads[-1]
    return linears[-1] if linears else (None, None)


def looks_like_attention(module: nn.Module) -> bool:
    """An attention layer: ``nn.MultiheadAttention`` or a class named ``...Attention`` (Hugging Face's
    ``LlamaAttention``, ``BertSelfAttention``, litgpt's ``CausalSelfAttention``)."""
    return isinstance(module, nn.MultiheadAttention) or type(module).__name__.endswith("Attention")

