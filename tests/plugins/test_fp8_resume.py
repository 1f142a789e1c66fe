"""Resuming from a checkpoint with every precision flag: the FP8 scaling state (the emulator's amax
histories and scales, Transformer Engine's ``_extra_state``) and the 8-bit optimizer state come back
bit for bit, and a resumed run continues exactly as the uninterrupted one. torchao's float8 training
(the real library, on this CPU) scales dynamically: only its weights and the optimizer come back."""

from __future__ import annotations

import importlib.util

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_stability import resolve_precision
from lightning_stability.plugins.fp8 import EmulatedFP8Linear, FP8Precision
from tests.conftest import make_trainer, tiny_gpt
from tests.plugins.conftest import FakeTELinear

BATCHES = 4  # one epoch; the checkpoint is written at its end, so both runs see the same batches after it
FLAGS = ["fp8-emulated", "fp8-emulated+adamw8bit", "adamw8bit"]
_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _setup(flag):
    if "adamw8bit" in flag and not _BNB:
        pytest.skip("bitsandbytes is not installed")
    if flag == "te-mocked":
        return {"plugins": [FP8Precision(backend="te")], "callbacks": []}
    if flag == "torchao":
        return {"plugins": [FP8Precision(backend="torchao")], "callbacks": []}
    return resolve_precision(flag)


def _fixture(flag, request):
    if flag in ("te-mocked", "torchao"):
        request.getfixturevalue("fake_te" if flag == "te-mocked" else "real_torchao")


def _scaling(model):
    """Every FP8 layer's scaling state, cloned: the emulator's buffers, TE's metadata."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, EmulatedFP8Linear):
            out[name] = {"amax_history": module.amax_history.clone(), "scale": module.scale.clone()}
        elif isinstance(module, FakeTELinear) and module.fp8_steps:
            out[name] = {f"{key}/{part}": getattr(meta, part).clone() for key, meta in module.fp8_meta.items()
                         for part in ("amax_history", "scale")}
    return out


def _optimizer_state(trainer):
    return [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
            for s in trainer.optimizers[0].state.values()]


class _AtStart(pl.Callback):
    """What the resumed run holds when its first step starts: restoring is done by then."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not hasattr(self, "scaling"):
            self.scaling, self.optimizer = _scaling(pl_module), _optimizer_state(trainer)
            self.step = trainer.global_step


def _assert_equal(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name} {key}"


def _assert_same_optimizer_state(a, b):
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]) if torch.is_tensor(x[key]) else x[key] == y[key], key


