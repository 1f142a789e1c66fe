"""The torchao backend with torchao's float8 conversion mocked the way the TE tests mock TE: the choice of
backend, the refusals and what the plugin asks of torchao. The real torchao trains on this CPU in
test_fp8_torchao_cpu.py and on a GPU in the GPU-marked tests (tests/plugins/test_fp8_gpu.py), under
FSDP2 too; the FSDP2 run with the fake on 2 CPU ranks is in tests/callbacks/test_fsdp.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_stability import get_event_log, resolve_precision
from lightning_stability.plugins import _torchao
from lightning_stability.plugins.fp8 import EmulatedFP8Linear, FP8Precision
from tests.conftest import make_trainer, tiny_gpt
from tests.plugins._fake_torchao import FakeFloat8Linear, install


@pytest.fixture
def fake_torchao(monkeypatch):
    return install(monkeypatch.setattr, monkeypatch.setitem)


def test_auto_picks_torchao_where_te_is_missing_and_says_so(fake_torchao):
    plugin = FP8Precision()
    assert (plugin.backend, plugin.recipe) == ("torchao", "tensorwise")
    assert plugin.backend_reason == "torchao float8 on SM90 (Transformer Engine is not installed)"
    assert resolve_precision("fp8-torchao")["plugins"][0].backend == "torchao"
    fake_torchao.sm["value"] = (8, 0)  # no FP8 tensor cores: the emulator
    assert FP8Precision().backend == "emulated"
    with pytest.raises(RuntimeError, match=r"needs a CUDA GPU with SM>=8.9; this GPU is SM80.*backend='emulated'"):
        FP8Precision(backend="torchao")


def test_under_fsdp1_the_torchao_backend_is_refused_and_names_the_fsdp2_way(fake_torchao):
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    fsdp2_way = r"ModelParallelStrategy, the model converted in configure_model before fully_shard"
    with pytest.raises(RuntimeError, match=rf"backend='torchao'\) cannot serve FSDPStrategy: .*Use DDP.*{fsdp2_way}"):
        FP8Precision(backend="torchao")._start(SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy)))
    for backend in ("emulated", "torchao"):  # the emulator keeps an amax history: refused under FSDP2 too
        plugin = FP8Precision(backend=backend)
        strategy = SimpleNamespace(strategy=ModelParallelStrategy.__new__(ModelParallelStrategy), world_size=1)
        if backend == "emulated":
            with pytest.raises(RuntimeError, match=rf"backend='emulated'\) cannot serve ModelParallelStrategy.*{fsdp2_way}"):
                plugin._start(strategy)
        else:
            plugin._unsubscribe = lambda: None  # served: it goes on to the event log (a real fit: the FSDP2 test)
            plugin._start(strategy)


def test_torchao_refuses_layers_sharded_before_the_conversion_naming_the_call_that_comes_first(fake_torchao, monkeypatch):
    model, _ = tiny_gpt(2)
    sharded = model.blocks[0].mlp[0].weight
    monkeypatch.setattr(_torchao, "is_dtensor", lambda t: t is sharded)  # as fully_shard leaves it: a DTensor
    with pytest.raises(RuntimeError, match=r"\['blocks.0.mlp.0'\] are sharded already; torchao converts whole weights\. "
                       r"In configure_model, call self\.trainer\.precision_plugin\.convert_module\(self\)"):
        FP8Precision(backend="torchao").convert_module(model)
    assert fake_torchao.filtered == []  # nothing converted


def test_the_layers_our_filter_picks_are_converted_by_torchao_and_train(tmp_path, fake_torchao):
    model, loader = tiny_gpt(6)
    reference = FP8Precision(backend="emulated")
    reference.convert_module(tiny_gpt(6)[0])
    plugin = FP8Precision(backend="torchao", recipe="rowwise", health_every_n_steps=1)
    trainer = make_trainer(tmp_path, 6, [], plugins=[plugin])
    trainer.fit(model, loader)
    # the same rule as the other backends (first/last linear and the head kept), through torchao's filter
    assert plugin.converted_layers == reference.converted_layers and plugin.converted_layers
    assert sorted(fake_torchao.filtered) == sorted(plugin.converted_layers) and fake_torchao.recipes == ["rowwise"]
    modules = dict(model.named_modules())
    assert all(type(modules[n]) is FakeFloat8Linear for n in plugin.converted_layers)
    assert type(modules["lm_head"]) is nn.Linear
    assert all(FakeFloat8Linear.calls[id(modules[n])] >= 6 for n in plugin.converted_layers)  # its forward ran
    # the health: every role of every layer, from the tensors' own scales
    layer = plugin.converted_layers[0]
    for role in ("input", "weight", "grad"):
        assert plugin.last_health[f"{layer}/{role}/amax"] > 0
        assert plugin.last_health[f"{layer}/{role}/overflow_frac"] < 0.01  # scaled to fit: at most the amax element
        assert 0.0 <= plugin.last_health[f"{layer}/{role}/underflow_frac"] < 1.0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # a fit again (a test after the fit) keeps the converted layers as they are
    plugin.convert_module(model)
    assert len(fake_torchao.filtered) == len(plugin.converted_layers)


def test_a_layer_named_by_an_event_falls_back_to_bf16_and_fp8_is_retried(tmp_path, fake_torchao):
    import lightning.pytorch as pl

    model, loader = tiny_gpt(12)
    plugin = FP8Precision(backend="torchao", cooldown=4, health_every_n_steps=1)
    target = "blocks.0.mlp.0"

    class Name(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                get_event_log(trainer).emit(3, "my_check", "MyMonitor", "warning", {}, None, target)
            module = dict(pl_module.named_modules())[target]
            calls.append(FakeFloat8Linear.calls.get(id(module), 0))

    calls: list[int] = []
    trainer = make_trainer(tmp_path, 12, [Name()], plugins=[plugin])
    trainer.fit(model, loader)
    kinds = [(e.kind, e.target) for e in get_event_log(trainer) if e.source == "FP8Precision"]
    assert ("fp8_fallback", target) in kinds and ("fp8_retry", target) in kinds
    steps_in_fp8 = [b - a for a, b in zip(calls, calls[1:])]
    assert 0 in steps_in_fp8 and steps_in_fp8[-1] == 1  # bf16 while fallen back, FP8 again after the cooldown


def test_a_recipe_torchao_does_not_run_is_refused_naming_those_it_does(fake_torchao):
    with pytest.raises(ValueError, match=r"recipe='delayed'\): the torchao backend runs \['tensorwise', 'rowwise'\]"):
        FP8Precision(backend="torchao", recipe="delayed")
    with pytest.raises(ValueError, match=r"the emulator runs per-tensor and row-wise scaling .*block-scaled recipes need Transformer"):
        FP8Precision(backend="emulated", recipe="mxfp8")


def test_on_this_machine_torchao_is_refused_naming_what_it_needs(monkeypatch):
    monkeypatch.setattr(_torchao, "TORCHAO_AVAILABLE", False)  # not installed
    with pytest.raises(ModuleNotFoundError, match=r"needs torchao: pip install \"lightning-stability\[fp8-torchao\]\".*"
                                                  r"backend='emulated'"):
        FP8Precision(backend="torchao")
    monkeypatch.setattr(_torchao, "TORCHAO_AVAILABLE", True)
    monkeypatch.setattr(_torchao, "device_capability", lambda: None)
    with pytest.raises(RuntimeError, match=r"SM>=8.9; CUDA is not available\. Use FP8Precision\(backend='emulated'\)"):
        FP8Precision(backend="torchao")


def test_on_this_machine_auto_studies_torchaos_recipes_in_the_emulator(tmp_path):
    for recipe in ("tensorwise", "rowwise"):
        plugin = FP8Precision(recipe=recipe)  # auto: no torchao on a GPU here, so the emulator runs the recipe
        assert (plugin.backend, plugin.recipe) == ("emulated", recipe)
    x = torch.randn(3, 32)
    x[0] *= 1e-7
    layer = EmulatedFP8Linear(32, 16, bias=False, recipe="tensorwise")
    tensorwise = layer(x)
    layer.recipe = "rowwise"
    rowwise = layer(x)
    assert torch.all(tensorwise[0] == 0) and torch.all(rowwise[0] != 0)  # the tiny token flushed, or kept row-wise


def test_the_float8_all_gather_is_refused_where_torchao_does_not_serve_it(fake_torchao):
    with pytest.raises(ValueError, match=r"float8_all_gather=True\): .* backend='torchao' with recipe='tensorwise'; "
                                         r"this plugin runs backend='torchao', recipe='rowwise'"):
        FP8Precision(backend="torchao", recipe="rowwise", float8_all_gather=True)
    with pytest.raises(ValueError, match=r"runs backend='emulated', recipe='delayed'"):
        FP8Precision(backend="emulated", float8_all_gather=True)
    with pytest.raises(TypeError, match=r"float8_all_gather='yes'\): expected True or False"):
        FP8Precision(backend="torchao", float8_all_gather="yes")  # type: ignore[arg-type]
    assert FP8Precision(float8_all_gather=True).backend == "torchao"  # auto: torchao here, its default recipe
