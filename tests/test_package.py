from __future__ import annotations

import json
import subprocess
import sys

import pytest

import lightning_stability
from lightning_stability.cli import main


def test_import_is_light():
    """``import lightning_stability`` must not load Transformer Engine, bitsandbytes or TensorBoard."""
    code = (
        "import sys, json, lightning_stability;"
        "print(json.dumps([m for m in ('transformer_engine', 'bitsandbytes', 'tensorboard')"
        " if any(k == m or k.startswith(m + '.') for k in sys.modules)]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_public_api():
    for name in ("GradientSpikeGuard", "EventLog", "StabilityEvent", "get_event_log"):
        assert name in lightning_stability.__all__
        assert getattr(lightning_stability, name) is not None


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"lightning-stability {lightning_stability.__version__}"


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "lightning_stability.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and lightning_stability.__version__ in out.stdout


def test_cli_events_summary(tmp_path, capsys):
    from lightning_stability.events import EventLog

    log = EventLog()
    log.stream_to(tmp_path)
    log.emit(3, "armed", "g", "info")
    log.emit(9, "nonfinite", "g", "critical", {"grad_norm": float("nan")}, "skip")
    log.close_stream()
    assert main(["events", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 events" in out and "step       9  nonfinite" in out and "action=skip" in out
    assert main(["events", str(tmp_path / "missing")]) == 2
