"""The stability report: a run's TensorBoard scalars and event log turned into one self-contained HTML
file (plots embedded) and a Markdown summary, with a plain-language verdict at the top.

``lightning-stability report LOGDIR -o report.html`` writes ``report.html`` and ``report.md``. The plots
need matplotlib (``pip install matplotlib``); without it the report has the verdict and the tables.
"""

from __future__ import annotations

import base64
import glob
import html
import io
import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_stability.events import EVENTS_FILENAME, StabilityEvent

_ACTED = ("clip", "skip", "reset_moments", "lr_backoff", "rollback", "halt")


class ReportError(Exception):
    """What is wrong with the log directory, in a sentence for the command line."""


@dataclass
class RunData:
    logdir: str
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    events: list[StabilityEvent] = field(default_factory=list)

    def series(self, tag: str) -> list[tuple[int, float]]:
        return self.scalars.get(tag, [])

    def tags(self, prefix: str, suffix: str) -> list[str]:
        return sorted(t for t in self.scalars if t.startswith(prefix) and t.endswith(suffix))


def load_run(logdir: str) -> RunData:
    """The scalars of every TensorBoard event file under ``logdir`` and its ``stability_events.jsonl``."""
    if not os.path.isdir(logdir):
        raise ReportError(f"no such log directory: {logdir}")
    data = RunData(logdir)
    event_files = sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True))
    jsonl = sorted(glob.glob(os.path.join(logdir, "**", EVENTS_FILENAME), recursive=True))
    if not event_files and not jsonl:
        raise ReportError(f"{logdir} holds no TensorBoard event files and no {EVENTS_FILENAME}: is it a run's log directory?")
    for path in jsonl[:1]:
        data.events = _read_jsonl(path)
    for directory in sorted({os.path.dirname(p) for p in event_files}):
        _read_scalars(directory, data.scalars)
    if not data.scalars and not data.events:
        raise ReportError(f"{logdir} holds no scalars and no events: the run logged nothing yet")
    return data


def _read_jsonl(path: str) -> list[StabilityEvent]:
    events = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                events.append(StabilityEvent.from_dict(json.loads(line)))
            except (ValueError, KeyError, TypeError) as err:
                raise ReportError(f"{path} is corrupt at line {number}: {err}") from None
    return events


