"""Every callback and plugin under FSDP2 (Lightning's ModelParallelStrategy, fully_shard) on 2 CPU gloo
ranks, and the clear refusals where a strategy cannot be served. Lightning's FSDPStrategy (FSDP1) needs
CUDA: its tests are marked gpu."""

from __future__ import annotations

import json
import types

import pytest
import torch
import torch.distributed

from tests.callbacks import _two_ranks as two_ranks

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def run_two_ranks(script: str, tmp_path, *args: str, report: bool = True) -> list[dict]:
    """Run one of the FSDP scripts beside this file on 2 ranks; each rank's JSON report when ``report``."""
    return two_ranks.run_two_ranks(script, tmp_path, *args, report=report, timeout=300)


@pytest.fixture(scope="module")
def guard_runs(tmp_path_factory):
    """The guard alone and with a rollback, in one launch (the processes' start-up is most of a run)."""
    return two_ranks.run_two_ranks_each("fsdp_guard_script.py", tmp_path_factory.mktemp("fsdp_guard"),
                                        ("guard", "with_rollback"), timeout=420)


def test_guard_norm_over_shards_one_all_reduce_and_the_same_decisions(guard_runs):
    ranks = guard_runs["guard"]
    r0, r1 = ranks
    assert r0["local_shapes"]["blocks.0.attn.qkv.weight"] == [50, 33]  # really sharded, unevenly
    assert r1["local_shapes"]["blocks.0.attn.qkv.weight"] == [49, 33]
    for r in ranks:
        # the guard's norm from local shards is the norm of the whole gradient (gathered here)
        checked = [(a, b) for _, a, b in r["norms"] if b == b and b < 1e30]
        assert len(checked) >= 55
        torch.testing.assert_close(torch.tensor([a for a, _ in checked]), torch.tensor([b for _, b in checked]),
                                   rtol=1e-5, atol=0)
        # exactly one all-reduce (and nothing else) per step; a detection adds one (its layers' norms made
        # whole), and the step with spiking elements the exact count and the clip's norm
        quiet = [c for s, c in enumerate(r["collectives"]) if s not in (40, 50)]
        assert quiet and all(c == {"all_reduce": 1} for c in quiet)
        assert r["collectives"][40] == {"all_reduce": 2}
        assert set(r["collectives"][50]) == {"all_reduce"} and r["collectives"][50]["all_reduce"] <= 4
    # a NaN loss on rank 1 only and rank 1's rows of the gradient scaled by 1000: both ranks decide alike
    assert r0["events"] == r1["events"]
    detections = [tuple(e) for e in r0["events"] if e[1] != "armed"]
    assert detections == [(40, "nonfinite", "skip"), (50, "grad_spike", "clip")]
    # the clip rescaled the whole gradient to the spike threshold: every rank by the same factor
    assert r0["after_clip"] == pytest.approx(r0["threshold_at_clip"], rel=1e-4)
    assert r1["after_clip"] == r0["after_clip"]
    assert r0["finite"] and r1["finite"]


def test_the_rollbacks_flags_ride_in_the_guards_all_reduce_over_shards(guard_runs):
    r0, r1 = guard_runs["with_rollback"]
    # the rollback comes first in the list; the guard's one all-reduce a step, later in the same hook,
    # carries its flags: rank 1's NaN loss rolls both ranks back in the same step to the same snapshot
    assert r0["rollbacks"] == r1["rollbacks"] == [[41, 30]]
    assert r0["events"] == r1["events"]
    for r in (r0, r1):
        assert all(c == {"all_reduce": 1} for s, c in enumerate(r["collectives"]) if s not in (40, 50))
        assert r["collectives"][40] == {"all_reduce": 2}  # the NaN's detection: its layers' norms made whole
        assert r["agreements"] and all(s % 10 == 0 for s in r["agreements"])  # only the snapshots' memory checks
        assert r["finite"]


