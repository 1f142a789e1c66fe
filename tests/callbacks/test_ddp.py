from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch.distributed

from tests.callbacks._two_ranks import launch_two_ranks, run_two_ranks, run_two_ranks_each

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def test_every_rank_takes_the_same_decision_in_the_same_step(tmp_path):
    ranks = run_two_ranks("ddp_guard_script.py", tmp_path)
    assert ranks[0]["events"] == ranks[1]["events"]
    detections = [tuple(e) for e in ranks[0]["events"] if e[1] != "armed"]
    # a NaN loss on rank 1 only: every rank skips; a gradient corrupted on rank 1 after the
    # all-reduce: the ranks disagree on the norm, so clipping alike is impossible and both skip
    assert detections == [(40, "nonfinite", "skip"), (50, "grad_spike", "skip")]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # replicas still bit-identical
    assert ranks[0]["finite"] and ranks[1]["finite"]


# Parametrized scripts run every mode in one launch: the processes' start-up is most of a short run.
ROLLBACK_MODES = ("alone", "guard_after", "accumulate")


@pytest.fixture(scope="module")
def rollback_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_rollback")
    return out, run_two_ranks_each("ddp_rollback_script.py", out, ROLLBACK_MODES)


@pytest.mark.parametrize("mode", ROLLBACK_MODES)
def test_every_rank_restores_the_same_snapshot_in_the_same_step(rollback_runs, mode):
    out, runs = rollback_runs
    ranks, tmp_path = runs[mode], out / mode
    # the NaN loss was on rank 1 only, the request on rank 0 only: both ranks roll back, in the same
    # step, to the same snapshot; each quarantines its own batches (with accumulation, the two of
    # every undone step) and the records are gathered
    per_step = 2 if mode == "accumulate" else 1
    assert ranks[0]["rollbacks"] == ranks[1]["rollbacks"] == [[26, 20, 12 * per_step], [45, 40, 10 * per_step]]
    assert ranks[0]["events"] == ranks[1]["events"]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["finite"] and ranks[1]["finite"]
    with open(tmp_path / "quarantine.json") as f:
        data = json.load(f)
    first = data["rollbacks"][0]["batches"]
    assert sorted({b["rank"] for b in first}) == [0, 1]
    assert sorted(b["step"] for b in first if b["rank"] == 1) == sorted(list(range(20, 26)) * per_step)
    ids = [set(b["sample_ids"]) for b in first]
    assert len(set().union(*ids)) == sum(len(i) for i in ids)  # each rank's own samples
    # alone, the rollback agrees with an all-reduce of its own in every step (snapshot steps add one
    # for the memory check); with a guard later in the list, the guard's collective carries its flags
    agreements = ranks[0]["agreements"]
    if mode == "alone":
        assert set(range(60)) <= set(agreements), sorted(set(range(60)) - set(agreements))
    else:
        assert agreements and all(s % 10 == 0 for s in agreements), agreements  # the snapshots' memory checks


SPECTRAL_ACTIONS = ("pss", "cap")


@pytest.fixture(scope="module")
def spectral_runs(tmp_path_factory):
    return run_two_ranks_each("ddp_spectral_script.py", tmp_path_factory.mktemp("ddp_spectral"), SPECTRAL_ACTIONS)


@pytest.mark.parametrize("action", SPECTRAL_ACTIONS)
def test_every_rank_applies_the_same_spectral_intervention(spectral_runs, action):
    ranks = spectral_runs[action]
    # the bump at step 120 is seen at the check of steps 120..124 and smoothed on both ranks alike;
    # the loss after it is worse on rank 1 only, and the rank average makes both ranks ask for the
    # same rollback in the same step
    assert ranks[0]["events"] == ranks[1]["events"]
    detections = [tuple(e) for e in ranks[0]["events"] if e[1] in ("sigma_growth", "intervention_failed")]
    assert detections[:2] == [(125, "sigma_growth", action, "blocks.0.mlp.0"), (130, "intervention_failed", "rollback", None)]
    assert ranks[0]["rollbacks"] == ranks[1]["rollbacks"] == [130]
    assert ranks[0]["sigma"] == ranks[1]["sigma"]
    assert ranks[0]["digest"] == ranks[1]["digest"]


SOFTMAX_REMEDIES = ("z_loss", "perp_grad")


@pytest.fixture(scope="module")
def softmax_runs(tmp_path_factory):
    return run_two_ranks_each("ddp_softmax_script.py", tmp_path_factory.mktemp("ddp_softmax"), SOFTMAX_REMEDIES)


