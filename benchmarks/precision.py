"""Precision benchmarks: what 8-bit optimizer state saves and costs, whether 8-bit optimizers and
emulated FP8 train like float32, what the FP8 emulator costs, and where narrower formats break.

    python -m benchmarks.precision            # rewrites the Precision section of docs/benchmarks.md
    python -m benchmarks.precision --quick    # the CI smoke test: a few steps, prints, writes nothing

``python -m benchmarks`` runs it too, after the other sections. Ratios are measured side by side in one
process, runs interleaved, medians over repeats.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_stability import FP8Precision, LowBitOptimizer, get_event_log
from lightning_stability.demos import TinyGPT, make_dataloader
from lightning_stability.ops.fp8 import E4M3, E5M2, FP8Format
from lightning_stability.plugins.fp8 import EmulatedFP8Linear

BLOCK, BATCH = 64, 16
STATE_GOAL = 2.1  # bytes of optimizer state per parameter (fp32 AdamW: 8)
OPT_LOSS_GOAL, FP8_LOSS_GOAL = 0.02, 0.03
SWEEP = (
    ("e4m3 / e5m2 (FP8)", (E4M3, E5M2)),
    ("e3m2", (FP8Format.custom(3, 2),) * 2),
    ("e3m1", (FP8Format.custom(3, 1),) * 2),
    ("e4m0", (FP8Format.custom(4, 0),) * 2),
    ("e2m1", (FP8Format.custom(2, 1),) * 2),
    ("e2m0", (FP8Format.custom(2, 0),) * 2),
)


@dataclass(frozen=True)
class Settings:
    sizes: tuple[tuple[str, int, int], ...]  # (name, d_model, n_layer) for the state-size table
    time_warmup: int
    time_steps: int
    time_repeats: int
    loss_steps: int
    seeds: tuple[int, ...]
    sweep_steps: int
    linear_tokens: int
    linear_repeats: int


FULL = Settings(sizes=(("d128-L4", 128, 4), ("d256-L4", 256, 4)), time_warmup=10, time_steps=30, time_repeats=3,
                loss_steps=300, seeds=(0, 1, 2), sweep_steps=300, linear_tokens=2048, linear_repeats=20)
QUICK = Settings(sizes=(("d128-L4", 128, 4),), time_warmup=2, time_steps=3, time_repeats=1, loss_steps=6, seeds=(0,),
                 sweep_steps=6, linear_tokens=64, linear_repeats=2)


class _Record(Callback):
    """Loss per step, and the wall time of each step from batch start to batch end."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.step_s: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.step_s.append(time.perf_counter() - self._t)
        self.losses.append(float(outputs["loss"]))


def _arm(name: str, formats: tuple[FP8Format, FP8Format] | None = None, **fp8: Any) -> tuple[list[Any], list[Callback]]:
    """(plugins, callbacks) for an arm."""
    if name == "AdamW8bit":
        return [], [LowBitOptimizer()]
    if name == "AdamW8bit, all 8-bit":
        return [], [LowBitOptimizer(keep_32bit=())]
    if name.startswith("FP8"):
        return [FP8Precision(backend="emulated", formats=formats, **fp8)], []
    return [], []


def fit(arm: str, steps: int, seed: int = 0, d_model: int = 64, n_layer: int = 2, formats: Any = None,
        **fp8: Any) -> tuple[pl.Trainer, _Record]:
    """One fit of the tiny GPT: the same data for every arm and seed; ``seed`` draws the weights."""
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        loader, dataset = make_dataloader(block_size=BLOCK, batch_size=BATCH, n_samples=BATCH * steps)
        pl.seed_everything(seed, verbose=False)
        model = TinyGPT(len(dataset.vocab), block_size=BLOCK, d_model=d_model, n_layer=n_layer, max_steps=steps)
        plugins, callbacks = _arm(arm, formats, **fp8)
        record = _Record()
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=steps, default_root_dir=root, callbacks=[*callbacks, record],
            plugins=plugins, enable_progress_bar=False, enable_model_summary=False, logger=False,
            enable_checkpointing=False,
        )
        trainer.fit(model, loader)
    return trainer, record