def test_spectral_rollback_and_softmax_on_shards(tmp_path):
    r0, r1 = run_two_ranks("fsdp_monitors_script.py", tmp_path)
    for r in (r0, r1):
        # sigma_max from row shards and reductions equals the gathered weight's, and the stable rank
        for name, (sigma, rank) in r["estimates"].items():
            exact_sigma, exact_rank = r["exact"][name]
            assert sigma == pytest.approx(exact_sigma, rel=1e-3), name
            assert rank == pytest.approx(exact_rank, rel=2e-3), name
        assert all(v is not None for v in r["full"].values())  # every layer had its full spectrum
        groups = 6  # (13,33) twice, (8,33), (50,33), (17,33), (66,33), (17,132) row shards
        for step, calls in r["calls"].items():
            step = int(step)
            assert set(calls) <= {"all_reduce"}, (step, calls)  # never an all-gather of its own
            if step >= 1 and (step + 1) % 5 and step not in (44, 45, 54):
                assert calls == {"all_reduce": 4 * groups}, (step, calls)  # per group: alignment, W^T u, |Wv|^2, update
        # full weights gathered only on full-spectrum steps (one layer each, 7 layers over 20 steps) and for the cap
        gathered = {int(s) for s, n in r["gathers"].items() if n}
        assert all(n <= 1 for n in r["gathers"].values())
        assert gathered == {s for s in range(60) if s % 20 in (0, 2, 5, 8, 11, 14, 17)} | {44}
    # the bump is capped on both ranks in the same check; the whole weight's top singular value came down
    assert r0["events"] == r1["events"]
    assert [tuple(e) for e in r0["events"] if e[1] == "sigma_growth"] == [(45, "sigma_growth", "cap", "blocks.0.mlp.0")]
    cap = r0["cap"]
    assert cap["sigma_before"] > 5.0 and cap["sigma_after"] < cap["sigma_before"] / 2
    # after the cap the gathered weight's norm is the cap or the next singular value, not the bump
    assert cap["sigma_after"] - 1e-3 <= r0["capped"]["after"] < cap["sigma_before"] / 2
    assert r0["capped"] == r1["capped"]
    # a NaN loss on rank 1 only: both ranks roll back in the same step to the same snapshot, each
    # restoring its own shards exactly
    assert r0["rollbacks"] == r1["rollbacks"] == [[54, 50]]
    for r in (r0, r1):
        assert r["digests"]["54"] == r["digests"]["50"] != r["digests"]["51"]
    assert r0["digests"]["50"] != r1["digests"]["50"]  # each rank its own rows
    # the softmax monitor reads activations: the same statistics on both ranks
    assert r0["softmax"] == r1["softmax"] and r0["softmax"]["nlm_cos_max"] == r0["softmax"]["nlm_cos_max"]


def test_spectral_resumes_each_rank_with_its_own_rows_of_a_sharded_checkpoint(tmp_path):
    run_two_ranks("fsdp_resume_script.py", tmp_path, "full", report=False)
    run_two_ranks("fsdp_resume_script.py", tmp_path, "resume", report=False)
    full, resumed = ([json.loads((tmp_path / f"{mode}-rank{r}.json").read_text()) for r in (0, 1)]
                     for mode in ("full", "resume"))
    # the checkpoint (rank zero's callback state) holds every left vector whole, not rank zero's rows
    saved = full[0]["saved"]
    assert saved and all(s["u"] == s["rows"] for s in saved.values()), saved
    for r in (0, 1):
        before, after = full[r]["state"], resumed[r]["state"]
        assert before and before.keys() == after.keys()
        for name in before:
            assert after[name] == before[name], (r, name)  # every vector, this rank's rows, exactly
    # the ranks really hold different rows (uneven shards too)
    assert full[0]["state"]["blocks.0.attn.qkv"]["u"] != full[1]["state"]["blocks.0.attn.qkv"]["u"]