@pytest.mark.parametrize("remedy", SOFTMAX_REMEDIES)
def test_every_rank_takes_the_same_softmax_decision_and_the_same_qk_clip(softmax_runs, remedy):
    ranks = softmax_runs[remedy]
    assert ranks[0]["events"] == ranks[1]["events"]
    kinds = [(e[1], e[2]) for e in ranks[0]["events"]]
    # log Z drifted on rank 1 only; both ranks turned the remedy on in the same step, and off again
    drift = [e for e in ranks[0]["events"] if e[1] == "logit_drift"]
    assert drift and drift[0][2] == remedy and 10 <= drift[0][0] <= 16
    assert any(k == "softmax_recovered" and f"{remedy}_off" in (a or "").split(",") for k, a in kinds)
    assert ("qk_clip", "qk_clip") in kinds
    assert ranks[0]["stats"] == ranks[1]["stats"]
    assert ranks[0]["digest"] == ranks[1]["digest"]


def test_every_rank_repairs_a_gradient_spike_alike_with_each_rung(tmp_path):
    ranks = run_two_ranks("ddp_interventions_script.py", tmp_path)
    # a gradient spike from rank 1's batch alone, three times and growing: after DDP's all-reduce both
    # ranks see it and climb the same ladder in the same steps
    assert ranks[0]["events"] == ranks[1]["events"]
    assert [tuple(e) for e in ranks[0]["events"] if e[1] == "grad_spike"] == [
        (40, "grad_spike", "skip"), (44, "grad_spike", "reset_moments"), (48, "grad_spike", "lr_backoff")]
    assert all(r > 100 for r in ranks[0]["spike_ratios"])  # the averaged gradient really spiked
    # weights, moments, step counts and learning rates bit-identical right after each repair and at the end
    assert ranks[0]["digests"] == ranks[1]["digests"] and len(ranks[0]["digests"]) == 3
    assert ranks[0]["final"] == ranks[1]["final"]
    assert ranks[0]["finite"] and ranks[1]["finite"]


def test_two_optimizers_under_manual_optimization_decide_alike(tmp_path):
    ranks = run_two_ranks("ddp_two_optimizers_script.py", tmp_path)
    # rank 1's NaN loss for optimizer a at step 60: both ranks skip it, and both roll back at the end
    # of that batch (after b's step, 62) to the same snapshot
    assert ranks[0]["events"] == ranks[1]["events"]
    decisions = [tuple(e) for e in ranks[0]["events"] if e[1] in ("nonfinite", "rollback")]
    assert decisions == [(60, "nonfinite", "skip"), (62, "rollback", "rollback")]
    assert ranks[0]["rollbacks"] == ranks[1]["rollbacks"] == [[62, 40]]
    assert ranks[0]["digest"] == ranks[1]["digest"] and ranks[0]["finite"]


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


# -- collectives per step, logging on rank zero ------------------------------------------------------
TIMING = ("seconds", "tor")  # measured on each rank's own clock, not decided from shared data


def _decided(event: dict) -> dict:
    metrics = {k: v for k, v in event["metrics"].items() if not any(t in k for t in TIMING)}
    return {**event, "metrics": metrics}


def _per_step(records: list, source: str | None = None) -> dict[int, list[tuple[str, int]]]:
    steps: dict[int, list[tuple[str, int]]] = {}
    for step, name, elements, caller in records:
        if isinstance(step, int) and (source is None or caller == source):
            steps.setdefault(step, []).append((name, elements))
    return steps


