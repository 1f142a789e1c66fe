from __future__ import annotations

import pytest

from lightning_stability import FP8Precision, LowBitOptimizer, resolve_precision
from lightning_stability.cli import main
from tests.conftest import make_trainer, tiny_gpt


def test_lightning_strings_pass_through():
    assert resolve_precision("bf16-mixed") == {"precision": "bf16-mixed", "plugins": [], "callbacks": []}
    assert resolve_precision("32-true")["precision"] == "32-true"


@pytest.mark.parametrize("flag, backend, recipe", [("fp8", "auto", "delayed"), ("fp8-emulated", "emulated", "delayed"),
                                                   ("fp8-current", "auto", "current")])
def test_fp8_flags_give_the_plugin_and_no_precision_string(flag, backend, recipe):
    setup = resolve_precision(flag)
    assert "precision" not in setup and setup["callbacks"] == []
    (plugin,) = setup["plugins"]
    assert isinstance(plugin, FP8Precision) and plugin.requested_backend == backend and plugin.recipe == recipe


def test_combinations():
    setup = resolve_precision("fp8+adamw8bit")
    assert [type(p) for p in setup["plugins"]] == [FP8Precision]
    (callback,) = setup["callbacks"]
    assert isinstance(callback, LowBitOptimizer) and callback.optimizer == "adamw8bit"
    setup = resolve_precision("bf16-mixed + paged-adamw8bit")
    assert setup["precision"] == "bf16-mixed" and setup["callbacks"][0].optimizer == "paged-adamw8bit"


@pytest.mark.parametrize("flag, match", [
    ("fp4", "unknown part 'fp4'"),
    ("fp8+bf16-mixed", "two precisions"),
    ("adamw8bit+lion8bit", "two optimizers"),
    ("", "non-empty"),
])
def test_bad_flags_list_the_valid_ones(flag, match):
    with pytest.raises(ValueError, match=match) as info:
        resolve_precision(flag)
    if "unknown" in match:
        assert "fp8-emulated" in str(info.value) and "bf16-mixed" in str(info.value)


def test_a_resolved_flag_trains(tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    model, loader = tiny_gpt(3)
    setup = resolve_precision("fp8-emulated+adamw8bit")
    trainer = make_trainer(tmp_path, 3, setup["callbacks"], plugins=setup["plugins"])
    trainer.fit(model, loader)
    assert trainer.precision_plugin is setup["plugins"][0]
    assert type(trainer.optimizers[0]) is bnb.optim.AdamW8bit
    assert setup["plugins"][0].converted_layers == ["blocks.0.attn.proj", "blocks.0.mlp.0", "blocks.0.mlp.2"]


def test_doctor_says_what_each_flag_does_here(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "torch " in out and "Transformer Engine:" in out and "bitsandbytes:" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    assert "emulated FP8 (current scaling)" in lines["fp8-current"]
    assert "emulated FP8 (delayed scaling)" in lines["fp8-emulated"]
    assert "AdamW8bit" in lines["adamw8bit"]


def test_the_lightning_cli_equivalent_builds_the_same_set_up(tmp_path):
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    from lightning_stability.demos import TinyGPT

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  accelerator: cpu\n"
        "  logger: false\n"
        "  plugins:\n"
        "    - class_path: lightning_stability.FP8Precision\n"
        "      init_args: {backend: emulated, recipe: current}\n"
        "  callbacks:\n"
        "    - class_path: lightning_stability.LowBitOptimizer\n"
        "      init_args: {optimizer: adamw8bit}\n"
        "model:\n"
        "  vocab_size: 40\n"
    )
    cli = LightningCLI(TinyGPT, run=False, args=["--config", str(config)], save_config_callback=None)
    plugin = cli.trainer.precision_plugin
    assert isinstance(plugin, FP8Precision) and plugin.requested_backend == "emulated" and plugin.recipe == "current"
    (swap,) = [c for c in cli.trainer.callbacks if isinstance(c, LowBitOptimizer)]
    assert swap.optimizer == "adamw8bit"
