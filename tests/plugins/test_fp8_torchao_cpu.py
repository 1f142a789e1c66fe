"""The torchao backend against the real torchao, on this CPU: torchao's float8 training runs here through
torch's CPU ``torch._scaled_mm``, so the conversion, the casts and the GEMMs are the library's own; only
the hardware check is told it has an SM 9.0 GPU (``real_torchao``). What a GPU adds is the speed
(tests/plugins/test_fp8_gpu.py). The mocked tests (test_fp8_torchao_mocked.py) cover what a fake can:
the choice of backend, the refusals, the FSDP2 path on two ranks."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_stability import get_event_log
from lightning_stability.plugins.fp8 import EmulatedFP8Linear, FP8Precision
from tests.conftest import make_trainer, tiny_gpt
from tests.plugins.conftest import fit_llama

pytestmark = pytest.mark.usefixtures("real_torchao")
RECIPES = ("tensorwise", "rowwise")


def _float8_linear():
    from torchao.float8.float8_linear import Float8Linear

    return Float8Linear


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_emulator_computes_what_torchaos_float8_linear_computes(recipe):
    """The emulator is the FP8 we offer where there is no GPU: for the same weights, input and output
    gradient it gives torchao's output and gradients (tensorwise: up to the float32 accumulation order;
    rowwise: bit for bit, bfloat16 GEMM outputs included), and both differ from the float32 layer."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 32)
    ao = nn.Sequential(nn.Linear(64, 32))
    ao[0].load_state_dict(linear.state_dict())
    convert_to_float8_training(ao, config=Float8LinearConfig.from_recipe_name(recipe))
    assert type(ao[0]) is _float8_linear()
    emulated = EmulatedFP8Linear.from_linear(linear, recipe=recipe)
    x = torch.randn(48, 64, generator=g) * torch.logspace(-2, 1, 48)[:, None]  # tokens of many magnitudes
    grad = torch.randn(48, 32, generator=g) * torch.logspace(-3, 0, 32)
    xa, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, ye = ao(xa), emulated(xe)
    ya.backward(grad)
    ye.backward(grad)
    tol = 0.0 if recipe == "rowwise" else 1e-6
    for ours, theirs in ((ye, ya), (xe.grad, xa.grad), (emulated.weight.grad, ao[0].weight.grad),
                         (emulated.bias.grad, ao[0].bias.grad)):
        assert _rel(ours.detach(), theirs.detach()) <= tol
    assert _rel(ya.detach(), linear(x).detach()) > 1e-2  # FP8 really ran: 3-4% from the float32 layer


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_health_is_taken_in_the_formats_and_scales_torchaos_casts_use(recipe):
    """Per role, the health's scale is the one torchao's cast computes for that tensor: per tensor for
    tensorwise (E5M2 for the output gradient), the smallest power-of-two row scale for rowwise (E4M3 for
    every role). A health in the wrong format would be off by 2^7 (448 against 57344)."""
    from torchao.float8.config import ScalingGranularity
    from torchao.float8.float8_scaling_utils import tensor_to_scale

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    plugin = FP8Precision(backend="torchao", recipe=recipe, keep_first_last=False)
    plugin.convert_module(model)
    assert plugin.converted_layers == ["0", "2"] and type(model[2]) is _float8_linear()
    layer = plugin._layers["2"]
    layer.health_due = True
    seen = {}
    model[2].register_forward_pre_hook(lambda m, args: seen.update(input=args[0].detach()))
    model[2].register_full_backward_hook(lambda m, gi, go: seen.update(grad=go[0].detach()))
    (model(torch.randn(4, 8, 32, requires_grad=True)) ** 2).mean().backward()

    rowwise = recipe == "rowwise"
    dtypes = {"input": torch.float8_e4m3fn, "weight": torch.float8_e4m3fn,
              "grad": torch.float8_e4m3fn if rowwise else torch.float8_e5m2}
    tensors = {"input": seen["input"], "weight": model[2].weight.detach(), "grad": seen["grad"]}
    for role, t in tensors.items():
        t = t.reshape(-1, t.shape[-1])
        if rowwise:
            theirs = tensor_to_scale(t, dtypes[role], scaling_granularity=ScalingGranularity.AXISWISE, axiswise_dim=-1,
                                     round_scales_to_power_of_2=True).amin()
        else:
            theirs = tensor_to_scale(t, dtypes[role])
        assert float(layer.health[role]["scale"]) == pytest.approx(float(theirs), rel=1e-6), role
        if rowwise:
            assert math.log2(float(theirs)) == int(math.log2(float(theirs)))


