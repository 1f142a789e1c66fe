"""The ``lightning-stability`` command line."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence


def _events(args: argparse.Namespace) -> int:
    from lightning_stability.events import read_events

    try:
        events = read_events(args.logdir)
    except FileNotFoundError as err:
        print(f"lightning-stability events: no event log found: {err.filename}", file=sys.stderr)
        return 2
    counts = Counter((e.kind, e.severity) for e in events)
    print(f"{len(events)} events")
    for (kind, severity), n in sorted(counts.items()):
        print(f"  {kind:<16} {severity:<9} {n}")
    for e in events:
        if e.severity != "info":
            where = f"  layer={e.target}" if e.target else ""
            print(f"  step {e.step:>7}  {e.kind:<14} {e.severity:<8} action={e.action}{where}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from lightning_stability.report import ReportError, write_report

    try:
        html_path, md_path, lines = write_report(args.logdir, args.output)
    except ReportError as err:
        print(f"lightning-stability report: {err}", file=sys.stderr)
        return 2
    print("\n".join(f"- {line}" for line in lines))
    print(f"wrote {html_path} and {md_path}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from lightning_stability.plugins.flags import doctor_report

    print(doctor_report())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lightning_stability import __version__

    parser = argparse.ArgumentParser(prog="lightning-stability", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lightning-stability {__version__}")
    sub = parser.add_subparsers(dest="command")
    events = sub.add_parser("events", help="summarise a run's stability_events.jsonl")
    events.add_argument("logdir", help="a run's log directory or its stability_events.jsonl")
    events.set_defaults(func=_events)
    report = sub.add_parser("report", help="an HTML report with plots and a Markdown summary of a run's stability")
    report.add_argument("logdir", help="a run's log directory (TensorBoard event files, stability_events.jsonl)")
    report.add_argument("-o", "--output", default="report.html", help="the HTML file to write (the .md goes beside it)")
    report.set_defaults(func=_report)
    doctor = sub.add_parser("doctor", help="the GPU, Transformer Engine and bitsandbytes here, and what each precision flag does")
    doctor.set_defaults(func=_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