def _read_scalars(directory: str, into: dict[str, list[tuple[int, float]]]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    try:
        acc = EventAccumulator(directory, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            into.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    except Exception as err:  # tensorboard raises several kinds on damaged files
        raise ReportError(f"the TensorBoard event files in {directory} cannot be read: {err}") from None
    for values in into.values():
        values.sort(key=lambda sv: sv[0])


# -- the verdict -------------------------------------------------------------------------------------
def _steps(events: Sequence[StabilityEvent], limit: int = 8) -> str:
    steps = [str(e.step) for e in events[:limit]]
    return ", ".join(steps) + (f" and {len(events) - limit} more" if len(events) > limit else "")


def _actions(events: Sequence[StabilityEvent]) -> str:
    counts = Counter(e.action or "no action" for e in events)
    if len(counts) == 1:
        (action, _), = counts.items()
        return "all " + ("watched, no action" if action == "no action" else _past(action))
    return ", ".join(f"{n} {_past(a)}" for a, n in counts.most_common())


def _past(action: str) -> str:
    return {"clip": "clipped", "skip": "skipped", "rollback": "rolled back", "halt": "halted",
            "reset_moments": "with moments reset", "lr_backoff": "with the LR backed off"}.get(action, action)


def verdict(data: RunData) -> list[str]:
    """Plain-language sentences: what went wrong, when, and what was done."""
    events = data.events
    by_source: dict[str, list[StabilityEvent]] = defaultdict(list)
    for e in events:
        by_source[e.source].append(e)
    lines = []
    guard = [e for e in by_source.get("GradientSpikeGuard", []) if e.severity != "info"]
    for kinds, noun in ((("grad_spike", "loss_spike", "element_spike"), "gradient or loss spike"),
                        (("nonfinite",), "non-finite step")):
        found = [e for e in guard if e.kind in kinds]
        if found:
            lines.append(f"{len(found)} {noun}{'s' if len(found) > 1 else ''} at step{'s' if len(found) > 1 else ''} "
                         f"{_steps(found)}: {_actions(found)}.")
    rollbacks = [e for e in by_source.get("InMemoryRollback", []) if e.kind == "rollback"]
    if rollbacks:
        undone = sum(int(e.metrics.get("lost_steps", e.metrics.get("steps_undone", 0))) for e in rollbacks)
        lines.append(f"{len(rollbacks)} rollback{'s' if len(rollbacks) > 1 else ''} (step{'s' if len(rollbacks) > 1 else ''} "
                     f"{_steps(rollbacks)})" + (f", {undone} steps undone." if undone else "."))
    else:
        lines.append("No rollback.")
    judged = [e for e in by_source.get("SkipQuarantined", []) if e.kind == "quarantine_verdict"]
    if judged:
        faults = [i for e in judged for i in e.details.get("data_fault", [])]
        transient = sum(len(e.details.get("transient", [])) for e in judged)
        shown = ", ".join(map(str, faults[:8])) + (f" and {len(faults) - 8} more" if len(faults) > 8 else "")
        lines.append(f"Quarantined samples retried: {len(faults)} spiked again, data faults left out"
                     + (f" (ids {shown})" if faults else "") + f"; {transient} trained cleanly (transient).")
    for e in (e for e in by_source.get("FP8Precision", []) if e.kind == "fp8_fallback"):
        until = e.metrics.get("until_step")
        span = f" for {int(until) - e.step} steps" if until is not None and math.isfinite(until) else ""
        lines.append(f"Layer {e.target} fell back to bf16 at step {e.step}{span} ({(e.action or '').split(':')[-1]}).")
    spectral = [e for e in by_source.get("SpectralMonitor", []) if e.severity != "info"]
    if spectral:
        layers = sorted({e.target for e in spectral if e.target})
        lines.append(f"SpectralMonitor: {len(spectral)} detections from step {spectral[0].step}"
                     + (f" on {', '.join(layers[:4])}{' and more' if len(layers) > 4 else ''}" if layers else "")
                     + f"; {_actions(spectral)}.")
    softmax = [e for e in by_source.get("SoftmaxSaturationMonitor", []) if e.severity != "info"]
    if softmax:
        by_kind = Counter(e.kind for e in softmax)
        lines.append("Softmax: " + ", ".join(f"{k} x{n} (first at step {next(e.step for e in softmax if e.kind == k)})"
                                             for k, n in by_kind.items()) + ".")
    halts = [e for e in events if e.action == "halt" or e.kind == "halt"]
    if halts:
        lines.append(f"Training was halted at step {halts[0].step} by {halts[0].source} ({halts[0].kind}).")
    tor = data.series("stability/rollback/tor")
    if tor:
        lines.append(f"Training Overhead Ratio {tor[-1][1]:.3f} (useful steps over steps run).")
    if not any(e.severity != "info" for e in events):
        lines.insert(0, f"No instability detected: {len(events)} events, all informational.")
    return lines


# -- plots -------------------------------------------------------------------------------------------
def _figures(data: RunData) -> dict[str, bytes]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    figures: dict[str, Any] = {}
    colors = {"info": "tab:gray", "warning": "tab:orange", "critical": "tab:red"}
    loss_tag = next((t for t in ("train/loss", "train_loss", "loss") if t in data.scalars),
                    next((t for t in sorted(data.scalars) if t.endswith("loss") and not t.startswith("stability/")), None))
    norm = data.series("stability/grad/norm")
    if loss_tag or norm:
        fig, axes = plt.subplots(2 if (loss_tag and norm) else 1, 1, figsize=(8, 4.8), sharex=True, squeeze=False)
        panels = [(loss_tag, data.series(loss_tag) if loss_tag else []), ("gradient norm", norm)]
        for ax, (label, series) in zip(axes[:, 0], [p for p in panels if p[1]]):
            ax.plot([s for s, _ in series], [v for _, v in series], lw=1, color="tab:blue")
            ax.set_ylabel(label)
            ax.set_yscale("log" if label == "gradient norm" else "linear")
            for e in data.events:
                if e.severity != "info":
                    ax.axvline(e.step, color=colors[e.severity], lw=0.8, alpha=0.7)
                if e.kind == "rollback":
                    ax.axvspan(e.step - e.metrics.get("lost_steps", 0), e.step, color="tab:red", alpha=0.08)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step (lines: detections; bands: steps undone by a rollback)")
        figures["Loss and gradient norm"] = fig
    sigma = data.tags("stability/spectral/", "/sigma_max")
    if sigma:
        steps = sorted({s for t in sigma for s, _ in data.series(t)})
        index = {s: i for i, s in enumerate(steps)}
        grid = [[math.nan] * len(steps) for _ in sigma]
        for row, tag in enumerate(sigma):
            for s, v in data.series(tag):
                grid[row][index[s]] = math.log10(v) if v > 0 else math.nan
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(sigma) + 1.5))
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis",
                          extent=(steps[0], steps[-1], len(sigma) - 0.5, -0.5))
        ax.set_yticks(range(len(sigma)), [t[len("stability/spectral/"):-len("/sigma_max")] for t in sigma], fontsize=7)
        ax.set_xlabel("step")
        fig.colorbar(image, ax=ax, label="log10 sigma_max")
        figures["Largest singular value per layer"] = fig
    head = data.series("stability/softmax/sc_headroom_p01")
    entropy = data.tags("stability/attention/", "/entropy_min")
    if head or entropy:
        fig, ax = plt.subplots(figsize=(8, 3.2))
        if head:
            ax.plot([s for s, _ in head], [v for _, v in head], label="collapse headroom p01 (nats)", color="tab:red")
        for tag in entropy:
            ax.plot([s for s, _ in data.series(tag)], [v * 10 for _, v in data.series(tag)], lw=0.9,
                    label=f"{tag.split('/')[2]} entropy min (x10)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        figures["Softmax: collapse headroom and attention entropy"] = fig
    fp8 = [t for t in data.scalars if t.startswith("stability/fp8/") and t.count("/") == 3 and t.endswith("overflow_frac")]
    if fp8:
        fig, ax = plt.subplots(figsize=(8, 3.2))
        for tag in sorted(fp8):
            ax.plot([s for s, _ in data.series(tag)], [v for _, v in data.series(tag)], lw=0.9, label=tag.split("/")[2])
        ax.set_xlabel("step")
        ax.set_ylabel("FP8 overflow fraction")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        figures["FP8 health"] = fig
    shown = [e for e in data.events if e.kind != "armed"]
    if shown:
        sources = sorted({e.source for e in shown})
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(sources) + 1.2))
        for e in shown:
            ax.scatter(e.step, sources.index(e.source), color=colors.get(e.severity, "black"),
                       marker="o" if e.action else "|", s=30)
        ax.set_yticks(range(len(sources)), sources, fontsize=8)
        ax.set_xlabel("step (dots: an action was taken; ticks: observed)")
        ax.grid(alpha=0.3, axis="x")
        figures["Intervention timeline"] = fig
    out = {}
    for title, fig in figures.items():
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        out[title] = buf.getvalue()
    return out


