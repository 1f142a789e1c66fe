"""Behaviour preserved: the demo, the efficacy fault runs and the reproduced instabilities emit the
recorded events (step, kind, source, action, target), in order.

A difference is either a regression or an intended change of behaviour; for the latter, record
again (``python -m tests.golden.scenarios``) and name each changed row and its reason in the commit.
"""

from __future__ import annotations

import difflib
import json

import pytest

from tests.golden import scenarios


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(scenarios.SCENARIOS))
def test_events_match_the_recorded_log(name: str) -> None:
    expected = scenarios.load(name)
    got = json.loads(json.dumps(scenarios.SCENARIOS[name]()))
    if got != expected:
        diff = difflib.unified_diff([json.dumps(r) for r in expected], [json.dumps(r) for r in got],
                                    "recorded", "now", lineterm="", n=1)
        pytest.fail(f"{name}: the events differ from the recorded log:\n" + "\n".join(list(diff)[:60]))
    assert expected, f"{name}: the recorded log is empty"  # a scenario that emits nothing proves nothing
