"""Golden event logs: what the callbacks detected and did, step by step, in the demo, the efficacy
benchmark's fault runs and the reproduced instabilities.

Each scenario returns its events as ``[step, kind, source, action, target]`` rows, in the order they
were emitted. ``tests/test_golden_events.py`` replays every scenario and compares with the recorded
file; ``python -m tests.golden.scenarios`` records them again (after a change that is meant to alter
behaviour: say which rows changed and why in the commit).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

from lightning_stability.events import EventLog, StabilityEvent

HERE = os.path.dirname(os.path.abspath(__file__))
Row = list[Any]


@contextlib.contextmanager
def recording() -> Iterator[list[Row]]:
    """Every event appended to any event log while the block runs."""
    rows: list[Row] = []
    append = EventLog.append

    def record(self: EventLog, event: StabilityEvent) -> StabilityEvent:
        rows.append([event.step, event.kind, event.source, event.action, event.target])
        return append(self, event)

    with mock.patch.object(EventLog, "append", record), warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        yield rows


def demo() -> list[Row]:
    """``examples/gpt_stability.py`` as ``make demo`` runs it: 600 steps, six faults."""
    from benchmarks.instabilities import load_example

    example = load_example("gpt_stability")
    with (tempfile.TemporaryDirectory() as root, open(os.devnull, "w") as devnull, recording() as rows,
          contextlib.redirect_stdout(devnull), mock.patch.object(sys, "argv", ["gpt_stability.py", "--logdir", root])):
        example.main()
    return rows


def efficacy() -> list[Row]:
    """The efficacy benchmark's ``ours`` arm on every fault (and clean), one seed, the fault at step 70 of 100."""
    from benchmarks import efficacy as bench

    settings = bench.Settings(steps=100, fault_step=70, clean_steps=100, seeds=(0,))
    rows: list[Row] = []
    for fault in (None, *bench.FAULTS):
        with recording() as events:
            bench.run("ours", fault, 0, settings)
        rows += [[fault or "clean", *row] for row in events]
    return rows


def instabilities() -> list[Row]:
    """The reproduced-instabilities section at its quick settings (grokking, attention logit growth,
    spectral blow-up, FP8 formats)."""
    from benchmarks import instabilities as bench

    with recording() as rows:
        bench.run(bench.QUICK, progress=lambda line: None)
    return rows


SCENARIOS: dict[str, Callable[[], list[Row]]] = {"demo": demo, "efficacy": efficacy, "instabilities": instabilities}


def path(name: str) -> str:
    return os.path.join(HERE, f"{name}.json")


def load(name: str) -> list[Row]:
    with open(path(name)) as f:
        return json.load(f)


def record(name: str) -> list[Row]:
    rows = json.loads(json.dumps(SCENARIOS[name]()))  # as the file will hold them (tuples become lists)
    with open(path(name), "w") as f:
        f.write("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    return rows


if __name__ == "__main__":
    for name in sys.argv[1:] or SCENARIOS:
        print(name, len(record(name)), "events")