# -- rendering ---------------------------------------------------------------------------------------
def _event_rows(events: Sequence[StabilityEvent]) -> list[tuple[str, ...]]:
    return [(str(e.step), e.source, e.kind, e.severity, e.action or "-", e.target or "-",
             ", ".join(f"{k}={v:.4g}" for k, v in e.metrics.items())) for e in events if e.kind != "armed"]


INCIDENT_HEADER = ("step", "kind", "action", "layers (ratio to their own norm)", "largest updates before (ratio to weight)",
                   "batch", "worst samples (loss)", "loss back in")


def _incident_rows(data: RunData) -> list[tuple[str, ...]]:
    """One row per detection that says where it was (its ``details``): the layers, the batch, its worst
    samples where the step returned per-sample losses (the ``sample_losses`` event that follows it), the
    layers whose last update was largest against their weight (the spectral monitor's ``update_ratio``
    event at its step),
    and how many steps the loss took to come back (the first logged step after it whose loss z-score
    is under 3; at the logging cadence, so an upper bound)."""
    zscores = data.series("stability/loss/zscore")
    worst = {(e.source, e.step): e.details for e in data.events if e.kind == "sample_losses"}
    updates = {e.step: e.details for e in data.events if e.kind == "update_ratio" and e.details}
    rows: list[tuple[str, ...]] = []
    for e in data.events:
        if e.severity == "info" or not e.details:
            continue
        samples = worst.get((e.source, e.step), {})
        named = ", ".join(f"{i} ({v:.4g})" for i, v in zip(samples.get("sample_ids", [])[:3], samples.get("sample_losses", [])))
        layers = ", ".join(f"{d['name']} ({_ratio(d.get('ratio'))})" for d in e.details.get("layers", []))
        moved = ", ".join(f"{d['name']} ({d['ratio']:.3g})" for d in updates.get(e.step, {}).get("layers", []))
        if "sample_ids" in e.details:
            ids = list(e.details["sample_ids"])
            batch = "ids " + ", ".join(map(str, ids[:8])) + (f" (+{len(ids) - 8})" if len(ids) > 8 else "")
        else:
            batch = "; ".join(f"epoch {ep} batch {b}" for ep, b in e.details.get("batches", [])) or "-"
        back = next((step - e.step for step, z in zscores if step > e.step and z < 3.0), None)
        rows.append((str(e.step), e.kind, e.action or "-", layers or "-", moved or "-", batch, named or "-",
                     f"{back} steps" if back is not None else "-"))
    return rows


