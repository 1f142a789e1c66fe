from __future__ import annotations

import re
import warnings

import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_stability import GradientSpikeGuard, SoftmaxSaturationMonitor, StabilityPanels, get_event_log
from lightning_stability.callbacks.panels import TIMELINE_TAG, stability_layout
from lightning_stability.demos import FaultInjector
from tests.callbacks._two_ranks import free_port
from tests.conftest import make_trainer, tiny_gpt


def _read(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    acc = EventAccumulator(log_dir, size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    layout = layout_pb2.Layout.FromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    tag = f"{TIMELINE_TAG}/text_summary"
    texts = [t.tensor_proto.string_val[0].decode() for t in acc.Tensors(tag)] if tag in acc.Tags()["tensors"] else []
    return layout, set(acc.Tags()["scalars"]), texts


def test_panels_lay_out_the_attached_monitors_metrics_and_write_the_timeline(tmp_path):
    model, loader = tiny_gpt(12)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    panels = StabilityPanels()
    trainer = make_trainer(
        tmp_path, 12,
        [FaultInjector({6: ("grad_nan", None)}), GradientSpikeGuard(), SoftmaxSaturationMonitor(every_n_steps=2), panels],
        logger=logger, log_every_n_steps=1,
    )
    trainer.fit(model, loader)
    layout, scalars, texts = _read(logger.log_dir)
    # one category per attached monitor, and Interventions; no Spectra or Rollback panels
    assert [c.title for c in layout.category] == ["Spikes", "Softmax", "Interventions"]
    charts = {chart.title: list(chart.multiline.tag) for c in layout.category for chart in c.chart}
    assert charts == {title: spec[1] for cat in stability_layout(["GradientSpikeGuard", "SoftmaxSaturationMonitor"]).values()
                      for title, spec in cat.items()}

    def shown(title):
        return {tag for tag in scalars if any(re.match(p, tag) for p in charts[title])}

    # the charts select the tags the monitors really logged, and only those
    assert shown("gradient norm, baseline and spike threshold") == {
        "stability/grad/norm", "stability/grad/norm_baseline", "stability/grad/norm_threshold"}
    assert shown("attention max logit, per layer") == {"stability/attention/blocks.0.attn/max_logit"}
    assert shown("output log Z") == {"stability/softmax/out_logz_mean", "stability/softmax/out_logz_std",
                                     "stability/softmax/out_logz_max"}
    events = list(get_event_log(trainer))
    assert any(e.kind == "nonfinite" and e.step == 6 for e in events)
    assert shown("events by kind (cumulative)") >= {"stability/events/nonfinite"}
    # the timeline holds every event once, with its step, kind and action
    timeline = "\n".join(texts)
    rows = [line for line in timeline.splitlines() if line.startswith("| ") and not line.startswith("| step")]
    assert len(rows) == len(events)
    for e in events:
        assert f"| {e.step} | {e.source} | {e.kind} | {e.severity} | {e.action or '-'} |" in timeline
    # the progress bar counts
    bar = trainer.progress_bar_metrics
    assert bar["spikes"] == sum(1 for e in events if e.source == "GradientSpikeGuard" and e.severity != "info") >= 1
    assert bar["interventions"] == sum(1 for e in events if e.action) >= 1


def test_without_a_tensorboard_logger_it_warns_once_and_the_fit_completes(tmp_path):
    model, loader = tiny_gpt(4)
    trainer = make_trainer(tmp_path, 4, [GradientSpikeGuard(), StabilityPanels()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, loader)
    assert [str(w.message) for w in caught if "StabilityPanels" in str(w.message)] == [
        "StabilityPanels: no TensorBoardLogger among the trainer's loggers, so no panels are written; "
        "pass logger=TensorBoardLogger(save_dir) to the Trainer."
    ]
    assert trainer.global_step == 4
    assert "interventions" in trainer.progress_bar_metrics


def test_layout_has_only_interventions_without_monitors():
    assert list(stability_layout([])) == ["Interventions"]
    with pytest.raises(KeyError):
        stability_layout(["SpectralMonitor"])["Softmax"]
    assert set(stability_layout(["SpectralMonitor", "InMemoryRollback"])) == {"Spectra", "Rollback", "Interventions"}


def test_fp8_precision_gets_its_panel(tmp_path):
    from lightning_stability import FP8Precision

    model, loader = tiny_gpt(3)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = make_trainer(tmp_path, 3, [StabilityPanels()], logger=logger, log_every_n_steps=1,
                           plugins=[FP8Precision(backend="emulated", health_every_n_steps=1)])
    trainer.fit(model, loader)
    layout, scalars, _ = _read(logger.log_dir)
    assert [c.title for c in layout.category] == ["Precision", "Interventions"]
    (precision,) = [c for c in layout.category if c.title == "Precision"]
    overflow = next(ch for ch in precision.chart if ch.title.startswith("FP8 overflow"))
    shown = {t for t in scalars if any(re.match(p, t) for p in overflow.multiline.tag)}
    assert shown == {"stability/fp8/blocks.0.attn.proj/overflow_frac", "stability/fp8/blocks.0.mlp.0/overflow_frac",
                     "stability/fp8/blocks.0.mlp.2/overflow_frac"}


def test_a_real_tensorboard_server_serves_our_layout_and_tags(tmp_path):
    import json as _json
    import subprocess
    import sys
    import time
    import urllib.request

    model, loader = tiny_gpt(8)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    make_trainer(tmp_path, 8, [FaultInjector({4: ("grad_nan", None)}), GradientSpikeGuard(),
                               SoftmaxSaturationMonitor(every_n_steps=2), StabilityPanels()],
                 logger=logger, log_every_n_steps=1).fit(model, loader)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path), "--host", "127.0.0.1", "--port", str(port),
         "--reload_interval", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )

    def get(path):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return _json.loads(response.read())

    try:
        deadline = time.time() + 90
        layout = None
        while time.time() < deadline:
            try:
                layout = get("/data/plugin/custom_scalars/layout")
                if layout:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert layout, "TensorBoard did not serve a custom-scalars layout"
        assert [c["title"] for c in layout["category"]] == ["Spikes", "Softmax", "Interventions"]
        charts = {ch["title"]: ch["multiline"]["tag"] for c in layout["category"] for ch in c["chart"]}
        assert charts["gradient norm, baseline and spike threshold"] == [
            r"stability/grad/norm(_baseline|_threshold)?(/opt\d+)?$"]
        tags = get("/data/plugin/scalars/tags")
        (run_tags,) = [t for run, t in tags.items() if run.startswith("tb")]
        assert "stability/grad/norm" in run_tags and "stability/softmax/sc_headroom_p01" in run_tags
        assert "stability/events/nonfinite" in run_tags
        # the event timeline in the Text tab
        assert get("/data/plugin/text/tags") == {"tb/version_0": [f"{TIMELINE_TAG}/text_summary"]}
    finally:
        server.terminate()
        server.wait(timeout=30)