def test_qk_clip_scales_each_ranks_rows_as_the_unsharded_rule_would(tmp_path):
    from torch import nn

    from lightning_stability.ops.saturation import QKProjection, apply_qk_clip

    r0, r1 = run_two_ranks("fsdp_qk_clip_script.py", tmp_path)
    assert r0["events"] == r1["events"]
    # the limit is below the logits: a clip at the first sample, and on every step while the detection lasts
    steps = [c["step"] for c in r0["clips"]]
    assert steps[0] == 0 and len(steps) >= 3, steps
    assert r0["clips"] == r1["clips"]  # the same whole weights on both ranks
    for clip in r0["clips"]:
        assert max(clip["heads"]) > r0["tau"]
        # the rule applied to the whole weight, unsharded: q rows 0-32, k rows 33-65, 3 heads of 11
        qkv = nn.Linear(33, 99)
        with torch.no_grad():
            qkv.weight.copy_(torch.tensor(clip["before"]["weight"]))
            qkv.bias.copy_(torch.tensor(clip["before"]["bias"]))
        proj = QKProjection(qkv, qkv, slice(0, 33), slice(33, 66), 3, 3, 11)
        apply_qk_clip(proj, torch.tensor(clip["heads"]), r0["tau"], r0["alpha"])
        torch.testing.assert_close(torch.tensor(clip["after"]["weight"]), qkv.weight.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(torch.tensor(clip["after"]["bias"]), qkv.bias.detach(), rtol=1e-6, atol=1e-7)
        assert clip["after"]["weight"] != clip["before"]["weight"]


def test_update_clipping_on_row_shards_clips_the_whole_update(tmp_path):
    from lightning_stability.ops.spectral import soft_spectral_clip

    r0, r1 = run_two_ranks("fsdp_update_clip_script.py", tmp_path)
    assert [r0["shards"][n][0] for n in r0["shards"]] == [66, 50, 17]  # tall, uneven, wide: really sharded
    assert r0["records"] == r1["records"] and len(r0["records"]) == 4
    for record in r0["records"]:
        lr = record["lr"]
        if lr <= 0:
            continue
        for before, raw, after in zip(record["before"], record["raw"], record["after"]):
            before, raw, after = (torch.tensor(t, dtype=torch.float64) for t in (before, raw, after))
            update = (raw - before) / lr
            expected = before + lr * soft_spectral_clip(update, r0["c"])
            torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-7)
            # the clip acted: the update's top singular value was above c and came down under it
            assert float(torch.linalg.matrix_norm(update, 2)) > r0["c"]
            assert float(torch.linalg.matrix_norm((after - before) / lr, 2)) < r0["c"]


def _model_parallel_trainer(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    return pl.Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2,
                      tensor_parallel_size=1), logger=False, default_root_dir=tmp_path)


