"""The event log: the one channel through which monitors, interventions, panels and reports talk.

A monitor that detects something appends a :class:`StabilityEvent` to the trainer's :class:`EventLog`
(``get_event_log(trainer)``). Interventions, the rollback callback, the panels and the report read the
same log. The log is bounded in memory, saved with Lightning checkpoints and, on global rank zero,
streamed to ``<log_dir>/stability_events.jsonl`` (one JSON object per line).
"""

from __future__ import annotations

import json
import math
import os
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import IO, Any

SEVERITIES = ("info", "warning", "critical")
EVENTS_FILENAME = "stability_events.jsonl"


@dataclass(frozen=True)
class StabilityEvent:
    """One decision or observation of a stability component.

    Attributes:
        step: the optimizer step index at which it was decided (``trainer.global_step`` then).
        kind: what happened, e.g. ``"grad_spike"``, ``"nonfinite"``, ``"armed"``.
        source: the component that emitted it, e.g. ``"GradientSpikeGuard"``.
        severity: ``"info"`` for informational events (armed, recovered); every detection is
            ``"warning"`` or ``"critical"``.
        metrics: the numbers behind the decision (floats).
        action: what was done (``"clip"``, ``"skip"``, ...), or ``None``.
        target: the part of the model it concerns (a module's qualified name, e.g.
            ``"blocks.3.attn.qkv"``), or ``None`` for the whole model.
        details: what does not fit a float, JSON-friendly (lists, strings, numbers): the layers
            that carry a spike (``"layers"``), the batch's sample ids (``"sample_ids"``); empty for
            most events.
    """

    step: int
    kind: str
    source: str
    severity: str
    metrics: Mapping[str, float] = field(default_factory=dict)
    action: str | None = None
    target: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0:
            raise ValueError(f"StabilityEvent(step={self.step!r}): expected an int >= 0")
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"StabilityEvent(kind={self.kind!r}): expected a non-empty str")
        if self.severity not in SEVERITIES:
            raise ValueError(f"StabilityEvent(severity={self.severity!r}): expected one of {list(SEVERITIES)}")
        metrics = {str(k): float(v) for k, v in dict(self.metrics).items()}
        object.__setattr__(self, "metrics", MappingProxyType(metrics))
        object.__setattr__(self, "details", MappingProxyType(dict(self.details)))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict; non-finite metrics become the strings ``"nan"``, ``"inf"``, ``"-inf"``.
        ``details`` is there only when the event has some."""
        out = {
            "step": self.step,
            "kind": self.kind,
            "source": self.source,
            "severity": self.severity,
            "metrics": {k: _encode_float(v) for k, v in self.metrics.items()},
            "action": self.action,
            "target": self.target,
        }
        if self.details:
            out["details"] = _encode_details(dict(self.details))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StabilityEvent:
        return cls(
            step=int(data["step"]),
            kind=str(data["kind"]),
            source=str(data.get("source", "")),
            severity=str(data["severity"]),
            metrics={k: float(v) for k, v in dict(data.get("metrics", {})).items()},
            action=data.get("action"),
            target=data.get("target"),
            details=_decode_details(dict(data.get("details", {}))),
        )


def _encode_float(value: float) -> float | str:
    # JSON has no NaN/Inf; keep the file valid for any reader.
    return value if math.isfinite(value) else str(value)


def _decode_details(value: Any) -> Any:
    # the inverse of _encode_details: a non-finite float came back as its string
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): _decode_details(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_details(v) for v in value]
    return value


def _encode_details(value: Any) -> Any:
    if isinstance(value, float):
        return _encode_float(value)
    if isinstance(value, Mapping):
        return {str(k): _encode_details(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode_details(v) for v in value]
    return value


class EventLog:
    """A bounded, checkpointable log of :class:`StabilityEvent` s.

    The newest ``max_events`` events are kept in memory; counts by kind cover every event ever
    appended. Listeners (``subscribe``) see each event as it is appended. Components that can act on
    requests other components make through the log (for example a rollback) announce it with
    ``register_responder``.

    Example::

        log = EventLog()
        log.append(StabilityEvent(step=3, kind="grad_spike", source="me", severity="warning"))
        assert log.counts()["grad_spike"] == 1
    """

    def __init__(self, max_events: int = 10_000) -> None:
        if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 1:
            raise ValueError(f"EventLog(max_events={max_events!r}): expected an int >= 1")
        self.max_events = max_events
        self._events: deque[StabilityEvent] = deque(maxlen=max_events)
        self._counts: Counter[str] = Counter()
        self._dropped = 0
        self._listeners: list[Callable[[StabilityEvent], None]] = []
        self._responders: dict[str, str] = {}
        self._stream: IO[str] | None = None
        self._stream_path: str | None = None

    # -- recording -------------------------------------------------------------------------------
    def append(self, event: StabilityEvent) -> StabilityEvent:
        if not isinstance(event, StabilityEvent):
            raise TypeError(f"EventLog.append(event={event!r}): expected a StabilityEvent")
        if len(self._events) == self.max_events:
            self._dropped += 1
        self._events.append(event)
        self._counts[event.kind] += 1
        if self._stream is not None:
            self._stream.write(json.dumps(event.to_dict()) + "\n")
            self._stream.flush()
        for listener in list(self._listeners):
            listener(event)
        return event

    def emit(
        self,
        step: int,
        kind: str,
        source: str,
        severity: str,
        metrics: Mapping[str, float] | None = None,
        action: str | None = None,
        target: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> StabilityEvent:
        """Build a :class:`StabilityEvent` and append it."""
        return self.append(StabilityEvent(step, kind, source, severity, dict(metrics or {}), action, target,
                                          dict(details or {})))

    def subscribe(self, listener: Callable[[StabilityEvent], None]) -> Callable[[], None]:
        """Call ``listener(event)`` for every event appended from now on; returns an unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    # -- requests between components ---------------------------------------------------------------
    def register_responder(self, request: str, name: str) -> None:
        """Announce that component ``name`` acts on requests of kind ``request`` (e.g. ``"rollback"``)."""
        self._responders[request] = name

    def unregister_responder(self, request: str) -> None:
        self._responders.pop(request, None)

    def has_responder(self, request: str) -> bool:
        return request in self._responders

    # -- reading ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[StabilityEvent]:
        return iter(list(self._events))

    def __len__(self) -> int:
        return len(self._events)

    def filter(
        self, kind: str | None = None, severity: str | None = None, source: str | None = None
    ) -> list[StabilityEvent]:
        """Events in memory matching every given field."""
        return [
            e
            for e in self._events
            if (kind is None or e.kind == kind)
            and (severity is None or e.severity == severity)
            and (source is None or e.source == source)
        ]

    def counts(self) -> dict[str, int]:
        """Number of events of each kind ever appended (including those evicted from memory)."""
        return dict(self._counts)

    @property
    def dropped(self) -> int:
        """How many events were evicted from memory because the log was full."""
        return self._dropped

    # -- streaming -------------------------------------------------------------------------------
    def stream_to(self, log_dir: str | os.PathLike[str]) -> str:
        """Append every future event to ``<log_dir>/stability_events.jsonl``; returns the path."""
        path = os.path.join(os.fspath(log_dir), EVENTS_FILENAME)
        if self._stream_path == path and self._stream is not None:
            return path
        self.close_stream()
        os.makedirs(os.fspath(log_dir), exist_ok=True)
        self._stream = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the fit
        self._stream_path = path
        return path

    def close_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._stream = None
        self._stream_path = None

    @property
    def stream_path(self) -> str | None:
        return self._stream_path

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "events": [e.to_dict() for e in self._events],
            "counts": dict(self._counts),
            "dropped": self._dropped,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._events.clear()
        for data in state.get("events", []):
            self._events.append(StabilityEvent.from_dict(data))
        self._counts = Counter({str(k): int(v) for k, v in dict(state.get("counts", {})).items()})
        if not self._counts:  # older states without counts
            self._counts = Counter(e.kind for e in self._events)
        self._dropped = int(state.get("dropped", 0))


def read_events(path: str | os.PathLike[str]) -> list[StabilityEvent]:
    """Read a ``stability_events.jsonl`` file (or a directory holding one) back into events."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, EVENTS_FILENAME)
    events = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                events.append(StabilityEvent.from_dict(json.loads(line)))
    return events


_LOGS: weakref.WeakKeyDictionary[Any, EventLog] = weakref.WeakKeyDictionary()


def get_event_log(trainer: Any) -> EventLog:
    """The one :class:`EventLog` of ``trainer`` (created on first use)."""
    log = _LOGS.get(trainer)
    if log is None:
        log = _LOGS[trainer] = EventLog()
    return log
