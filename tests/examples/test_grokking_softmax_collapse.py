from __future__ import annotations

import importlib.util
import math
import os


def _load():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "grokking_softmax_collapse.py")
    spec = importlib.util.spec_from_file_location("grokking_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grokking_example_runs_and_the_perpendicular_gradient_is_on(tmp_path):
    grokking = _load()
    plain = grokking.run("cross-entropy", 40, 0, str(tmp_path))
    perp = grokking.run("perp_grad", 40, 0, str(tmp_path))
    # the same seed and data: the runs differ only by the remedy, and it changed the training
    assert plain["history"][0] == perp["history"][0]
    assert plain["history"][-1] != perp["history"][-1]
    assert plain["history"][-1][1] < 0.8 * plain["history"][0][1]  # learning
    assert plain["sc_frac"] == 0.0 and math.isfinite(plain["headroom"]) and plain["headroom"] > 0
