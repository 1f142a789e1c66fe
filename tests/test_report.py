from __future__ import annotations

import json
import sys

from lightning.pytorch.loggers import TensorBoardLogger

from lightning_stability import GradientSpikeGuard, StabilityEvent
from lightning_stability.cli import main
from lightning_stability.demos import FaultInjector
from lightning_stability.report import _incident_rows, load_run, verdict
from tests.conftest import make_trainer, tiny_gpt


def _run(tmp_path):
    model, loader = tiny_gpt(12)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = make_trainer(tmp_path, 12, [FaultInjector({6: ("grad_nan", None)}), GradientSpikeGuard()],
                           logger=logger, log_every_n_steps=1)
    trainer.fit(model, loader)
    return logger.log_dir


def test_report_from_a_real_run_has_the_verdict_plots_and_timeline(tmp_path, capsys):
    logdir = _run(tmp_path)
    out = tmp_path / "out" / "report.html"
    assert main(["report", logdir, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 non-finite step at step 6: all skipped." in printed and "No rollback." in printed
    page = out.read_text()
    assert "1 non-finite step at step 6: all skipped." in page
    assert page.count("data:image/png;base64,") >= 2  # loss and gradient norm, the timeline
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| 6 | GradientSpikeGuard | nonfinite | critical | skip |" in md
    # the incidents: the NaN gradient's parameter first (a non-finite norm ranks first), the batch's ids
    incidents = md.split("## Incidents")[1].split("## Timeline")[0]
    (row,) = [line for line in incidents.splitlines() if line.startswith("| 6 |")]
    step, kind, action, layers, updates, batch, worst, _ = [c.strip() for c in row.strip("|").split("|")]
    assert (kind, action) == ("nonfinite", "skip") and batch.startswith("ids ") and worst == "-"  # no per-sample losses
    assert updates == "-"  # no SpectralMonitor in this run
    assert layers.split(" (")[0] == "tok_emb.weight"  # FaultInjector's NaN goes into the first gradient
    assert "<h2>Incidents</h2>" in page
    data = load_run(logdir)
    assert len(data.series("stability/grad/norm")) >= 10  # read back from the event files


def test_without_matplotlib_the_report_still_has_the_verdict(tmp_path, monkeypatch):
    logdir = _run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = tmp_path / "report.html"
    assert main(["report", logdir, "-o", str(out)]) == 0
    page = out.read_text()
    assert "matplotlib is not installed" in page and "data:image/png" not in page
    assert "non-finite step at step 6" in page


def test_verdict_names_fallbacks_rollbacks_and_a_clean_run(tmp_path):
    events = [
        StabilityEvent(3, "armed", "GradientSpikeGuard", "info"),
        StabilityEvent(40, "fp8_fallback", "FP8Precision", "warning", {"until_step": 240.0}, "bf16:health", "blocks.3.attn.qkv"),
        StabilityEvent(50, "rollback", "InMemoryRollback", "warning", {"lost_steps": 12.0}, "rollback"),
        StabilityEvent(49, "loss_spike", "GradientSpikeGuard", "warning", {}, "rollback", None,
                       {"sample_ids": [5, 6, 7, 8]}),
        StabilityEvent(49, "update_ratio", "SpectralMonitor", "info", {"update_ratio_max": 0.8}, None, None,
                       {"layers": [{"name": "h.1.mlp.c_fc.weight", "ratio": 0.8125}, {"name": "wte.weight", "ratio": 0.03}],
                        "measured_at": 48}),
        StabilityEvent(49, "sample_losses", "GradientSpikeGuard", "info", {"samples": 4.0}, None, None,
                       {"sample_ids": [7, 5, 8, 6], "sample_losses": [float("nan"), 40.25, 3.5, 3.25]}),
        StabilityEvent(80, "quarantine_verdict", "SkipQuarantined", "info", {"data_fault": 1.0}, None, None,
                       {"data_fault": [7]}),
        StabilityEvent(90, "quarantine_verdict", "SkipQuarantined", "info", {"transient": 2.0}, None, None,
                       {"transient": [3, 4]}),
    ]
    (tmp_path / "stability_events.jsonl").write_text("\n".join(json.dumps(e.to_dict()) for e in events))
    data = load_run(str(tmp_path))
    lines = verdict(data)
    assert "Layer blocks.3.attn.qkv fell back to bf16 at step 40 for 200 steps (health)." in lines
    assert "1 rollback (step 50), 12 steps undone." in lines
    (row,) = _incident_rows(data)  # the detection, with its worst samples from the event that follows it
    assert row[:3] == ("49", "loss_spike", "rollback") and row[5:7] == ("ids 5, 6, 7, 8", "7 (nan), 5 (40.25), 8 (3.5)")
    assert row[4] == "h.1.mlp.c_fc.weight (0.812), wte.weight (0.03)"  # the spectral monitor's update_ratio event
    assert "Quarantined samples retried: 1 spiked again, data faults left out (ids 7); 2 trained cleanly (transient)." in lines
    (tmp_path / "stability_events.jsonl").write_text(json.dumps(events[0].to_dict()))
    assert verdict(load_run(str(tmp_path)))[0] == "No instability detected: 1 events, all informational."


def test_missing_empty_or_corrupt_log_directories_are_clear_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such log directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "no TensorBoard event files" in capsys.readouterr().err
    (tmp_path / "stability_events.jsonl").write_text('{"step": 1, "kind": "x", "severity": "info"}\n{not json\n')
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r.html")]) == 2
    assert "corrupt at line 2" in capsys.readouterr().err
    (tmp_path / "stability_events.jsonl").write_text("")
    (tmp_path / "events.out.tfevents.1.host").write_bytes(b"\x00garbage" * 10)
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r.html")]) == 2
    assert "lightning-stability report:" in capsys.readouterr().err
