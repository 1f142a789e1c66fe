"""The benchmark suite's bookkeeping: the pieces that turn runs into the figures on the benchmarks page.

The runs themselves are exercised by ``python -m benchmarks --quick`` in CI; these tests check, on
made-up results, that the summaries say what the results say.
"""

from __future__ import annotations

import math

import pytest

from benchmarks import floor, instabilities, scaling
from benchmarks.__main__ import _QUICK_PREFIX, record_quick_time, render_run_time
from benchmarks.overhead import Summary
from benchmarks.spectral import EfficacyRun


def _summary(size: str, setup: str, step_ms: float, hook_ms: float, base_ms: float) -> Summary:
    ratio = step_ms / base_ms
    return Summary(size, setup, step_ms, ratio, ratio, ratio, hook_ms, hook_ms / base_ms, None, 0)


def test_scaling_goal_lines_judge_all_four_by_their_share_of_a_baseline_step():
    summaries = [
        _summary("small", "no callbacks", 10.0, 0.0, 10.0),
        _summary("small", "GradientSpikeGuard", 10.3, 0.3, 10.0),
        _summary("small", "all four", 11.5, 1.5, 10.0),
        _summary("large", "no callbacks", 100.0, 0.0, 100.0),
        _summary("large", "GradientSpikeGuard", 100.5, 0.5, 100.0),
        _summary("large", "all four", 104.0, 4.0, 100.0),
    ]
    small, large = scaling.goal_lines(summaries)
    assert small.startswith("small: all four take 1.150x") and "15.0% of a baseline step" in small
    assert "GradientSpikeGuard 3.0%" in small and small.endswith("NOT met.")
    assert large.startswith("large: all four take 1.040x") and "4.0%" in large and large.endswith(": met.")
    sizes = (scaling.ModelSize("small", 8, 1), scaling.ModelSize("large", 16, 2))
    growth = scaling.growth_line(summaries, sizes)
    assert "a baseline step grows 10.0x" in growth and "hooks 2.7x (1.50 to 4.00 ms" in growth


def test_the_three_monitors_and_the_many_tokens_goals_read_their_own_rows():
    summaries = [
        _summary("d128-L4", "no callbacks", 50.0, 0.0, 50.0),
        _summary("d128-L4", "three monitors", 56.0, 6.0, 50.0),
        _summary("d128-L4", "all four", 57.0, 7.0, 50.0),
    ]
    every, three = scaling.goal_lines(summaries)
    assert "three monitors" not in every  # a combined row is not listed as a monitor alone
    assert three.startswith("d128-L4: the three monitors (no rollback) take 1.120x") and three.endswith("NOT met.")
    (line,) = scaling.large_lines([_summary("d64-L2", "no callbacks", 800.0, 0.0, 800.0),
                                   _summary("d64-L2", "all four", 808.0, 8.0, 800.0)], 16384)
    assert line.startswith("d64-L2 at 16,384 tokens a step: all four take 1.010x") and line.endswith(": met.")


def test_floor_goal_lines_compare_a_quiet_step_with_its_floor():
    rows = [floor.Row("d256-L6", "GradientSpikeGuard", 3.0, 3.1, 1.6, 1.875, 108, 77),
            floor.Row("d256-L6", "SpectralMonitor", 8.5, 9.4, 1.5, 5.67, 100, 27)]
    guard, spectral = floor.goal_lines(rows)
    assert guard == ("d256-L6, GradientSpikeGuard: a quiet step's hooks take 1.88x the floor (3.000 ms against "
                     "1.600 ms); goal <= 2x: met.")
    assert spectral.endswith("goal <= 2x: NOT met.") and "5.67x" in spectral


