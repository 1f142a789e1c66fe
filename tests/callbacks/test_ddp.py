from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch.distributed

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def run_two_ranks(script: str, tmp_path) -> list[dict]:
    """Run one of the DDP scripts beside this file on 2 gloo processes; each rank's JSON report."""
    path = os.path.join(os.path.dirname(__file__), script)
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, path, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_every_rank_takes_the_same_decision_in_the_same_step(tmp_path):
    ranks = run_two_ranks("ddp_guard_script.py", tmp_path)
    assert ranks[0]["events"] == ranks[1]["events"]
    detections = [tuple(e) for e in ranks[0]["events"] if e[1] != "armed"]
    # a NaN loss on rank 1 only: every rank skips; a gradient corrupted on rank 1 after the
    # all-reduce: the ranks disagree on the norm, so clipping alike is impossible and both skip
    assert detections == [(40, "nonfinite", "skip"), (50, "grad_spike", "skip")]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # replicas still bit-identical
    assert ranks[0]["finite"] and ranks[1]["finite"]


def test_every_rank_restores_the_same_snapshot_in_the_same_step(tmp_path):
    ranks = run_two_ranks("ddp_rollback_script.py", tmp_path)
    # the NaN loss was on rank 1 only, the request on rank 0 only: both ranks roll back, in the same
    # step, to the same snapshot; each quarantines its own batches and the records are gathered
    assert ranks[0]["rollbacks"] == ranks[1]["rollbacks"] == [[26, 20, 12], [45, 40, 10]]
    assert ranks[0]["events"] == ranks[1]["events"]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["finite"] and ranks[1]["finite"]
    with open(tmp_path / "quarantine.json") as f:
        data = json.load(f)
    first = data["rollbacks"][0]["batches"]
    assert sorted({b["rank"] for b in first}) == [0, 1]
    assert sorted(b["step"] for b in first if b["rank"] == 1) == list(range(20, 26))
    ids = [set(b["sample_ids"]) for b in first]
    assert len(set().union(*ids)) == sum(len(i) for i in ids)  # each rank's own samples


def test_every_rank_applies_the_same_spectral_intervention(tmp_path):
    ranks = run_two_ranks("ddp_spectral_script.py", tmp_path)
    # the bump at step 120 is seen at the check of steps 120..124 and smoothed on both ranks alike;
    # the loss after it is worse on rank 1 only, and the rank average makes both ranks ask for the
    # same rollback in the same step
    assert ranks[0]["events"] == ranks[1]["events"]
    detections = [tuple(e) for e in ranks[0]["events"] if e[1] in ("sigma_growth", "intervention_failed")]
    assert detections[:2] == [(125, "sigma_growth", "pss", "blocks.0.mlp.0"), (130, "intervention_failed", "rollback", None)]
    assert ranks[0]["rollbacks"] == ranks[1]["rollbacks"] == [130]
    assert ranks[0]["sigma"] == ranks[1]["sigma"]
    assert ranks[0]["digest"] == ranks[1]["digest"]


def test_every_rank_takes_the_same_softmax_decision_and_the_same_qk_clip(tmp_path):
    ranks = run_two_ranks("ddp_softmax_script.py", tmp_path)
    assert ranks[0]["events"] == ranks[1]["events"]
    kinds = [(e[1], e[2]) for e in ranks[0]["events"]]
    # log Z drifted on rank 1 only; both ranks turned z-loss on in the same step, and off again
    drift = [e for e in ranks[0]["events"] if e[1] == "logit_drift"]
    assert drift and drift[0][2] == "z_loss" and 10 <= drift[0][0] <= 16
    assert any(k == "softmax_recovered" and "z_loss_off" in (a or "").split(",") for k, a in kinds)
    assert ("qk_clip", "qk_clip") in kinds
    assert ranks[0]["stats"] == ranks[1]["stats"]
    assert ranks[0]["digest"] == ranks[1]["digest"]


def test_every_rank_falls_back_the_same_fp8_layer_in_the_same_step(tmp_path):
    pytest.importorskip("bitsandbytes")
    ranks = run_two_ranks("ddp_precision_script.py", tmp_path)
    # the overflow was on rank 1 only; the gathered health makes both ranks switch the layer in step 8
    # and back after the cool-down, and the 8-bit optimizer keeps the replicas identical
    assert ranks[0]["events"] == ranks[1]["events"]
    events = [tuple(e) for e in ranks[0]["events"]]
    fallbacks = {e[3] for e in events if e[1] == "fp8_fallback"}
    assert "blocks.0.mlp.0" in fallbacks and all(e[0] == 8 for e in events if e[1] == "fp8_fallback")
    assert {e[3] for e in events if e[1] == "fp8_retry" and e[0] == 13} == fallbacks
    assert ranks[0]["optimizer"] == ranks[1]["optimizer"] == "AdamW8bit"
    assert ranks[0]["health"] == ranks[1]["health"]
    assert ranks[0]["digest"] == ranks[1]["digest"]