def test_collectives_per_step_and_logging_on_rank_zero_only(tmp_path):
    ranks = run_two_ranks("ddp_collectives_script.py", tmp_path)
    ours, plain = ranks[0]["ours"], ranks[0]["plain"]
    records = ours["collectives"]
    assert [r[:3] for r in records] == [r[:3] for r in ranks[1]["ours"]["collectives"]]  # same calls, same order
    steps = range(101)
    # steps around a detection (the faults at 70 and 85 and what follows them) may need more
    # (and the step after a detection: its end gathers the per-sample losses the steps return)
    incident = {s for e in ours["events"] if e["severity"] != "info" for s in (e["step"] - 1, e["step"], e["step"] + 1)}

    # Lightning's own collectives (its SIGTERM broadcast every step) are the same with and without ours
    assert _per_step(records, "lightning") == _per_step(plain["collectives"], "lightning")
    # DDP broadcasts module buffers before every forward: the tiny GPT has none, the FP8 emulator's
    # layers hold their scales and amax histories in buffers (DDP's collective, counted apart)
    assert _per_step(plain["collectives"], "DDP") == {}
    ddp = _per_step(records, "DDP")
    assert ours["buffer_elements"] > 0
    assert all(ddp[s] == [("_broadcast_coalesced", ours["buffer_elements"])] for s in steps)
    assert all(name != "barrier" for calls in _per_step(records).values() for name, _ in calls)  # no barrier in a step

    # the guard's all-gather of its four numbers also carries the rollback's three agreement flags (a
    # NaN loss, rank-local requests and warnings): one collective of seven numbers in every step
    guard = _per_step(records, "GradientSpikeGuard")
    for step in steps:
        if step not in incident:
            assert guard.get(step) == [("all_gather", 7)], (step, guard.get(step))
    for source in ("InMemoryRollback", "SpectralMonitor", "SoftmaxSaturationMonitor", "FP8Precision", "StabilityPanels"):
        calls = _per_step(records, source)
        sampled = set(ours["sampled"][source])
        assert {s for s in calls if s not in incident} <= sampled, (source, sorted(calls))
    # the counter sees what they do on their sampled steps: one all-gather each
    for source in ("SoftmaxSaturationMonitor", "FP8Precision"):
        calls = _per_step(records, source)
        assert [len(calls.get(s, [])) for s in ours["sampled"][source]] == [1, 1, 1]
        assert all(name == "all_gather" for s in ours["sampled"][source] for name, _ in calls[s])

    # the event log: every record the same on both ranks, numbers included
    events = [_decided(e) for e in ours["events"]]
    assert events == [_decided(e) for e in ranks[1]["ours"]["events"]]
    decisions = [(e["step"], e["kind"], e["action"]) for e in events if e["severity"] != "info"]
    assert decisions == [(70, "nonfinite", "skip"), (71, "rollback", "rollback"), (85, "grad_spike", "skip")]
    # each detection's per-sample losses, gathered from both ranks: the NaN loss of rank 1's batch first
    follows = {e["step"]: e for e in events if e["kind"] == "sample_losses"}
    assert sorted(follows) == [70, 85] and all(e["metrics"]["samples"] == 16 for e in follows.values())
    assert follows[70]["metrics"]["nonfinite"] == 8 and follows[85]["metrics"]["nonfinite"] == 0
    spike = next(e for e in events if e["kind"] == "grad_spike")
    assert spike["metrics"]["grad_norm"] > 100 * spike["metrics"]["grad_baseline"] > 0
    assert ours["digest"] == ranks[1]["ours"]["digest"]

    # files: rank 0 writes the logger's, the event stream and the quarantine; rank 1 writes nothing
    log_dir = os.path.relpath(ours["log_dir"], tmp_path)
    assert ranks[1]["ours"]["written"] == []
    written = set(ours["written"])
    assert {f"{log_dir}/stability_events.jsonl", f"{log_dir}/quarantine.json.tmp"} <= written
    [tfevents] = [f for f in os.listdir(tmp_path / log_dir) if f.startswith("events.out.tfevents")]
    assert f"{log_dir}/{tfevents}" in written and f".{ranks[0]['pid']}." in tfevents
    lines = (tmp_path / log_dir / "stability_events.jsonl").read_text().splitlines()
    assert [_decided(json.loads(line)) for line in lines] == events  # each event once
    quarantine = json.loads((tmp_path / log_dir / "quarantine.json").read_text())
    assert [r["step"] for r in quarantine["rollbacks"]] == [71]
    assert sorted({b["rank"] for b in quarantine["rollbacks"][0]["batches"]}) == [0, 1]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    norms = acc.Scalars("stability/grad/norm")
    # the logger's steps and the guard's detection steps (logged at their step; a NaN norm is left
    # out), each written once
    detected = {e["step"] for e in events if e["source"] == "GradientSpikeGuard" and e["severity"] != "info"
                and math.isfinite(float(e["metrics"]["grad_norm"]))}
    assert detected and [s.step for s in norms] == sorted({49, 99} | detected)
    assert "stability/timeline/text_summary" in acc.Tags()["tensors"]


# -- checkpoint and resume ---------------------------------------------------------------------------
LOOP_COUNTERS = ("epoch", "batch_idx")  # Lightning's own counters: a resumed loop numbers its batches anew