def test_a_section_run_draws_its_figure_beside_the_page_it_rewrites(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from benchmarks.__main__ import run_section

    monkeypatch.chdir(tmp_path)
    sizes = (scaling.ModelSize("small", 8, 1), scaling.ModelSize("large", 16, 2))
    settings = scaling.Settings(sizes=sizes, warmup_steps=1, timed_steps=1, repeats=1)
    summaries = [_summary(size.name, setup.name, base * (1 + 0.01 * i), base * 0.01 * i, base)
                 for size, base in zip(sizes, (10.0, 100.0)) for i, setup in enumerate(scaling.SETUPS)]
    result = scaling.Result(summaries, {"small": 1000, "large": 8000})
    page = tmp_path / "site" / "benchmarks.md"
    page.parent.mkdir()
    page.write_text(f"# Benchmarks\n\n{scaling.SECTION}\n\nold figures\n\n## Next\n\nkept\n")
    assert run_section(["--out", str(page)], "prog", "desc", scaling.SECTION, settings, settings,
                       lambda s, progress: result, scaling.render_section, scaling.figure) == 0
    text = page.read_text()
    assert (page.parent / scaling.IMAGE).stat().st_size > 0  # beside the page, not under ./docs
    assert not (tmp_path / "docs").exists()
    assert f"]({scaling.IMAGE})" in text and "old figures" not in text and text.endswith("## Next\n\nkept\n")


def test_the_final_loss_leaves_out_the_poisoned_batches_but_not_a_diverged_model():
    from benchmarks.efficacy import final_loss

    losses = [2.0] * 10 + [math.nan] + [1.0] * 4  # a NaN loss from the injected batch at step 10
    assert final_loss(losses, {10}, last=5) == pytest.approx(1.0 * 4 / 5 + 2.0 / 5)
    assert final_loss(losses, set(), last=5) == math.inf  # the same NaN, not injected: the run diverged
    assert final_loss(losses[:11] + [math.nan], {10}, last=5) == math.inf  # NaN after the fault: diverged
    assert math.isnan(final_loss([], set()))


def test_the_quick_run_time_replaces_only_its_own_line(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nintro\n" + render_run_time(30.0, {"a": 600.0, "b": 1200.0}, None))
    text = page.read_text()
    assert "| a | 10.0 |" in text and "| b | 20.0 |" in text and "not recorded yet" in text
    record_quick_time(str(page), 2.25, "machine X.")
    record_quick_time(str(page), 3.5, "machine Y.")
    text = page.read_text()
    lines = [line for line in text.splitlines() if line.startswith(_QUICK_PREFIX)]
    assert lines == [f"{_QUICK_PREFIX}: 3.5 minutes (the CI smoke test, its goal under 5). machine Y."]
    assert text.startswith("# Benchmarks\n\nintro\n") and "| b | 20.0 |" in text
    # a full run keeps the recorded quick line
    again = render_run_time(31.0, {"a": 60.0}, lines[0])
    assert lines[0] in again and "not recorded" not in again


def _grok(name: str, seed: int, test_acc: float, first_low: int | None) -> dict:
    return {"name": name, "seed": seed, "train_acc": 1.0, "test_acc": test_acc, "best_test_acc": test_acc,
            "first_low": first_low}


def _attn(arm: str, seed: int, flag: int | None, behind: int | None, vs: float) -> dict:
    return {"arm": arm, "seed": seed, "first_flag": flag, "behind": behind, "final": vs, "vs_reference": vs}


def _blowup(arm: str, seed: int, diverges: bool) -> EfficacyRun:
    losses = [2.0] * 50 + ([5.0] * 50 if diverges else [1.0] * 50)
    return EfficacyRun(arm, seed, 0.3, tuple(losses), 0, 0, 10 if arm in ("cap", "pss") else None, 1.0)


def test_instability_findings_are_read_off_the_runs():
    res = instabilities.Results(
        grokking=[_grok("cross-entropy", s, 0.01, 1300 + s) for s in (0, 1)]
        + [_grok("perp_grad", 0, 1.0, None), _grok("perp_grad", 1, 0.5, None)]
        + [_grok("stablemax", s, 0.02, None) for s in (0, 1)],
        attention=[_attn("reference", s, None, None, 1.0) for s in (0, 1)]
        + [_attn("no remedy", 0, 21, 33, 6.0), _attn("no remedy", 1, 40, 35, 7.0)]
        + [_attn("qk_clip", s, 21, None, 1.2 + s / 10) for s in (0, 1)]
        + [_attn("attn_softcap", s, 21, 60, 4.0) for s in (0, 1)],
        blowup=[_blowup("no callbacks", s, True) for s in (0, 1)] + [_blowup("cap", 0, False), _blowup("cap", 1, True)]
        + [_blowup("pss", s, True) for s in (0, 1)] + [_blowup("update_clip", s, False) for s in (0, 1)],
        fp8=[{"seed": s, "format": "e2m1", "watch": 1.9, "fallback": 1.03 + s / 100, "flagged_at": 2, "behind": 90,
              "fallbacks": 3} for s in (0, 1)]
        + [{"seed": s, "format": "e2m0", "watch": 2.0, "fallback": 1.02, "flagged_at": None, "behind": 30,
            "fallbacks": 0} for s in (0, 1)],
    )
    grok, attn, blow, e2m1, e2m0 = instabilities.findings(res)
    assert "generalised (test accuracy >= 0.9) in 0 of 2" in grok and "flagged the collapsing headroom in 2 of 2" in grok
    assert "perpendicular gradient 1 of 2" in grok and "StableMax 0 of 2" in grok
    assert "fell behind the healthy run's in 2 of 2 seeds, flagged before it in 1" in attn
    assert "6.50x unremedied, 1.25x with QK-clip, 4.00x with the soft-cap" in attn
    assert "2 of 2 unguarded runs diverged" in blow and "rescued 1 of 4" in blow and "rescued 2 of 2" in blow
    assert "in 2 of 2 seeds, FP8 health flagged it first in 2" in e2m1 and "1.04x" in e2m1
    assert "flagged it first in 0" in e2m0
    table = instabilities.summary_table(res, instabilities.QUICK)
    assert "test accuracy 0.500 to 1.000" in table and "`collapse_headroom_low` at step 1300 to 1301" in table
    assert "`attention_logit_growth` at step 21 to 40, -5 to 12 steps" in table


@pytest.mark.parametrize("values, expected", [([1.0, 1.0], "1.00x"), ([1.0, 2.5], "1.00 to 2.50x"),
                                              ([1.0, float("nan")], "1.00x to NaN")])
def test_span(values, expected):
    assert instabilities._span(values, suffix="x") == expected


def _noisy(model: str, multiple: float, seed: int, arm: str, loss: float, halted: bool = False, actions=()):
    from benchmarks import noisy

    return noisy.Fit(model, multiple, 1e-3 * multiple, seed, arm, loss, 300, halted, loss, tuple(actions))


def test_noisy_ratios_are_judged_per_seed_and_a_halt_only_where_the_unguarded_run_ended_finite():
    from benchmarks import noisy

    none, ours, _ = noisy.ARMS
    assert noisy.seed_ratio(2.0, 2.04) == pytest.approx(1.02)
    assert noisy.seed_ratio(2.0, math.nan) == math.inf and noisy.seed_ratio(math.nan, 1.0) is None
    fits = [
        # 1x: one seed 0.90x, the other 1.05x: the mean (0.975x) is within the goal, the worst seed is not
        _noisy("TinyGPT", 1, 0, none, 2.0), _noisy("TinyGPT", 1, 0, ours, 1.8),
        _noisy("TinyGPT", 1, 1, none, 2.0), _noisy("TinyGPT", 1, 1, ours, 2.1),
        _noisy("TinyGPT", 1, 0, noisy.ARMS[2], 2.06),  # the nudged control of seed 0 only: 1.03x
        # 10x: exactly 1.02x is not worse than 1.02x; the unguarded seed 1 ended NaN, the monitors halted it
        _noisy("TinyGPT", 10, 0, none, 2.5), _noisy("TinyGPT", 10, 0, ours, 2.55),
        _noisy("TinyGPT", 10, 1, none, math.nan), _noisy("TinyGPT", 10, 1, ours, 3.0, halted=True),
        # 100x: a halt (at a better loss) where the unguarded run ended finite, and a NaN the unguarded run avoided
        _noisy("GPT-2 (HF)", 100, 0, none, 3.0), _noisy("GPT-2 (HF)", 100, 0, ours, 2.9, halted=True),
        _noisy("GPT-2 (HF)", 100, 1, none, 3.0), _noisy("GPT-2 (HF)", 100, 1, ours, math.nan),
    ]
    one, ten, hundred = noisy.rows(fits[::-1])  # in the models' and multiples' order whatever the fits' order
    assert (one.multiple, ten.multiple, hundred.model) == (1, 10, "GPT-2 (HF)")
    assert one.ratio_mean == pytest.approx(0.975) and one.ratio_worst == pytest.approx(1.05)
    assert one.worse and not one.met
    assert one.nudged[0] == pytest.approx(1.03) and one.nudged[1] is None and one.nudged_worst == pytest.approx(1.03)
    assert ten.ratios[1] is None and ten.ratio_worst == pytest.approx(1.02) and ten.met
    assert ten.needless_halts == 0 and ten.unguarded_finite == 1
    assert hundred.needless_halts == 1 and hundred.ratio_worst == math.inf and not hundred.met
    worse, halts = noisy.goal_lines([one, ten, hundred])
    assert worse.startswith("never worse than 1.02x no callbacks: NOT met (2 of 5 runs worse)")
    assert "worst ratio NaN (GPT-2 (HF) 100x, seed 1)" in worse
    assert "the nudged control (every gradient of one step times 1 + 1e-06, no callbacks) ends up to 1.030x " \
           "the unguarded run (TinyGPT 1x, seed 0)" in worse
    assert halts.startswith("never halted where the unguarded run finishes finite: NOT met; 1 such halts of 5 runs")
    assert "(2 halts in all)" in halts
    good_worse, good_halts = noisy.goal_lines([ten])
    assert good_worse.startswith("never worse than 1.02x no callbacks: met; worst ratio 1.020x (TinyGPT 10x, seed 0)")
    assert good_halts.startswith("never halted where the unguarded run finishes finite: met")
    table = noisy.table([one, ten, hundred])
    assert "| TinyGPT | 10x (0.01) | 2.500 (1 NaN) | 2.775 | 1.020x | 1.020x | - | 1/2 |" in table
    assert "| TinyGPT | 1x (0.001) | 2.000 | 1.950 | 0.975x | 1.050x | 1.030x |" in table
    diverged = noisy.diverged_lines([one, ten, hundred])
    assert diverged == ["TinyGPT 10x, seed 1: the unguarded run ended NaN; with the monitors: halted, evaluation "
                        "loss 3.000. no intervention"]


def test_noisy_events_are_grouped_and_routine_ones_left_out():
    from benchmarks import noisy
    from lightning_stability import StabilityEvent

    events = [
        StabilityEvent(step=32, kind="armed", source="GradientSpikeGuard", severity="info"),
        StabilityEvent(step=40, kind="element_spike", source="GradientSpikeGuard", severity="warning", action="clip"),
        StabilityEvent(step=51, kind="attention_logit_growth", source="SoftmaxSaturationMonitor", severity="warning",
                       action="qk_clip", target="blocks.0.attn"),
        StabilityEvent(step=51, kind="qk_clip", source="SoftmaxSaturationMonitor", severity="info", action="qk_clip"),
        StabilityEvent(step=52, kind="qk_clip", source="SoftmaxSaturationMonitor", severity="info", action="qk_clip"),
        StabilityEvent(step=90, kind="element_spike", source="GradientSpikeGuard", severity="warning", action="clip"),
        StabilityEvent(step=95, kind="advice", source="SoftmaxSaturationMonitor", severity="info", action="remedies=..."),
        StabilityEvent(step=99, kind="sigma_growth", source="SpectralMonitor", severity="warning"),
    ]
    actions = noisy.summarise_events(events)
    assert [a.describe() for a in actions] == [
        "GradientSpikeGuard element_spike -> clip x2 (steps 40-90)",
        "SoftmaxSaturationMonitor attention_logit_growth -> qk_clip x1 (step 51)",
        "SoftmaxSaturationMonitor qk_clip -> qk_clip x2 (steps 51-52)",
        "SpectralMonitor sigma_growth x1 (step 99)",
    ]
    fit = _noisy("TinyGPT", 1, 0, noisy.ARMS[1], 2.0, actions=actions)
    assert fit.interventions() == {"clip": 2, "qk_clip": 1, "qk_clip applied": 2, "sigma_growth": 1}


@pytest.mark.parametrize("cores, omp, expected", [(2, "1", (2, 1)), (2, None, (2, 1)), (4, "2", (2, 2)),
                                                  (2, "8", (1, 2)), (3, "2", (1, 2)), (2, "two", (2, 1))])
def test_noisy_pool_fits_omp_threads_into_the_cores(cores, omp, expected):
    from benchmarks import noisy

    assert noisy.pool_shape(cores, omp) == expected


@pytest.mark.parametrize("model", ["TinyGPT", "GPT-2 (HF)"])
def test_noisy_quick_fit_of_one_configuration_returns_a_full_record(model):
    pytest.importorskip("transformers")
    from benchmarks import noisy

    fit = noisy.fit(model, 100, 0, noisy.ARMS[1], noisy.QUICK)
    assert (fit.model, fit.multiple, fit.seed, fit.arm) == (model, 100, 0, noisy.ARMS[1])
    assert fit.lr == pytest.approx(100 * noisy.STABLE_LR[model])
    assert fit.steps == noisy.QUICK.steps and not fit.halted
    assert math.isfinite(fit.eval_loss) and 0 < fit.eval_loss < 10
    assert all(isinstance(a, noisy.Action) for a in fit.actions)
    (row,) = noisy.rows([fit, noisy.fit(model, 100, 0, noisy.ARMS[0], noisy.QUICK)])
    assert row.ratios[0] is not None and row.ratios[0] > 0
