from __future__ import annotations

import math

from tests.examples import load_example


def test_grokking_example_runs_and_the_perpendicular_gradient_is_on(tmp_path):
    grokking = load_example("grokking_softmax_collapse")
    plain = grokking.run("cross-entropy", 40, 0, str(tmp_path))
    perp = grokking.run("perp_grad", 40, 0, str(tmp_path))
    # the same seed and data: the runs differ only by the remedy, and it changed the training
    assert plain["history"][0] == perp["history"][0]
    assert plain["history"][-1] != perp["history"][-1]
    assert plain["history"][-1][1] < 0.8 * plain["history"][0][1]  # learning
    assert plain["sc_frac"] == 0.0 and math.isfinite(plain["headroom"]) and plain["headroom"] > 0