def test_both_recipes_train_llama_close_to_float32_as_torchaos_float8_linear(tmp_path):
    """Hugging Face's Llama (GQA: narrower k and v projections) with torchao's own Float8Linear layers
    trains as in float32; health every step, and nothing falls back on a healthy run."""
    losses = {"float32": fit_llama(tmp_path, "float32", [])[1]}
    for recipe in RECIPES:
        plugin = FP8Precision(backend="torchao", recipe=recipe, health_every_n_steps=1)
        model, losses[recipe] = fit_llama(tmp_path, recipe, [plugin])
        k_proj = "model.model.layers.0.self_attn.k_proj"
        assert plugin.backend == "torchao" and k_proj in plugin.converted_layers
        assert type(model.get_submodule(k_proj)) is _float8_linear()
        assert plugin.last_health[f"{k_proj}/grad/amax"] > 0 and not plugin.fallback_layers
    for recipe in RECIPES:
        assert losses[recipe] == pytest.approx(losses["float32"], rel=0.02), recipe


def test_a_layer_named_by_an_event_runs_as_the_plain_linear_until_fp8_is_retried(tmp_path):
    """Fallback on torchao's Float8Linear: while fallen back, the layer's output is the plain linear's
    under the plugin's bf16 autocast; before and after, it is torchao's FP8 GEMM's, which is not."""
    model, loader = tiny_gpt(12)
    plugin = FP8Precision(backend="torchao", cooldown=4, health_every_n_steps=1)
    target = "blocks.0.mlp.0"
    in_fp8: list[bool] = []

    class Probe(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            def compare(module, args, out):
                if module.training:
                    with torch.no_grad():
                        in_fp8.append(not torch.equal(out, F.linear(args[0], module.weight, module.bias)))
            pl_module.get_submodule(target).register_forward_hook(compare)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                get_event_log(trainer).emit(3, "my_check", "MyMonitor", "warning", {}, None, target)

    trainer = make_trainer(tmp_path, 12, [Probe()], plugins=[plugin])
    trainer.fit(model, loader)
    assert type(model.get_submodule(target)) is _float8_linear()
    kinds = [(e.kind, e.target, e.step) for e in get_event_log(trainer) if e.source == "FP8Precision"]
    fell = next(step for kind, t, step in kinds if kind == "fp8_fallback" and t == target)
    back = next(step for kind, t, step in kinds if kind == "fp8_retry" and t == target)
    assert in_fp8[:fell] == [True] * fell  # FP8 up to the fallback
    assert not any(in_fp8[fell + 1:back]) and in_fp8[-1]  # the plain linear in between; FP8 again at the end


def test_with_the_float8_all_gather_on_one_device_training_is_the_same(tmp_path):
    """``float8_all_gather=True`` wraps the converted weights for FSDP2; on one device nothing is
    gathered, and the run is the one without it, bit for bit."""
    weights = []
    for gather in (False, True):
        model, loader = tiny_gpt(6)
        plugin = FP8Precision(backend="torchao", float8_all_gather=gather, health_every_n_steps=1)
        make_trainer(tmp_path / str(gather), 6, [], plugins=[plugin]).fit(model, loader)
        assert plugin.last_health["blocks.0.mlp.0/weight/amax"] > 0
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


@pytest.mark.parametrize("client", ["bert", "vit", "lightning_transformer", "litgpt"])
def test_users_models_train_with_torchaos_float8_linear(tmp_path, client):
    """An encoder with a padding mask (BERT), ViT (token counts no multiple of 16), Lightning's demo
    Transformer (nn.MultiheadAttention: its out_proj kept) and litgpt: their linear layers become
    torchao's Float8Linear, the health is sampled, and a few steps stay finite."""
    from tests.clients.models import Client, loader

    model = Client(client, max_steps=3)
    plugin = FP8Precision(backend="torchao", health_every_n_steps=1)
    make_trainer(tmp_path, 3, [], plugins=[plugin]).fit(model, loader(client, n=24))
    assert plugin.converted_layers and all(type(model.get_submodule(n)) is _float8_linear()
                                           for n in plugin.converted_layers)
    assert all(plugin.last_health[f"{n}/grad/amax"] > 0 for n in plugin.converted_layers)
    assert all(torch.isfinite(p).all() for p in model.parameters())