class _AtSave(pl.Callback):
    """What the uninterrupted run holds when its checkpoint is written."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if not hasattr(self, "scaling"):
            self.scaling, self.optimizer = _scaling(pl_module), _optimizer_state(trainer)


@pytest.mark.parametrize("flag", [*FLAGS, "te-mocked", "torchao"])
def test_resume_restores_the_precision_state_exactly_and_continues_as_the_uninterrupted_run(tmp_path, flag, request):
    _fixture(flag, request)
    scaled = flag not in ("adamw8bit", "torchao")  # a scaling state to carry
    # the uninterrupted run, writing a checkpoint at the end of its first epoch
    model, loader = tiny_gpt(2 * BATCHES, batches=BATCHES)
    setup = _setup(flag)
    at_save = _AtSave()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=BATCHES, save_top_k=-1)
    whole = make_trainer(tmp_path / "whole", 2 * BATCHES, [*setup["callbacks"], ckpt, at_save],
                         plugins=setup["plugins"], enable_checkpointing=True)
    whole.fit(model, loader)
    path = tmp_path / "ckpt" / f"epoch=0-step={BATCHES}.ckpt"
    if scaled:
        assert at_save.scaling  # FP8 ran and left a scaling state to restore
        # nothing but the weights in the module's state_dict: it loads into a model without the plugin
        assert not [k for k in torch.load(path, weights_only=False)["state_dict"]
                    if k.endswith(("amax_history", ".scale", "_extra_state"))]

    # a fresh process's objects resume from it
    resumed_model, loader = tiny_gpt(2 * BATCHES, batches=BATCHES)
    setup = _setup(flag)
    probe = _AtStart()
    resumed = make_trainer(tmp_path / "resumed", 2 * BATCHES, [*setup["callbacks"], probe], plugins=setup["plugins"])
    resumed.fit(resumed_model, loader, ckpt_path=str(path))
    assert probe.step == BATCHES and resumed.global_step == 2 * BATCHES
    if flag == "torchao":
        assert type(resumed_model.blocks[0].mlp[0]).__name__ == "Float8Linear"  # torchao's own layer, resumed
    if scaled:
        _assert_equal(probe.scaling, at_save.scaling)  # bit for bit, at the first resumed step
        _assert_equal(_scaling(resumed_model), _scaling(model))  # and where the uninterrupted run ended
    _assert_same_optimizer_state(probe.optimizer, at_save.optimizer)
    for (name, p), q in zip(resumed_model.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name  # the resumed run is the uninterrupted one


@pytest.mark.parametrize("flag", ["fp8-emulated", "fp8-emulated+adamw8bit", "te-mocked", "torchao"])
def test_a_checkpoint_written_with_fp8_resumes_in_a_plain_run(tmp_path, flag, request):
    _fixture(flag, request)
    model, loader = tiny_gpt(2 * BATCHES, batches=BATCHES)
    setup = _setup(flag)
    trainer = make_trainer(tmp_path / "fp8", BATCHES, setup["callbacks"], plugins=setup["plugins"])
    trainer.fit(model, loader)
    path = tmp_path / "fp8.ckpt"
    trainer.save_checkpoint(path)
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    plain, loader = tiny_gpt(2 * BATCHES, batches=BATCHES)
    assert set(weights) == set(plain.state_dict())  # the weights' keys are the plain model's

    class Weights(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not hasattr(self, "state"):
                self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}

    probe = Weights()
    resumed = make_trainer(tmp_path / "plain", 2 * BATCHES, [probe])
    resumed.fit(plain, loader, ckpt_path=str(path))
    assert resumed.global_step == 2 * BATCHES
    assert all(torch.equal(probe.state[k], v) for k, v in weights.items())
    assert all(torch.isfinite(p).all() for p in plain.parameters())


def test_fit_then_test_with_the_checkpoint_on_the_converted_model(tmp_path, fake_te):
    """``trainer.test(ckpt_path=...)`` after ``fit`` loads the checkpoint into the model FP8 converted: TE's
    layers there expect an ``_extra_state`` the checkpoint's weights do not hold."""

    class Eval(type(tiny_gpt(1)[0])):
        def test_step(self, batch, batch_idx):
            return self.training_step(batch, batch_idx)

    model, loader = tiny_gpt(BATCHES, batches=BATCHES)
    model.__class__ = Eval
    plugin = FP8Precision(backend="te")
    trainer = make_trainer(tmp_path, BATCHES, [], plugins=[plugin])
    trainer.fit(model, loader)
    path = tmp_path / "fit.ckpt"
    trainer.save_checkpoint(path)
    converted = list(plugin.converted_layers)
    saved = _scaling(model)
    trainer.test(model, loader, ckpt_path=str(path))
    assert plugin.converted_layers == converted  # the TE layers are recognised, not converted again
    assert type(model.blocks[0].mlp[0]) is FakeTELinear and len(plugin._layers) == len(converted)
    _assert_equal(_scaling(model), saved)  # the test loop does not train: the restored state stays


def test_an_older_checkpoint_with_scaling_buffers_in_the_state_dict_is_tolerated(tmp_path):
    """Checkpoints written before the scaling state moved to the plugin hold it as the layers' buffers in
    the module's state_dict: with ``strict_loading=False`` the run resumes and the plugin takes the scaling
    from there; a converted module loads such a state_dict too."""
    model, loader = tiny_gpt(2 * BATCHES, batches=BATCHES)
    plugin = FP8Precision(backend="emulated")
    trainer = make_trainer(tmp_path / "old", BATCHES, [], plugins=[plugin])
    trainer.fit(model, loader)
    path = tmp_path / "old.ckpt"
    trainer.save_checkpoint(path)
    saved = _scaling(model)
    checkpoint = torch.load(path, weights_only=False)  # rewrite it as an older version wrote it
    for name, state in saved.items():
        for key, value in state.items():
            checkpoint["state_dict"][f"{name}.{key}"] = value
    del checkpoint["FP8Precision"]["scaling"]
    torch.save(checkpoint, path)

    fresh, _ = tiny_gpt(2 * BATCHES, batches=BATCHES)
    fresh.strict_loading = False
    probe = _AtStart()
    make_trainer(tmp_path / "new", BATCHES + 1, [probe], plugins=[FP8Precision(backend="emulated")]).fit(
        fresh, loader, ckpt_path=str(path))
    _assert_equal(probe.scaling, saved)
    # a converted module takes the old state_dict as it is, strictly
    other, _ = tiny_gpt(2 * BATCHES, batches=BATCHES)
    FP8Precision(backend="emulated").convert_module(other)
    other.load_state_dict(checkpoint["state_dict"])
    _assert_equal(_scaling(other), saved)
