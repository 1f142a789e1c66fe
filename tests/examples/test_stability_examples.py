from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.examples import EXAMPLES, load_example


def test_gpt_stability_demo_detects_its_fault_and_writes_the_report(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "gpt_stability.py"), "--steps", "160", "--logdir", str(tmp_path)],
        capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 detections for 1 injected faults" in proc.stdout  # the 1000x spike at step 150
    assert os.path.exists(tmp_path / "demo" / "version_0" / "report.html")
    assert "1 gradient or loss spike at step 150: all clipped." in (tmp_path / "demo" / "version_0" / "report.md").read_text()


def test_spike_recovery_handles_a_spike_and_a_corrupted_weight():
    example = load_example("spike_recovery")
    spike = example.run("gradient x100", steps=130)
    assert spike["detected"] == "grad_spike@120" and spike["actions"] == "clip" and spike["finite"]
    weight = example.run("NaN weight", steps=130)
    assert "rollback" in weight["actions"] and weight["finite"]
    unguarded = example.run("NaN weight", steps=130, guard=False)
    assert unguarded["detected"] == "-" and not unguarded["finite"]  # unhandled, the NaN stays in the weights


def test_lightning_cli_example_builds_the_callbacks_and_the_precision_flag(tmp_path):
    pytest.importorskip("jsonargparse")
    pytest.importorskip("bitsandbytes")
    example = load_example("lightning_cli")
    cli = example.main(["fit", "--config", os.path.join(EXAMPLES, "lightning_cli.yaml"), "--trainer.max_steps=4",
                        "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
                        "--precision", "fp8-emulated+adamw8bit"])
    from lightning_stability import FP8Precision

    names = [type(c).__name__ for c in cli.trainer.callbacks]
    for name in ("GradientSpikeGuard", "SpectralMonitor", "SoftmaxSaturationMonitor", "InMemoryRollback",
                 "StabilityPanels", "LowBitOptimizer"):
        assert name in names
    assert isinstance(cli.trainer.precision_plugin, FP8Precision) and cli.trainer.global_step == 4
    assert type(cli.trainer.optimizers[0]).__name__ == "AdamW8bit"