# -- optimizer state ------------------------------------------------------------------------------
def state_bytes(trainer: pl.Trainer) -> tuple[float, int]:
    """Bytes of optimizer state per parameter (every tensor in the state: moments, maps, scales)."""
    opt = trainer.optimizers[0]
    params = sum(p.numel() for g in opt.param_groups for p in g["params"])
    total = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return total / params, params


def state_table(settings: Settings, progress: Callable[[str], None]) -> tuple[str, list[str]]:
    rows = ["| model | parameters | optimizer | state bytes / parameter | vs. AdamW |", "|---|---:|---|---:|---:|"]
    lines = []
    for name, d, layers in settings.sizes:
        base = None
        for arm in ("AdamW", "AdamW8bit", "AdamW8bit, all 8-bit"):
            trainer, _ = fit(arm, 2, d_model=d, n_layer=layers)
            per, params = state_bytes(trainer)
            base = per if base is None else base
            rows.append(f"| {name} | {params / 1e6:.2f} M | {arm} | {per:.2f} | {per / base:.3f}x |")
            progress(f"state {name} {arm}: {per:.2f} bytes/parameter")
            if arm != "AdamW":
                verdict = "met" if per <= STATE_GOAL else "NOT met"
                lines.append(f"{name}, {arm}: {per:.2f} bytes of state per parameter (AdamW {base:.2f}); goal <= "
                             f"{STATE_GOAL}: {verdict}.")
    return "\n".join(rows), lines


# -- step time -------------------------------------------------------------------------------------
def step_times(settings: Settings, progress: Callable[[str], None]) -> str:
    arms = ("AdamW", "AdamW8bit", "FP8 emulated")
    name, d, layers = settings.sizes[0]
    per_arm: dict[str, list[float]] = {a: [] for a in arms}
    for repeat in range(settings.time_repeats):
        order = arms[repeat % len(arms):] + arms[:repeat % len(arms)]
        for arm in order:
            _, rec = fit(arm, settings.time_warmup + settings.time_steps, d_model=d, n_layer=layers)
            per_arm[arm].append(statistics.median(rec.step_s[settings.time_warmup:]) * 1e3)
            progress(f"time {arm} repeat {repeat}: {per_arm[arm][-1]:.1f} ms/step")
    base = statistics.median(per_arm["AdamW"])
    rows = [f"| {name}: arm | ms/step (median of {settings.time_repeats}) | vs. AdamW |", "|---|---:|---:|"]
    for arm in arms:
        ms = statistics.median(per_arm[arm])
        rows.append(f"| {arm} | {ms:.1f} | {ms / base:.2f}x |")
    return "\n".join(rows)


# -- loss parity ------------------------------------------------------------------------------------
def final_loss(rec: _Record, tail: int = 20) -> float:
    tail = min(tail, len(rec.losses))
    return sum(rec.losses[-tail:]) / tail


def loss_parity(settings: Settings, progress: Callable[[str], None]) -> tuple[str, list[str]]:
    arms = ("AdamW", "AdamW8bit", "FP8 emulated")
    finals: dict[str, list[float]] = {a: [] for a in arms}
    for seed in settings.seeds:
        for arm in arms:
            _, rec = fit(arm, settings.loss_steps, seed=seed)
            finals[arm].append(final_loss(rec))
            progress(f"loss {arm} seed {seed}: {finals[arm][-1]:.4f}")
    rows = ["| arm | final loss per seed (mean of the last 20 steps) | vs. AdamW per seed |", "|---|---|---|"]
    lines = []
    for arm in arms:
        rel = [f / b for f, b in zip(finals[arm], finals["AdamW"])]
        rows.append(f"| {arm} | {', '.join(f'{x:.4f}' for x in finals[arm])} | {', '.join(f'{r:.4f}x' for r in rel)} |")
        goal = {"AdamW8bit": OPT_LOSS_GOAL, "FP8 emulated": FP8_LOSS_GOAL}.get(arm)
        if goal is not None:
            worst = max(abs(r - 1) for r in rel)
            lines.append(f"{arm}: final loss within {worst:.2%} of AdamW in float32 over {len(rel)} seeds; goal "
                         f"within {goal:.0%}: {'met' if worst <= goal else 'NOT met'}.")
    return "\n".join(rows), lines


