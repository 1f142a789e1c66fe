"""Reproduced instabilities, each from several seeds, with and without the remedies: ``python -m benchmarks.instabilities [--quick]``.

Four ways training breaks, reproduced on CPU-sized models:

- **Softmax Collapse in grokking** (``examples/grokking_softmax_collapse.py``): modular addition without
  weight decay; plain cross-entropy, the monitor's perpendicular gradient, StableMax.
- **Attention logit growth** (``examples/attention_logit_growth.py``): the attention's input projection
  at ten times the learning rate; no remedy, QK-clip, the attention soft-cap.
- **A learning rate that blows a small transformer up** (``benchmarks/spectral.py``): no callbacks,
  ``SpectralMonitor``'s cap and PSS, preventive spectral clipping of updates.
- **FP8 with too few exponent or mantissa bits** (``benchmarks/precision.py``): the emulator at e4m3/e5m2
  and at narrower formats, watching only and with the FP8 fallback.

Each instability's details are in its own section and example; this module gathers one table with
the seeds side by side.
"""

from __future__ import annotations

import importlib.util
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from benchmarks import precision, spectral
from lightning_stability.ops.fp8 import E4M3, E5M2, FP8Format

SECTION = "## Reproduced instabilities"
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
GROKKING_ARMS = ("cross-entropy", "perp_grad", "stablemax")
ATTENTION_ARMS = ("reference", "no remedy", "qk_clip", "attn_softcap")
FP8_FORMATS = (("e4m3 / e5m2", (E4M3, E5M2)), ("e2m1", (FP8Format.custom(2, 1),) * 2),
               ("e2m0", (FP8Format.custom(2, 0),) * 2))
_QUIET = (".*does not have many workers.*", ".*Converting a tensor with requires_grad.*", ".*LeafSpec.*", ".*runs attention as math.*", ".*add qk-norm.*")


@dataclass(frozen=True)
class Settings:
    seeds: tuple[int, ...]
    grokking_steps: int
    attention_steps: int
    blowup_steps: int
    blowup_check_every: int
    blowup_monitor_warmup: int
    fp8_steps: int


FULL = Settings(seeds=(0, 1, 2), grokking_steps=1500, attention_steps=400, blowup_steps=300, blowup_check_every=2,
                blowup_monitor_warmup=20, fp8_steps=200)