def test_softmax_monitor_skips_qk_clip_under_fsdp1_only(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_stability import SoftmaxSaturationMonitor
    from tests.conftest import tiny_gpt

    model, _ = tiny_gpt(2)
    monitor = SoftmaxSaturationMonitor()
    with pytest.warns(UserWarning, match=r"qk_clip remedy is off under FSDPStrategy .*flattens"):
        monitor.setup(types.SimpleNamespace(strategy=FSDPStrategy(), loggers=[]), model, "fit")  # type: ignore[arg-type]
    assert monitor.remedies["attention_logit_growth"] == ("advise",)
    monitor.setup(_model_parallel_trainer(tmp_path), model, "fit")  # row shards: QK-clip stays on
    assert monitor.remedies["attention_logit_growth"] == ("qk_clip", "advise")


def test_low_bit_optimizer_refuses_model_parallel_by_name(tmp_path):
    pytest.importorskip("bitsandbytes")
    from lightning_stability import LowBitOptimizer

    trainer = _model_parallel_trainer(tmp_path)
    with pytest.raises(RuntimeError, match=r"LowBitOptimizer cannot serve ModelParallelStrategy: .*DTensor.*Use DDP"):
        LowBitOptimizer().on_fit_start(trainer, None)  # type: ignore[arg-type]


def test_fp8_precision_refuses_sharded_strategies(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_stability import FP8Precision

    trainer = _model_parallel_trainer(tmp_path)
    with pytest.raises(RuntimeError, match=r"FP8Precision\(backend='emulated'\) cannot serve ModelParallelStrategy.*bf16-mixed"):
        FP8Precision(backend="emulated")._start(trainer)

    class MyFSDP(FSDPStrategy):
        pass

    with pytest.raises(RuntimeError, match=r"FP8Precision\(backend='emulated'\) cannot serve FSDPStrategy"):
        FP8Precision(backend="emulated")._start(types.SimpleNamespace(strategy=MyFSDP()))  # type: ignore[arg-type]


def test_spectral_monitor_refuses_fsdp1_and_blocks_on_shards(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_stability import SpectralMonitor

    fsdp1 = types.SimpleNamespace(strategy=FSDPStrategy(), loggers=[])
    with pytest.raises(NotImplementedError, match=r"FSDPStrategy: FSDP1 flattens .* Use ModelParallelStrategy"):
        SpectralMonitor().setup(fsdp1, None, "fit")  # type: ignore[arg-type]
    trainer = _model_parallel_trainer(tmp_path)
    with pytest.raises(ValueError, match=r"SpectralMonitor\(block=2\): under ModelParallelStrategy .* expected block=1"):
        SpectralMonitor(block=2).setup(trainer, None, "fit")  # type: ignore[arg-type]


@pytest.mark.parametrize("torchao", ["faked", "real"])
def test_fp8_torchao_under_fsdp2_health_of_whole_weights_fallback_agreed_and_resumed(tmp_path, torchao):
    """torchao's conversion faked, or the real torchao (its float8 training on these CPUs): the model
    converted in configure_model before fully_shard (on the blocks, or on the converted layers too), a
    layer named on rank 1 alone, a sharded checkpoint."""
    if torchao == "real":
        pytest.importorskip("torchao.float8", reason="torchao is not installed")
    modes = ("blocks", "layers") if torchao == "faked" else (
        "real-blocks", "real-layers", "real-gather-blocks", "real-gather-layers")  # gather: float8_all_gather=True
    runs = two_ranks.run_two_ranks_each("fsdp_fp8_torchao_script.py", tmp_path, modes, timeout=420)
    target = "blocks.0.mlp.0"
    for mode, ranks in runs.items():
        r0, r1 = ranks
        for r in ranks:
            assert r["converted"] == ["blocks.0.attn.proj", target, "blocks.0.mlp.2"], mode  # first/last kept
            assert sorted(r["filtered"]) == r["converted"] and r["sharded"] and r["finite"]
            sampled = [s for s in r["steps"] if s["health"]]
            assert [s["step"] for s in sampled] == [0, 2, 4, 6]  # health_every_n_steps=2
            for s in sampled:
                # the weight's statistics are the whole weight's (a shard's SNR and scale differ), on every rank
                for key in ("amax", "scale", "snr_db", "underflow_frac"):
                    assert s["health"][key] == pytest.approx(s["whole"][key], rel=1e-5), (mode, s["step"], key)
            # named at step 4 on rank 1 alone: both ranks fall back at the next health check, and stay
            assert [s["fallback"] for s in r["steps"]] == [[]] * 6 + [[target]] * 3, mode
            calls = [s["fp8_calls"] for s in r["steps"]]
            assert calls[:7] == list(range(1, 8)) and calls[7:] == [7, 7]  # bf16 from step 7 on
            assert r["events"] == [[6, "fp8_fallback", target]]
            # resumed from the sharded checkpoint in fallback (cooldown 100): still in bf16, never in FP8
            assert r["resumed_fallback_at_start"] == [target]
            assert [s["step"] for s in r["resumed"]] == [8, 9, 10, 11]
            assert all(s["fallback"] == [target] and s["fp8_calls"] == 0 for s in r["resumed"])
        assert r0["steps"] == r1["steps"], mode
    if torchao == "real":
        for shard in ("blocks", "layers"):
            plain, gathered = runs[f"real-{shard}"], runs[f"real-gather-{shard}"]
            # FSDP2 gathered the converted weights in float8, their scales computed as the forward began
            assert gathered[0]["gathered_as"] == ["Float8TrainingTensor"] != plain[0]["gathered_as"]
            assert all(gathered[0]["precomputed"]) and not any(plain[0]["precomputed"])
            # the same casts as a float8 cast after a high-precision gather: the same run, bit for bit, up to
            # the fallback (from step 7 the fallen-back layer's bf16 GEMM takes the dequantised float8 weight,
            # the high-precision one without the float8 all-gather): close after it
            assert gathered[0]["steps"][:8] == plain[0]["steps"][:8]
            assert gathered[0]["weights"] == pytest.approx(plain[0]["weights"], rel=1e-3)
