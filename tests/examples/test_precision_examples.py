from __future__ import annotations

import pytest

from tests.examples import load_example


def test_fp8_sweep_runs_and_the_narrowest_format_is_flagged():
    sweep = load_example("fp8_precision_sweep")
    reference = sweep.run("reference", 12, fallback=False)
    fp8 = sweep.run("e4m3/e5m2", 12, fallback=False)
    narrow = sweep.run("e2m0", 12, fallback=False)
    assert reference["losses"][0] != fp8["losses"][0]  # the quantisation is in the forward
    assert fp8["first_warning"] is None  # FP8 itself stays healthy
    assert narrow["first_warning"] is not None and narrow["underflow"] > 0.5 and narrow["fallbacks"] == 0
    assert sweep.run("e2m0", 12, fallback=True)["fallbacks"] > 0


def test_low_bit_example_reports_smaller_state():
    pytest.importorskip("bitsandbytes")
    example = load_example("low_bit_optimizers")
    plain = example.run("AdamW", 6)
    small = example.run("AdamW8bit, all 8-bit", 6)
    assert plain["optimizer"] == "AdamW" and small["optimizer"] == "AdamW8bit"
    assert plain["bytes"] == pytest.approx(8.0, abs=0.01)  # two float32 moments (and a step counter)
    assert small["bytes"] < 0.4 * plain["bytes"]
    with pytest.raises(SystemExit, match="precision only"):
        example.run("AdamW", 2, precision="adamw8bit")