QUICK = Settings(seeds=(0,), grokking_steps=20, attention_steps=20, blowup_steps=12, blowup_check_every=2,
                 blowup_monitor_warmup=2, fp8_steps=6)


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` as a module (its ``main`` is not run)."""
    spec = importlib.util.spec_from_file_location(f"{name}_example", os.path.join(EXAMPLES, f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Results:
    grokking: list[dict[str, Any]] = field(default_factory=list)
    attention: list[dict[str, Any]] = field(default_factory=list)
    blowup: list[spectral.EfficacyRun] = field(default_factory=list)
    fp8: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _grokking(settings: Settings, progress: Callable[[str], None], root: str) -> list[dict[str, Any]]:
    grok = load_example("grokking_softmax_collapse")
    runs = []
    for seed in settings.seeds:
        for arm in GROKKING_ARMS:
            r = grok.run(arm, settings.grokking_steps, seed, root)
            r["seed"] = seed
            _, _, train_acc, test_acc = r["history"][-1]
            r["train_acc"], r["test_acc"] = train_acc, test_acc
            r["best_test_acc"] = max(h[3] for h in r["history"])
            runs.append(r)
            progress(f"grokking seed {seed} {arm:13s} train {train_acc:.3f} test {test_acc:.3f}, {r['seconds']:.0f} s")
    return runs


def _attention(settings: Settings, progress: Callable[[str], None], root: str) -> list[dict[str, Any]]:
    attn = load_example("attention_logit_growth")
    runs = []
    for seed in settings.seeds:
        ref = None
        for arm in ATTENTION_ARMS:
            r = attn.run(arm, settings.attention_steps, seed, root)
            if arm == "reference":
                ref = r
            assert ref is not None
            r["final"] = attn.smoothed(r["losses"])[-1]
            r["vs_reference"] = r["final"] / attn.smoothed(ref["losses"])[-1]
            r["behind"] = None if r is ref else attn.behind_from(r["losses"], ref["losses"])
            runs.append(r)
            progress(f"attention seed {seed} {arm:13s} flagged at {r['first_flag']}, final {r['final']:.3f} "
                     f"({r['vs_reference']:.2f}x the reference)")
    return runs


def _fp8(settings: Settings, progress: Callable[[str], None]) -> list[dict[str, Any]]:
    runs = []
    for seed in settings.seeds:
        base, rows = precision.sweep_rows(settings.fp8_steps, FP8_FORMATS, progress, seed=seed)
        runs += [{"seed": seed, "format": r.name, "watch": r.watch_final / base, "fallback": r.fallback_final / base,
                  "flagged_at": r.flagged_at, "behind": r.behind_from, "fallbacks": r.fallbacks} for r in rows]
    return runs


def run(settings: Settings, progress: Callable[[str], None], blowup: Sequence[spectral.EfficacyRun] | None = None,
        fp8: Sequence[dict[str, Any]] | None = None) -> Results:
    """Every instability from every seed; ``blowup`` reuses the spectral section's runs when given."""
    results = Results()
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        for pattern in _QUIET:
            warnings.filterwarnings("ignore", pattern)
        for name, compute in (
            ("grokking", lambda: _grokking(settings, progress, root)),
            ("attention", lambda: _attention(settings, progress, root)),
            ("blowup", lambda: list(blowup) if blowup is not None else spectral.efficacy(
                settings.seeds, settings.blowup_steps, settings.blowup_check_every, settings.blowup_monitor_warmup,
                reference=False, progress=progress)[0]),
            ("fp8", lambda: list(fp8) if fp8 is not None else _fp8(settings, progress)),
        ):
            start = time.perf_counter()
            setattr(results, name, compute())
            results.seconds[name] = time.perf_counter() - start
    return results


# -- rendering --------------------------------------------------------------------------------------
def _span(values: Sequence[float], fmt: str = "{:.2f}", suffix: str = "") -> str:
    if not values:
        return "-"
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) < len(values):
        return "NaN" if not finite else f"{fmt.format(min(finite))}{suffix} to NaN"
    lo, hi = min(finite), max(finite)
    return f"{fmt.format(lo)}{suffix}" if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)} to {fmt.format(hi)}{suffix}"


def _steps(values: Sequence[int | None]) -> str:
    if any(v is None for v in values):
        return ", ".join("-" if v is None else str(v) for v in values)
    return _span([float(v) for v in values if v is not None], "{:.0f}")


def grokking_table(runs: Sequence[dict[str, Any]]) -> str:
    lines = ["| seed | run | train acc | test acc | best test acc | `collapse_headroom_low` at step |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in runs:
        low = "-" if r["first_low"] is None else str(r["first_low"])
        lines.append(f"| {r['seed']} | {r['name']} | {r['train_acc']:.3f} | {r['test_acc']:.3f} | "
                     f"{r['best_test_acc']:.3f} | {low} |")
    return "\n".join(lines)


def attention_table(runs: Sequence[dict[str, Any]]) -> str:
    lines = ["| seed | run | flagged at | behind from | lead (steps) | final loss | vs. reference |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        flag, behind = r["first_flag"], r["behind"]
        lead = "-" if flag is None or behind is None else str(behind - flag)
        lines.append(f"| {r['seed']} | {r['arm']} | {'-' if flag is None else flag} | "
                     f"{'-' if behind is None else behind} | {lead} | {r['final']:.3f} | {r['vs_reference']:.2f}x |")
    return "\n".join(lines)


def fp8_table(runs: Sequence[dict[str, Any]]) -> str:
    lines = ["| seed | format | loss vs. float32, watching | first `fp8_unhealthy` at step | behind float32 from step "
             "| loss vs. float32, with fallback | fallbacks |", "|---:|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        flag = "-" if r["flagged_at"] is None else str(r["flagged_at"])
        behind = "-" if r["behind"] is None else str(r["behind"])
        lines.append(f"| {r['seed']} | {r['format']} | {r['watch']:.2f}x | {flag} | {behind} | {r['fallback']:.2f}x | "
                     f"{r['fallbacks']} |")
    return "\n".join(lines)


def summary_table(res: Results, settings: Settings) -> str:
    """One row per instability: what happens unremedied, when it is flagged, and what the remedies do."""
    n = len(settings.seeds)
    rows = ["| instability | seeds | unremedied | flagged | remedy: result |", "|---|---:|---|---|---|"]
    g = {arm: [r for r in res.grokking if r["name"] == arm] for arm in GROKKING_ARMS}
    flagged = [r["first_low"] for r in g["cross-entropy"]]
    rows.append(
        f"| Softmax Collapse in grokking (modular addition, no weight decay, {settings.grokking_steps} steps) | {n} | "
        f"test accuracy {_span([r['test_acc'] for r in g['cross-entropy']], '{:.3f}')} | "
        f"`collapse_headroom_low` at step {_steps(flagged)} | perpendicular gradient: test accuracy "
        f"{_span([r['test_acc'] for r in g['perp_grad']], '{:.3f}')}; StableMax: "
        f"{_span([r['test_acc'] for r in g['stablemax']], '{:.3f}')} |")
    a = {arm: [r for r in res.attention if r["arm"] == arm] for arm in ATTENTION_ARMS}
    leads = [None if r["first_flag"] is None or r["behind"] is None else r["behind"] - r["first_flag"]
             for r in a["no remedy"]]
    rows.append(
        f"| Attention logit growth (`qkv` at 10x the LR, {settings.attention_steps} steps) | {n} | final loss "
        f"{_span([r['vs_reference'] for r in a['no remedy']], suffix='x')} the healthy run's | "
        f"`attention_logit_growth` at step {_steps([r['first_flag'] for r in a['no remedy']])}, "
        f"{_steps(leads)} steps before the loss falls behind | QK-clip: "
        f"{_span([r['vs_reference'] for r in a['qk_clip']], suffix='x')}; soft-cap: "
        f"{_span([r['vs_reference'] for r in a['attn_softcap']], suffix='x')} |")
    b = {arm: [r for r in res.blowup if r.arm == arm] for arm in spectral.ARMS}
    saved_cap, guarded_cap = spectral.rescued([r for r in res.blowup if r.arm in ("no callbacks", "cap", "pss")])
    saved_clip, guarded_clip = spectral.rescued([r for r in res.blowup if r.arm in ("no callbacks", "update_clip")])
    first = [min((x for x in (c.first_intervention, p.first_intervention) if x is not None), default=None)
             for c, p in zip(b["cap"], b["pss"])]
    rows.append(
        f"| Learning rate {spectral.EFFICACY_LR:g} on the tiny GPT ({settings.blowup_steps} steps) | {n} | diverged in "
        f"{sum(r.diverged for r in b['no callbacks'])} of {len(b['no callbacks'])}, loss spikes from step "
        f"{_steps([r.spike for r in b['no callbacks']])} | `sigma_growth` acted on from step {_steps(first)} | "
        f"cap or PSS: rescued {saved_cap} of {guarded_cap}; preventive update clipping: rescued {saved_clip} of "
        f"{guarded_clip} |")
    for name, _ in FP8_FORMATS[1:]:
        f = [r for r in res.fp8 if r["format"] == name]
        rows.append(
            f"| FP8 emulated as {name} ({settings.fp8_steps} steps) | {n} | loss "
            f"{_span([r['watch'] for r in f], suffix='x')} float32's, behind from step {_steps([r['behind'] for r in f])} | "
            f"`fp8_unhealthy` at step {_steps([r['flagged_at'] for r in f])} | fallback to bf16: "
            f"{_span([r['fallback'] for r in f], suffix='x')} float32's |")
    ok = [r for r in res.fp8 if r["format"] == FP8_FORMATS[0][0]]
    rows.append(f"| (control) FP8 as e4m3 / e5m2 | {n} | loss {_span([r['watch'] for r in ok], suffix='x')} float32's | "
                f"`fp8_unhealthy` at step {_steps([r['flagged_at'] for r in ok])} | |")
    return "\n".join(rows)


GENERALISED = 0.9  # test accuracy from which a grokking run counts as generalised


def findings(res: Results) -> list[str]:
    """What the runs show, read off the results (never a fixed text)."""
    lines = []
    grok = {arm: [r for r in res.grokking if r["name"] == arm] for arm in GROKKING_ARMS}
    n = len(grok["cross-entropy"])
    flagged = sum(r["first_low"] is not None for r in grok["cross-entropy"])
    gen = {arm: sum(r["test_acc"] >= GENERALISED for r in runs) for arm, runs in grok.items()}
    lines.append(
        f"Grokking: plain cross-entropy generalised (test accuracy >= {GENERALISED:g}) in {gen['cross-entropy']} of {n} "
        f"seeds, and the monitor flagged the collapsing headroom in {flagged} of {n}; with the perpendicular gradient "
        f"{gen['perp_grad']} of {n} generalised, with StableMax {gen['stablemax']} of {n}.")
    attn = {arm: [r for r in res.attention if r["arm"] == arm] for arm in ATTENTION_ARMS}
    early = sum(r["first_flag"] is not None and r["behind"] is not None and r["first_flag"] < r["behind"]
                for r in attn["no remedy"])
    fell = sum(r["behind"] is not None for r in attn["no remedy"])
    med = {arm: statistics.median(r["vs_reference"] for r in runs) for arm, runs in attn.items() if runs}
    lines.append(
        f"Attention logit growth: the unremedied loss fell behind the healthy run's in {fell} of {len(attn['no remedy'])} "
        f"seeds, flagged before it in {early}; median final loss vs. the healthy run: {med.get('no remedy', math.nan):.2f}x "
        f"unremedied, {med.get('qk_clip', math.nan):.2f}x with QK-clip, {med.get('attn_softcap', math.nan):.2f}x with the "
        f"soft-cap.")
    saved_cap, guarded_cap = spectral.rescued([r for r in res.blowup if r.arm in ("no callbacks", "cap", "pss")])
    saved_clip, guarded_clip = spectral.rescued([r for r in res.blowup if r.arm in ("no callbacks", "update_clip")])
    base = [r for r in res.blowup if r.arm == "no callbacks"]
    lines.append(
        f"Learning-rate blow-up: {sum(r.diverged for r in base)} of {len(base)} unguarded runs diverged; the monitor's "
        f"cap or PSS, acting after a detection, rescued {saved_cap} of {guarded_cap}; clipping every update's spectral "
        f"norm from the first step rescued {saved_clip} of {guarded_clip}.")
    for name, _ in FP8_FORMATS[1:]:
        runs = [r for r in res.fp8 if r["format"] == name]
        behind = [r for r in runs if r["behind"] is not None]
        before = sum(r["flagged_at"] is not None and r["flagged_at"] <= r["behind"] for r in behind)
        worst = max((r["fallback"] for r in runs), default=math.nan)
        lines.append(
            f"FP8 as {name}: the loss fell behind float32's (by more than 10%) in {len(behind)} of {len(runs)} seeds, "
            f"FP8 health flagged it first in {before}; with the fallback the worst run ended at {worst:.2f}x float32's "
            f"loss (watching only: {max((r['watch'] for r in runs), default=math.nan):.2f}x).")
    return lines


def render_section(settings: Settings, res: Results, seconds: float, machine: str) -> str:
    times = ", ".join(f"{k} {v / 60:.1f} min" for k, v in res.seconds.items())
    blowup_table, blowup_lines = spectral.efficacy_table(res.blowup, None)
    return f"""
{SECTION}

```bash
python -m benchmarks.instabilities   # rewrites this section only ({seconds / 60:.1f} minutes for the run below: {times})
```

{machine}

Four instabilities reproduced on CPU-sized models, each from seeds {", ".join(map(str, settings.seeds))}, with
and without the library's remedies. The examples and sections they come from describe each setting in
full: [Softmax Collapse in grokking](softmax.md#efficacy-grokking-without-weight-decay) and [attention
logit growth](softmax.md#efficacy-attention-logit-growth) are `examples/grokking_softmax_collapse.py` and
`examples/attention_logit_growth.py`; the learning-rate blow-up is the spectral section's ("Does it stop
a blow-up?" above); the narrow formats are the precision section's sweep, here from every seed.

{summary_table(res, settings)}

What the runs show:

{chr(10).join(f"- {line}" for line in findings(res))}

### Softmax Collapse in grokking

{grokking_table(res.grokking)}

### Attention logit growth

{attention_table(res.attention)}

### Learning-rate blow-up

{blowup_table}

{chr(10).join(f"- {line}" for line in blowup_lines)}

### FP8 with narrow formats

{fp8_table(res.fp8)}
"""


def main(argv: list[str] | None = None) -> int:
    from benchmarks.__main__ import run_section

    return run_section(argv, "python -m benchmarks.instabilities", __doc__.splitlines()[0], SECTION, QUICK, FULL, run,
                       render_section)


if __name__ == "__main__":
    sys.exit(main())