# -- the emulator's cost ----------------------------------------------------------------------------
def linear_overhead(settings: Settings) -> str:
    """Forward and backward of one 512 -> 512 layer: plain, and through the FP8 emulator (delayed scaling)."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(512, 512)
    emulated = EmulatedFP8Linear.from_linear(torch.nn.Linear(512, 512))
    x = torch.randn(settings.linear_tokens, 512)

    def once(layer: torch.nn.Module) -> float:
        start = time.perf_counter()
        layer(x.requires_grad_()).sum().backward()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"plain": [], "emulated": []}
    for _ in range(settings.linear_repeats):
        times["plain"].append(once(plain))
        times["emulated"].append(once(emulated))
    p, e = statistics.median(times["plain"]), statistics.median(times["emulated"])
    return (f"| layer | ms (forward + backward, {settings.linear_tokens} tokens, 512 -> 512) | vs. plain |\n|---|---:|---:|\n"
            f"| `nn.Linear` | {p * 1e3:.2f} | 1.00x |\n| `EmulatedFP8Linear` | {e * 1e3:.2f} | {e / p:.2f}x |")


# -- the sweep --------------------------------------------------------------------------------------
@dataclass
class SweepRow:
    name: str
    watch_final: float
    fallback_final: float
    flagged_at: int | None
    behind_from: int | None
    fallbacks: int
    losses: list[float] = field(default_factory=list)


def behind_from(losses: Sequence[float], reference: Sequence[float], factor: float = 1.10, window: int = 20) -> int | None:
    """The first step from which the ``window``-step mean of ``losses`` stays above ``factor`` times the
    reference's (None if it ends within it)."""
    def smooth(xs: Sequence[float]) -> list[float]:
        return [sum(xs[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(xs))]

    step = None
    for i, (a, b) in enumerate(zip(smooth(losses), smooth(reference))):
        if a <= factor * b:
            step = None
        elif step is None:
            step = i
    return step


def sweep_rows(steps: int, formats: Sequence[tuple[str, Any]], progress: Callable[[str], None],
               seed: int = 0) -> tuple[float, list[SweepRow]]:
    """float32's final loss and, for each format, a fit that watches FP8 health and one that falls back."""
    _, ref = fit("AdamW", steps, seed=seed)
    base = final_loss(ref)
    rows = []
    for name, fmts in formats:
        watch, wrec = fit("FP8 watch", steps, seed=seed, formats=fmts, fallback=False, health_every_n_steps=10)
        events = [e for e in get_event_log(watch) if e.kind == "fp8_unhealthy"]
        rescue, rrec = fit("FP8 fallback", steps, seed=seed, formats=fmts, health_every_n_steps=10)
        fallbacks = [e for e in get_event_log(rescue) if e.kind == "fp8_fallback"]
        rows.append(SweepRow(name, final_loss(wrec), final_loss(rrec), min((e.step for e in events), default=None),
                             behind_from(wrec.losses, ref.losses), len(fallbacks), wrec.losses))
        progress(f"sweep seed {seed} {name}: {rows[-1].watch_final / base:.2f}x float32 watching, "
                 f"{rows[-1].fallback_final / base:.2f}x with fallback")
    return base, rows


def sweep(settings: Settings, progress: Callable[[str], None]) -> tuple[str, list[str], float]:
    base, rows = sweep_rows(settings.sweep_steps, SWEEP, progress)
    table = ["| format (forward / gradients) | final loss, watching | vs. float32 | first `fp8_unhealthy` at step | "
             "loss behind float32 (>10%) from step | final loss with fallback | fallbacks |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines = []
    for r in rows:
        flag = "-" if r.flagged_at is None else str(r.flagged_at)
        behind = "-" if r.behind_from is None else str(r.behind_from)
        table.append(f"| {r.name} | {r.watch_final:.3f} | {r.watch_final / base:.2f}x | {flag} | {behind} | "
                     f"{r.fallback_final:.3f} | {r.fallbacks} |")
        if r.behind_from is not None:
            first = "before" if r.flagged_at is not None and r.flagged_at <= r.behind_from else "NOT before"
            lines.append(f"{r.name}: the loss falls behind float32's from step {r.behind_from}; FP8 health flagged it "
                         f"{first} (first warning at step {flag}); with fallback the run ends at "
                         f"{r.fallback_final / base:.2f}x float32's loss.")
    return "\n".join(table), lines, base


SECTION = "## Precision: 8-bit optimizers and FP8"


def render_section(settings: Settings, parts: dict[str, Any], seconds: float, machine: str) -> str:
    state_t, state_lines = parts["state"]
    loss_t, loss_lines = parts["loss"]
    sweep_t, sweep_lines, base = parts["sweep"]
    bullet = "\n".join
    return f"""
{SECTION}

```bash
python -m benchmarks.precision   # rewrites this section only ({seconds / 60:.1f} minutes for the run below)
```

{machine}

### Optimizer state

Bytes held in the optimizer state per parameter after two steps (every tensor: moments, quantisation
maps, block scales), `torch.optim.AdamW` against `LowBitOptimizer()` (embeddings, head and norms kept in
32-bit, as by default) and `LowBitOptimizer(keep_32bit=())`. bitsandbytes keeps tensors under 4096
values in 32-bit in both.

{state_t}

{bullet(f"- {line}" for line in state_lines)}

### Step time

The tiny GPT ({settings.sizes[0][0]}), {settings.time_warmup} untimed and {settings.time_steps} timed steps per
fit, arms interleaved. On CPU bitsandbytes' 8-bit step is plain torch code and the FP8 emulator
quantises in software under bf16 autocast: these ratios say what these paths cost on a CPU, not on a GPU.

{parts["time"]}

### Training like float32

d64-L2, {settings.loss_steps} steps, AdamW at the demo's schedule; seeds draw the initial weights.

{loss_t}

{bullet(f"- {line}" for line in loss_lines)}

### The emulator's cost

{parts["linear"]}

### Where narrower formats break

The same model and data, {settings.sweep_steps} steps, every linear layer that FP8 would take quantised
to the format (forward and gradients alike, except FP8's E4M3 / E5M2 pair), delayed scaling.
*Watching*: `FP8Precision(fallback=False, health_every_n_steps=10)`, which warns (`fp8_unhealthy`) when a
layer's overflow fraction passes 1% or its underflow fraction 50% in 3 samples in a row;
*with fallback*: the defaults, which switch such a layer to bf16 for 200 steps. Float32 ends at
{base:.3f}.

{sweep_t}

{bullet(f"- {line}" for line in sweep_lines) or "- No format fell behind float32 by more than 10%."}
"""


def run(settings: Settings, progress: Callable[[str], None]) -> dict[str, Any]:
    return {
        "state": state_table(settings, progress),
        "time": step_times(settings, progress),
        "loss": loss_parity(settings, progress),
        "linear": linear_overhead(settings),
        "sweep": sweep(settings, progress),
    }


def main(argv: list[str] | None = None) -> int:
    from benchmarks.__main__ import run_section

    return run_section(argv, "python -m benchmarks.precision", __doc__.splitlines()[0], SECTION, QUICK, FULL, run,
                       render_section)


if __name__ == "__main__":
    sys.exit(main())
