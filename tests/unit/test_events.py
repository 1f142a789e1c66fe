from __future__ import annotations

import json
import math
import pickle

import pytest

from lightning_stability.events import EventLog, StabilityEvent, get_event_log, read_events


def _ev(step=1, kind="grad_spike", severity="warning", **metrics):
    return StabilityEvent(step=step, kind=kind, source="test", severity=severity, metrics=metrics, action="clip")


def test_event_is_frozen_and_metrics_are_floats():
    e = _ev(grad_norm=3)
    assert e.metrics == {"grad_norm": 3.0} and isinstance(e.metrics["grad_norm"], float)
    with pytest.raises(AttributeError):
        e.step = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        e.metrics["x"] = 1.0  # type: ignore[index]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"severity": "fatal"}, "severity"), ({"step": -1}, "step"), ({"kind": ""}, "kind")],
)
def test_event_validation(kwargs, match):
    base = {"step": 0, "kind": "k", "source": "s", "severity": "info"}
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        StabilityEvent(**base)


def test_round_trip_with_nonfinite_metrics():
    e = _ev(grad_norm=float("nan"), z=float("inf"))
    data = json.loads(json.dumps(e.to_dict()))
    back = StabilityEvent.from_dict(data)
    assert math.isnan(back.metrics["grad_norm"]) and back.metrics["z"] == math.inf
    assert (back.step, back.kind, back.action) == (1, "grad_spike", "clip")


def test_bounded_memory_but_counts_everything():
    log = EventLog(max_events=3)
    for i in range(5):
        log.append(_ev(step=i, kind="a" if i % 2 else "b"))
    assert [e.step for e in log] == [2, 3, 4]
    assert log.counts() == {"b": 3, "a": 2}
    assert log.dropped == 2
    assert [e.step for e in log.filter(kind="a")] == [3]


def test_filter_and_listeners():
    log = EventLog()
    seen = []
    unsubscribe = log.subscribe(seen.append)
    log.emit(1, "nonfinite", "g", "critical", {"x": 1.0}, "skip")
    log.emit(2, "armed", "g", "info")
    unsubscribe()
    log.emit(3, "armed", "g", "info")
    assert [e.step for e in seen] == [1, 2]
    assert [e.step for e in log.filter(severity="critical")] == [1]
    assert [e.step for e in log.filter(kind="armed", source="g")] == [2, 3]


def test_state_dict_round_trip_is_picklable():
    log = EventLog()
    log.append(_ev(step=4, grad_norm=1.5))
    state = pickle.loads(pickle.dumps(log.state_dict()))
    other = EventLog()
    other.load_state_dict(state)
    assert list(other) == list(log)
    assert other.counts() == {"grad_spike": 1}


def test_stream_to_jsonl(tmp_path):
    log = EventLog()
    path = log.stream_to(tmp_path / "run")
    log.append(_ev(step=7, grad_norm=float("inf")))
    log.close_stream()
    log.append(_ev(step=8))  # not streamed after close
    events = read_events(tmp_path / "run")
    assert len(events) == 1 and events[0].step == 7 and events[0].metrics["grad_norm"] == math.inf
    assert path.endswith("stability_events.jsonl")


def test_get_event_log_is_one_per_trainer():
    class T:
        pass

    a, b = T(), T()
    assert get_event_log(a) is get_event_log(a)
    assert get_event_log(a) is not get_event_log(b)


def test_responders():
    log = EventLog()
    assert not log.has_responder("rollback")
    log.register_responder("rollback", "InMemoryRollback")
    assert log.has_responder("rollback")
    log.unregister_responder("rollback")
    assert not log.has_responder("rollback")


def test_bad_max_events():
    with pytest.raises(ValueError, match="max_events"):
        EventLog(max_events=0)


def test_details_round_trip_through_json_the_state_and_the_stream(tmp_path):
    details = {"layers": [{"name": "h.0.mlp.weight", "grad_norm": 3.0, "ratio": float("nan")}], "sample_ids": [4, 5]}
    event = StabilityEvent(3, "grad_spike", "GradientSpikeGuard", "warning", {"grad_norm": 3.0}, "clip", None, details)
    line = json.dumps(event.to_dict(), allow_nan=False)  # valid JSON: the NaN is a string there
    again = StabilityEvent.from_dict(json.loads(line))
    assert again.details["sample_ids"] == [4, 5] and math.isnan(again.details["layers"][0]["ratio"])
    assert "details" not in _ev(step=1).to_dict()  # events without details stay as they were
    log = EventLog()
    log.stream_to(tmp_path / "run")
    log.append(event)
    log.close_stream()
    (read,) = read_events(tmp_path / "run")
    assert read.details["layers"][0]["name"] == "h.0.mlp.weight"
    other = EventLog()
    other.load_state_dict(pickle.loads(pickle.dumps(log.state_dict())))
    assert list(other)[0].details["sample_ids"] == [4, 5]