def _ratio(value: Any) -> str:
    return "no reference" if not isinstance(value, (int, float)) or value != value else f"x{value:.3g}"


def render_markdown(data: RunData, lines: list[str]) -> str:
    rows = _event_rows(data.events)
    incidents = _incident_rows(data)
    table = ["| step | source | kind | severity | action | target | numbers |", "|---:|---|---|---|---|---|---|"]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    counts = Counter((e.source, e.kind) for e in data.events)
    return "\n".join([
        f"# Stability report: {data.logdir}", "", *[f"- {line}" for line in lines], "",
        "## Events by kind", "", "| source | kind | count |", "|---|---|---:|",
        *[f"| {s} | {k} | {n} |" for (s, k), n in sorted(counts.items())], "",
        "## Incidents", "",
        *(["| " + " | ".join(INCIDENT_HEADER) + " |", "|---:|" + "---|" * (len(INCIDENT_HEADER) - 1),
           *["| " + " | ".join(r) + " |" for r in incidents]] if incidents else ["No detection with its layers or batch."]),
        "",
        "## Timeline", "", *(table if rows else ["No events."]), "",
    ])


def render_html(data: RunData, lines: list[str], figures: dict[str, bytes]) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Stability report</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
        ".verdict{background:#f6f8fa;border-left:4px solid #d73a49;padding:.5em 1em}img{max-width:100%}"
        "</style></head><body>",
        f"<h1>Stability report</h1><p>{esc(data.logdir)}</p>",
        "<div class='verdict'><ul>" + "".join(f"<li>{esc(line)}</li>" for line in lines) + "</ul></div>",
    ]
    if not figures:
        parts.append("<p><em>No plots: matplotlib is not installed (pip install matplotlib).</em></p>")
    for title, png in figures.items():
        parts.append(f"<h2>{esc(title)}</h2><img alt='{esc(title)}' src='data:image/png;base64,"
                     f"{base64.b64encode(png).decode()}'>")
    incidents = _incident_rows(data)
    if incidents:
        parts.append("<h2>Incidents</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in INCIDENT_HEADER) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in incidents]
        parts.append("</table>")
    rows = _event_rows(data.events)
    parts.append("<h2>Timeline</h2>")
    if rows:
        parts.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in
                                             ("step", "source", "kind", "severity", "action", "target", "numbers")) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append("</table>")
    else:
        parts.append("<p>No events.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(logdir: str, out: str) -> tuple[str, str, list[str]]:
    """Write ``out`` (HTML) and the Markdown summary beside it (``.md``); return both paths and the verdict."""
    data = load_run(logdir)
    lines = verdict(data)
    md_path = os.path.splitext(out)[0] + ".md"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        fh.write(render_html(data, lines, _figures(data)))
    with open(md_path, "w", encoding="utf-8") as fh:
        fh.write(render_markdown(data, lines))
    return out, md_path, lines