def test_a_fit_resumed_from_a_checkpoint_decides_as_the_whole_fit(tmp_path):
    whole = run_two_ranks("ddp_resume_script.py", tmp_path, "full")  # also saves the checkpoint at step 30
    for r in (0, 1):
        os.rename(tmp_path / f"rank{r}.json", tmp_path / f"full-rank{r}.json")
    resumed = run_two_ranks("ddp_resume_script.py", tmp_path, "resume")

    def decided(event: dict) -> dict:
        event = _decided(event)
        return {**event, "metrics": {k: v for k, v in event["metrics"].items() if k not in LOOP_COUNTERS}}

    logs = [[decided(e) for e in run[r]["events"]] for run in (whole, resumed) for r in (0, 1)]
    assert logs[0] == logs[1] == logs[2] == logs[3]
    decisions = [(e["step"], e["kind"], e["action"]) for e in logs[0] if e["step"] > 30 and e["severity"] != "info"]
    # after the checkpoint: the z-loss and soft-cap of the drift on rank 1 stay on (and escalate), the
    # snapshot of step 30 is taken on time (advice alone does not postpone it), a NaN on rank 1 rolls
    # back to the snapshot of step 40, a gradient corrupted on rank 1 is skipped
    assert (32, "logit_drift", "advise") in decisions
    assert [(e["step"], e["kind"]) for e in logs[0] if e["kind"].startswith("snapshot") and 30 <= e["step"] <= 32] == [
        (30, "snapshot")]
    assert [d for d in decisions if d[1] != "logit_drift"] == [
        (46, "nonfinite", "skip"), (47, "rollback", "rollback"), (52, "grad_spike", "skip")]
    assert whole[0]["rollbacks"] == resumed[0]["rollbacks"] == [[16, 10], [47, 40]]
    digests = {run[r]["digest"] for run in (whole, resumed) for r in (0, 1)}
    assert len(digests) == 1 and resumed[0]["finite"]
    for key in ("guard", "softmax", "sigma"):
        assert whole[0][key] == resumed[0][key] == resumed[1][key], key


# -- halts and exceptions on one rank ----------------------------------------------------------------
def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


def _exited(tmp_path) -> bool:
    pids = [int((tmp_path / f"pid{r}").read_text()) for r in (0, 1)]
    deadline = time.monotonic() + 10
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return all(_gone(p) for p in pids)


@pytest.fixture(scope="module")
def halt_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_halt")
    return out, run_two_ranks_each("ddp_halt_script.py", out, ("nan_weight", "halt_stop"))


def test_a_nan_weight_on_one_rank_is_rolled_back_on_every_rank(halt_runs):
    ranks = halt_runs[1]["nan_weight"]
    # the spectral check of step 15 sees rank 1's NaN weight; the ranks agree on their statistics, so
    # both ask for the rollback and restore the same snapshot in the same step (a request on rank 1
    # alone would leave rank 0 out of the rollback's collectives)
    assert ranks[0]["events"] == ranks[1]["events"]
    assert [e for e in ranks[0]["events"] if e[3] == "rollback"] == [
        [15, "nonfinite_weight", "SpectralMonitor", "rollback"], [15, "rollback", "InMemoryRollback", "rollback"]]
    assert ranks[0]["digest"] == ranks[1]["digest"] and ranks[0]["finite"] and ranks[0]["global_step"] == 40


def test_a_halt_decided_on_one_ranks_data_stops_every_rank_in_the_same_step(halt_runs):
    ranks, tmp_path = halt_runs[1]["halt_stop"], halt_runs[0] / "halt_stop"
    # a NaN weight on rank 1 only: the guard climbs its ladder on both ranks alike and halts both in
    # step 21; the spectral monitor sees the NaN weight (on rank 1's copy) on both ranks too
    assert ranks[0]["events"] == ranks[1]["events"]
    assert ranks[0]["report"] == ranks[1]["report"] and "halted training at optimizer step 21" in ranks[0]["report"]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 22
    assert [e[:2] for e in ranks[0]["events"] if e[3] == "halt"] == [[21, "nonfinite"], [22, "halt"]]
    assert {e[0] for e in ranks[0]["events"] if e[1] == "nonfinite_weight"} == {15, 20}
    assert (tmp_path / "checkpoints" / "stability-halt-step=22.ckpt").exists()


@pytest.mark.parametrize(
    ("mode", "messages"),
    [
        ("halt_raise", {r: "TrainingHalted: GradientSpikeGuard halted training at optimizer step 21" for r in (0, 1)}),
        ("user_error_rank1", {1: "ValueError: user check failed on rank 1 at step 15"}),
        ("user_error_rank0", {0: "ValueError: user check failed on rank 0 at step 15"}),
        ("hook_error_rank1", {1: "RuntimeError: sample ids unreadable on rank 1 at step 15"}),
    ],
)
def test_an_exception_on_one_rank_ends_every_rank(tmp_path, mode, messages):
    start = time.monotonic()
    proc = launch_two_ranks("ddp_halt_script.py", str(tmp_path), mode, timeout=180)
    assert proc.returncode != 0
    assert "Timeout (" not in proc.stderr, proc.stderr[-3000:]  # the script's deadlock watchdog did not fire
    for rank, message in messages.items():
        assert f"[rank{rank}]: " in proc.stderr and message in proc.stderr, proc.stderr[-3000:]
    if mode == "halt_raise":  # the same message on both ranks
        lines = {line.split(": ", 1)[1] for line in proc.stderr.splitlines() if "TrainingHalted: " in line}
        assert len(lines) == 1
    assert _exited(tmp_path) and time.monotonic() - start < 90
    assert not (tmp_path / "rank0.json").exists() and not (tmp_path / "rank1.json").exists()
