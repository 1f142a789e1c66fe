"""Noisy but training: do the monitors at their defaults leave alone a run that is noisy but still
trains? Small language models at 1x to 100x their stable learning rate, no fault injected, with no
callbacks and with all four monitors, every fit seeded alike in both arms.

    python -m benchmarks.noisy            # rewrites the Noisy but training section of docs/benchmarks.md
    python -m benchmarks.noisy --llama    # the same with a third model, a tiny Llama (half again as long)
    python -m benchmarks.noisy --quick    # the CI smoke test: a few steps, all three models, writes nothing

The fits run in a process pool, one worker per ``OMP_NUM_THREADS`` threads (1 if unset) of the cores
this process may use.
"""

from __future__ import annotations

import inspect
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_stability import (
    GradientSpikeGuard,
    InMemoryRollback,
    SoftmaxSaturationMonitor,
    SpectralMonitor,
    get_event_log,
    halt_report,
)
from lightning_stability.demos import CharDataset, TinyGPT, generate_corpus, warmup_cosine

SECTION = "## Noisy but training"
# "nudged": no callbacks, every gradient of one step (NUDGE_AT of the run) times 1 + NUDGE: a change
# that does nothing in principle, measuring how far chaos alone moves a noisy run's end (the floor of
# what a ratio can tell)
ARMS = ("no callbacks", "all monitors", "nudged")
NUDGE, NUDGE_AT = 1e-6, 1 / 3
GOAL_RATIO = 1.02  # the monitors' final evaluation loss at most 1.02x the unguarded one's
# the stable learning rates: TinyGPT's is the demo's (TinyGPT's default); the two Hugging Face models
# train cleanly at 1e-3 with the same recipe. A cautious choice: measured with no callbacks (seed 0, 300
# steps), 3e-3 trains them further (GPT-2's held-out loss 0.73 at 3e-3, 1.60 at 1e-3, 2.06 at 3e-4;
# Llama's 0.28, 0.51, 1.81), so their 10x is about TinyGPT's 3x.
STABLE_LR = {"TinyGPT": float(inspect.signature(TinyGPT).parameters["lr"].default), "GPT-2 (HF)": 1e-3,
             "Llama (HF)": 1e-3}
MODELS = tuple(STABLE_LR)
DEFAULT_MODELS = MODELS[:2]  # Llama (``--llama``) adds half again to the run's time
BATCH_FORMAT = {"TinyGPT": "dict", "GPT-2 (HF)": "tuple", "Llama (HF)": "HF dict"}
# events that say a callback did its routine work, or names an opt-in remedy, not that it acted on the run
ROUTINE = {"armed", "snapshot", "snapshot_committed", "snapshot_discarded", "snapshot_skipped", "tor",
           "quarantine", "recovered", "spectral_recovered", "softmax_recovered", "no_head", "advice",
           "spectral_advice"}


@dataclass(frozen=True)
class Settings:
    steps: int
    seeds: tuple[int, ...]
    multiples: tuple[float, ...]  # of each model's stable learning rate
    models: tuple[str, ...]
    d_model: int
    n_layer: int
    n_head: int
    block: int
    batch: int
    warmup_steps: int  # of the learning rate, linear, then cosine to 10% (the demo's schedule)
    eval_batches: int  # held-out batches of ``batch`` sequences
    parallel: bool


FULL = Settings(steps=300, seeds=(0, 1, 2), multiples=(1, 10, 30, 100), models=DEFAULT_MODELS, d_model=64, n_layer=2,
                n_head=4, block=64, batch=16, warmup_steps=20, eval_batches=8, parallel=True)
QUICK = Settings(steps=3, seeds=(0,), multiples=(1,), models=MODELS, d_model=16, n_layer=1, n_head=2, block=8,
                 batch=2, warmup_steps=2, eval_batches=1, parallel=False)


# -- the models -----------------------------------------------------------------------------------


def _configure_adamw(module: nn.Module, lr: float, warmup_steps: int, max_steps: int) -> Any:
    """TinyGPT's recipe for every model: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), the
    demo's warm-up then cosine schedule."""
    decay = [p for p in module.parameters() if p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, warmup_steps, max_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class HFCausalLM(pl.LightningModule):
    """A Hugging Face causal LM, randomly initialised from a tiny config (nothing downloaded), trained as
    a user would wrap one: GPT-2 on ``(input_ids, targets)`` tuples with the loss computed here, Llama on
    ``{"input_ids", "attention_mask", "labels"}`` dicts with the model's own (shifted) loss."""

    def __init__(self, arch: str, vocab_size: int, block: int, d_model: int, n_layer: int, n_head: int,
                 lr: float, warmup_steps: int, max_steps: int) -> None:
        super().__init__()
        import transformers

        self.arch, self.lr, self.warmup_steps, self.max_steps = arch, lr, warmup_steps, max_steps
        if arch == "gpt2":
            config: Any = transformers.GPT2Config(vocab_size=vocab_size, n_positions=block, n_embd=d_model,
                                                  n_layer=n_layer, n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                                  attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
            self.model = transformers.GPT2LMHeadModel(config)
        elif arch == "llama":
            config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=d_model,
                                              intermediate_size=2 * d_model, num_hidden_layers=n_layer,
                                              num_attention_heads=n_head, num_key_value_heads=max(1, n_head // 2),
                                              max_position_embeddings=block, tie_word_embeddings=False,
                                              bos_token_id=None, eos_token_id=None)
            self.model = transformers.LlamaForCausalLM(config)
        else:
            raise ValueError(f"HFCausalLM(arch={arch!r}): expected 'gpt2' or 'llama'")

    def loss(self, batch: Any) -> Tensor:
        if isinstance(batch, Mapping):
            return self.model(**batch).loss
        input_ids, targets = batch
        logits = self.model(input_ids=input_ids).logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss)
        return loss

    @override
    def configure_optimizers(self) -> Any:
        return _configure_adamw(self, self.lr, self.warmup_steps, self.max_steps)


def _tuple_batches(items: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
    return torch.stack([x["input_ids"] for x in items]), torch.stack([x["targets"] for x in items])


def _hf_batches(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    input_ids = torch.stack([x["input_ids"] for x in items])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


_COLLATE: dict[str, Callable[[list[dict[str, Tensor]]], Any] | None] = {
    "dict": None, "tuple": _tuple_batches, "HF dict": _hf_batches,
}


def datasets(settings: Settings) -> tuple[CharDataset, CharDataset]:
    """The training windows (the demo corpus) and held-out windows of another seed's corpus."""
    train = CharDataset(generate_corpus(seed=0), block_size=settings.block,
                        n_samples=settings.batch * settings.steps, seed=0)
    held_out = CharDataset(generate_corpus(seed=1), block_size=settings.block,
                           n_samples=settings.batch * settings.eval_batches, seed=1)
    if held_out.vocab != train.vocab:  # the grammar's characters: every corpus of 4000 sentences has them all
        raise RuntimeError("the held-out corpus has another character set than the training corpus")
    return train, held_out


def build_model(name: str, vocab_size: int, lr: float, settings: Settings) -> pl.LightningModule:
    shape = {"block": settings.block, "d_model": settings.d_model, "n_layer": settings.n_layer,
             "n_head": settings.n_head}
    if name == "TinyGPT":
        return TinyGPT(vocab_size, block_size=settings.block, d_model=settings.d_model, n_layer=settings.n_layer,
                       n_head=settings.n_head, lr=lr, warmup_steps=settings.warmup_steps, max_steps=settings.steps)
    arch = {"GPT-2 (HF)": "gpt2", "Llama (HF)": "llama"}[name]
    return HFCausalLM(arch, vocab_size, lr=lr, warmup_steps=settings.warmup_steps, max_steps=settings.steps, **shape)


@torch.no_grad()
def evaluation_loss(model: pl.LightningModule, loader: Iterable[Any]) -> float:
    """The mean loss over the held-out batches, in eval mode; ``nan`` when any is not finite."""
    model.eval()
    losses = []
    for batch in loader:
        if isinstance(model, HFCausalLM):
            loss = model.loss(batch)
        else:
            logits = model(batch["input_ids"])
            loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
        losses.append(float(loss))
    model.train()
    mean = statistics.fmean(losses)
    return mean if math.isfinite(mean) else math.nan


def monitors() -> list[Callback]:
    return [GradientSpikeGuard(), SpectralMonitor(), SoftmaxSaturationMonitor(), InMemoryRollback()]


class _Nudge(Callback):
    """Every gradient of optimizer step ``step`` times ``1 + eps``."""

    def __init__(self, step: int, eps: float) -> None:
        self.step, self.eps = step, eps

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                for p in pl_module.parameters():
                    if p.grad is not None:
                        p.grad.mul_(1.0 + self.eps)


class _TrainLoss(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))  # a host sync a step: these fits are not timed


# -- one fit ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """What the event log holds for one (source, kind, action): how often, first and last step."""

    source: str
    kind: str
    action: str | None
    count: int
    first: int
    last: int
    info: bool = False

    @property
    def label(self) -> str:
        """The intervention's name in the table: a detection's action (or its kind where it took none);
        an info event that carries an action is one application of a remedy already on (``qk_clip``
        after each step, per layer)."""
        return f"{self.action} applied" if self.info and self.action else self.action or self.kind

    def describe(self) -> str:
        what = f"{self.kind} -> {self.action}" if self.action else self.kind
        steps = f"step {self.first}" if self.first == self.last else f"steps {self.first}-{self.last}"
        return f"{self.source} {what} x{self.count} ({steps})"


@dataclass(frozen=True)
class Fit:
    model: str
    multiple: float
    lr: float
    seed: int
    arm: str
    eval_loss: float  # nan: not finite
    steps: int  # optimizer steps taken
    halted: bool  # stopped before its last step, or a halt event
    train_tail: float  # mean of the last 20 training losses (nan if any is not finite)
    actions: tuple[Action, ...] = field(default=())
    seconds: float = 0.0

    @property
    def finite(self) -> bool:
        return math.isfinite(self.eval_loss)

    def interventions(self) -> Counter[str]:
        """Counts by intervention: the action taken (``clip``, ``skip``, ...), else the event's kind."""
        counts: Counter[str] = Counter()
        for a in self.actions:
            counts[a.label] += a.count
        return counts


def _sum_counters(counters: Iterable[Counter[str]]) -> Counter[str]:
    total: Counter[str] = Counter()
    for c in counters:
        total.update(c)
    return total


def summarise_events(events: Iterable[Any]) -> tuple[Action, ...]:
    """The events that are not routine, grouped by (source, kind, action), in order of first step."""
    groups: dict[tuple[str, str, str | None], list[int]] = {}
    for e in events:
        if e.kind in ROUTINE or (e.severity == "info" and e.action is None):
            continue
        groups.setdefault((e.source, e.kind, e.action, e.severity == "info"), []).append(e.step)
    actions = [Action(s, k, a, len(steps), min(steps), max(steps), info)
               for (s, k, a, info), steps in groups.items()]
    return tuple(sorted(actions, key=lambda a: (a.first, a.source, a.kind)))


def fit(model_name: str, multiple: float, seed: int, arm: str, settings: Settings) -> Fit:
    start = time.perf_counter()
    lr = STABLE_LR[model_name] * multiple
    train, held_out = datasets(settings)
    collate = _COLLATE[BATCH_FORMAT[model_name]]
    loader = DataLoader(train, batch_size=settings.batch, shuffle=False, collate_fn=collate)
    eval_loader = DataLoader(held_out, batch_size=settings.batch, shuffle=False, collate_fn=collate)
    pl.seed_everything(seed, verbose=False)  # the initial weights; the data order is fixed (no shuffle)
    model = build_model(model_name, len(train.vocab), lr, settings)
    recorder = _TrainLoss()
    callbacks: list[Callback] = [recorder, *(monitors() if arm == ARMS[1] else [])]
    if arm == ARMS[2]:
        callbacks.append(_Nudge(int(settings.steps * NUDGE_AT), NUDGE))
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=settings.steps, default_root_dir=root,
                             callbacks=callbacks, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, loader)
        log = list(get_event_log(trainer))
        halted = (trainer.global_step < settings.steps or halt_report(trainer) is not None
                  or any(e.action == "halt" for e in log))
        steps = trainer.global_step
    tail = recorder.losses[-20:]
    train_tail = statistics.fmean(tail) if tail and all(math.isfinite(x) for x in tail) else math.nan
    return Fit(model_name, multiple, lr, seed, arm, evaluation_loss(model, eval_loader), steps, halted, train_tail,
               summarise_events(log), time.perf_counter() - start)


def _fit_job(args: tuple[str, float, int, str, Settings, int]) -> Fit:
    *job, threads = args
    torch.set_num_threads(threads)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    return fit(*job)  # type: ignore[arg-type]


def pool_shape(cores: int, omp_threads: str | None) -> tuple[int, int]:
    """(workers, threads per worker): ``OMP_NUM_THREADS`` threads a worker (1 if unset or not a positive
    int), as many workers as fit in the cores (at least one)."""
    try:
        threads = max(1, int(omp_threads)) if omp_threads else 1
    except ValueError:
        threads = 1
    threads = min(threads, max(1, cores))
    return max(1, cores // threads), threads


def run(settings: Settings, progress: Callable[[str], None]) -> dict[str, Any]:
    from benchmarks.__main__ import available_cores, load_average

    load_before = load_average()

    jobs = [(m, x, s, a) for m in settings.models for x in settings.multiples for s in settings.seeds for a in ARMS]
    # the longest fits first (the monitors' arm, the Hugging Face models), so no worker idles at the end
    jobs.sort(key=lambda j: (j[3] != ARMS[1], j[0] == "TinyGPT"))
    workers, threads = pool_shape(available_cores(), os.environ.get("OMP_NUM_THREADS"))
    if not settings.parallel:
        workers = 1
    progress(f"noisy but training: {len(jobs)} fits of {settings.steps} steps, {workers} workers x {threads} threads")
    start = time.perf_counter()
    fits: list[Fit] = []
    if workers == 1:
        for job in jobs:
            fits.append(_fit_job((*job, settings, threads)))
            _progress_fit(fits[-1], progress)
    else:
        # spawn, not fork: each worker gets a fresh torch (a forked one inherits the parent's thread pools)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for f in pool.map(_fit_job, [(*job, settings, threads) for job in jobs]):
                fits.append(f)
                _progress_fit(f, progress)
    return {"fits": fits, "workers": workers, "threads": threads, "seconds": time.perf_counter() - start,
            "load": (load_before, load_average())}


def _progress_fit(f: Fit, progress: Callable[[str], None]) -> None:
    did = ", ".join(f"{k} {n}" for k, n in sorted(f.interventions().items())) or "nothing"
    progress(f"  {f.model} {f.multiple:g}x seed {f.seed} {f.arm}: eval {f.eval_loss:.4f}, "
             f"{'halted at step ' + str(f.steps) if f.halted else 'finished'}; {did} ({f.seconds:.1f} s)")


# -- the figures --------------------------------------------------------------------------------


def seed_ratio(unguarded: float, guarded: float) -> float | None:
    """The monitors' evaluation loss over the unguarded one's for one seed: ``inf`` when only the
    unguarded run ended finite (the monitors made it worse than any ratio), ``None`` when the unguarded
    run did not end finite (nothing to do harm to)."""
    if not math.isfinite(unguarded):
        return None
    if not math.isfinite(guarded):
        return math.inf
    return guarded / unguarded


@dataclass(frozen=True)
class Row:
    model: str
    multiple: float
    lr: float
    unguarded: tuple[float, ...]  # evaluation losses by seed
    guarded: tuple[float, ...]
    ratios: tuple[float | None, ...]
    halted: tuple[bool, ...]  # the monitors' runs
    interventions: Counter[str]
    actions: tuple[tuple[Action, ...], ...]  # the monitors' runs, by seed
    nudged: tuple[float | None, ...] = ()  # the nudged run over the unguarded one, by seed (where run)

    @property
    def unguarded_finite(self) -> int:
        return sum(math.isfinite(x) for x in self.unguarded)

    @property
    def ratio_mean(self) -> float | None:
        known = [r for r in self.ratios if r is not None]
        return statistics.fmean(known) if known else None

    @property
    def ratio_worst(self) -> float | None:
        known = [r for r in self.ratios if r is not None]
        return max(known) if known else None

    @property
    def nudged_worst(self) -> float | None:
        known = [r for r in self.nudged if r is not None]
        return max(known) if known else None

    @property
    def worse(self) -> bool:
        """Some seed's monitored run ended worse than ``GOAL_RATIO`` times its unguarded run."""
        return any(r is not None and r > GOAL_RATIO for r in self.ratios)

    @property
    def needless_halts(self) -> int:
        """Monitored runs halted where the unguarded run of the seed ended finite."""
        return sum(h and math.isfinite(u) for h, u in zip(self.halted, self.unguarded))

    @property
    def met(self) -> bool:
        return not self.worse and self.needless_halts == 0


def rows(fits: Sequence[Fit]) -> list[Row]:
    """One row per (model, multiple), seeds matched between the arms."""
    by = {(f.model, f.multiple, f.seed, f.arm): f for f in fits}
    keys = sorted({(f.model, f.multiple) for f in fits}, key=lambda k: (MODELS.index(k[0]) if k[0] in MODELS
                                                                         else len(MODELS), k[0], k[1]))
    out = []
    for model, multiple in keys:
        seeds = sorted({f.seed for f in fits if (f.model, f.multiple) == (model, multiple)})
        none = [by[(model, multiple, s, ARMS[0])] for s in seeds]
        ours = [by[(model, multiple, s, ARMS[1])] for s in seeds]
        nudged = [by.get((model, multiple, s, ARMS[2])) for s in seeds]
        out.append(Row(
            model, multiple, ours[0].lr,
            tuple(f.eval_loss for f in none), tuple(f.eval_loss for f in ours),
            tuple(seed_ratio(n.eval_loss, o.eval_loss) for n, o in zip(none, ours)),
            tuple(f.halted for f in ours),
            _sum_counters(f.interventions() for f in ours), tuple(f.actions for f in ours),
            tuple(seed_ratio(n.eval_loss, d.eval_loss) if d is not None else None for n, d in zip(none, nudged)),
        ))
    return out


def _loss(values: Sequence[float]) -> str:
    finite = [x for x in values if math.isfinite(x)]
    if not finite:
        return "NaN"
    text = f"{statistics.fmean(finite):.3f}"
    return text if len(finite) == len(values) else f"{text} ({len(values) - len(finite)} NaN)"


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return "NaN" if math.isinf(value) else f"{value:.3f}x"


def table(result_rows: Sequence[Row]) -> str:
    lines = ["| model | LR | none: eval loss | monitors: eval loss | ratio mean | ratio worst | nudged: ratio worst "
             "| halted | interventions (all seeds) | unguarded finite | goals |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in result_rows:
        did = ", ".join(f"{k} {n}" for k, n in sorted(r.interventions.items(), key=lambda kv: (-kv[1], kv[0])))
        goals = "met" if r.met else "NOT met: " + "; ".join(
            ([f"worse than {GOAL_RATIO:g}x"] if r.worse else [])
            + ([f"{r.needless_halts} needless halt(s)"] if r.needless_halts else []))
        lines.append(
            f"| {r.model} | {r.multiple:g}x ({r.lr:g}) | {_loss(r.unguarded)} | {_loss(r.guarded)} "
            f"| {_ratio(r.ratio_mean)} | {_ratio(r.ratio_worst)} | {_ratio(r.nudged_worst)} | {sum(r.halted)}/{len(r.halted)} "
            f"| {did or 'none'} | {r.unguarded_finite}/{len(r.unguarded)} | {goals} |")
    return "\n".join(lines)


def goal_lines(result_rows: Sequence[Row]) -> list[str]:
    """The two goals, judged over every (model, LR, seed) whose unguarded run ended finite."""
    pairs = [(r, i) for r in result_rows for i, x in enumerate(r.ratios) if x is not None]
    worst = max(pairs, key=lambda p: p[0].ratios[p[1]] or 0.0, default=None)
    worse = [(r, i) for r, i in pairs if (r.ratios[i] or 0.0) > GOAL_RATIO]
    if worst is None:
        first = f"never worse than {GOAL_RATIO:g}x no callbacks: no unguarded run ended finite, nothing to judge"
    else:
        r, i = worst
        where = f"{r.model} {r.multiple:g}x, seed {i}"
        verdict = "met" if not worse else f"NOT met ({len(worse)} of {len(pairs)} runs worse)"
        first = (f"never worse than {GOAL_RATIO:g}x no callbacks: {verdict}; worst ratio "
                 f"{_ratio(r.ratios[i])} ({where}), over {len(pairs)} runs whose unguarded run ended finite")
    floor = [(x, r, i) for r in result_rows for i, x in enumerate(r.nudged) if x is not None]
    if floor:
        x, r, i = max(floor, key=lambda t: t[0])
        first += (f"; the nudged control (every gradient of one step times 1 + {NUDGE:g}, no callbacks) ends up "
                  f"to {_ratio(x)} the unguarded run ({r.model} {r.multiple:g}x, seed {i}): chaos alone moves a "
                  "run's end that far")
    halts = sum(r.needless_halts for r in result_rows)
    all_halts = sum(sum(r.halted) for r in result_rows)
    second = (f"never halted where the unguarded run finishes finite: {'met' if halts == 0 else 'NOT met'}; "
              f"{halts} such halts of {len(pairs)} runs ({all_halts} halts in all)")
    return [first, second]


def diverged_lines(result_rows: Sequence[Row]) -> list[str]:
    """Where an unguarded run did not end finite: what the monitored run of that seed did."""
    lines = []
    for r in result_rows:
        for i, (u, g) in enumerate(zip(r.unguarded, r.guarded)):
            if math.isfinite(u):
                continue
            outcome = (f"halted, evaluation loss {g:.3f}" if r.halted[i] and math.isfinite(g) else "halted, NaN"
                       if r.halted[i] else f"finished, evaluation loss {g:.3f}" if math.isfinite(g) else
                       "finished with a NaN evaluation loss")
            did = "; ".join(a.describe() for a in r.actions[i]) or "no intervention"
            lines.append(f"{r.model} {r.multiple:g}x, seed {i}: the unguarded run ended NaN; with the monitors: "
                         f"{outcome}. {did}")
    return lines


def miss_lines(result_rows: Sequence[Row]) -> list[str]:
    """For every (model, LR) that misses a goal: the worst seed's event log, grouped."""
    lines = []
    for r in result_rows:
        if r.met:
            continue
        known = [(x if x is not None else -1.0, i) for i, x in enumerate(r.ratios)]
        needless = [i for i, (h, u) in enumerate(zip(r.halted, r.unguarded)) if h and math.isfinite(u)]
        i = needless[0] if needless else max(known)[1]
        did = "; ".join(a.describe() for a in r.actions[i]) or "no intervention"
        lines.append(f"{r.model} {r.multiple:g}x, seed {i} (ratio {_ratio(r.ratios[i])}"
                     f"{', halted' if r.halted[i] else ''}): {did}")
    return lines


# -- the section --------------------------------------------------------------------------------

# What the event logs of the measured run say about each (model, multiple) that missed a goal, with the
# ablations run to tell the callbacks apart (the same seed with the guard alone, and with the other three
# alone). Shown only for a configuration that misses a goal in the run rendered.
COMMAND = "python -m benchmarks.noisy"


def command(settings: Settings) -> str:
    return COMMAND + (" --llama" if "Llama (HF)" in settings.models and settings is not QUICK else "")


def render_section(settings: Settings, result: dict[str, Any], seconds: float, machine: str) -> str:
    result_rows = rows(result["fits"])
    goals = "\n".join(f"- {line}." for line in goal_lines(result_rows))
    diverged = "\n".join(f"- {line}." for line in diverged_lines(result_rows)) or "- None."
    misses = "\n".join(f"- {line}." for line in miss_lines(result_rows)) or "- None: every configuration met both."
    stable = ", ".join(f"{m} {STABLE_LR[m]:g}" for m in settings.models)
    llama = ("; Hugging Face's `LlamaForCausalLM` (2 key-value heads, untied head; dict batches with "
             "`input_ids`, `attention_mask`, `labels` and the model's own loss)" if "Llama (HF)" in settings.models
             else f" (`{COMMAND} --llama` adds a tiny Llama, at half again the run's time)")
    multiples = ", ".join(f"{x:g}x" for x in settings.multiples)
    return f"""
{SECTION}

```bash
{command(settings)}   # rewrites this section only ({seconds / 60:.1f} minutes for the run below)
```

{machine} {result['workers']} fits at a time, {result['threads']} thread each (`OMP_NUM_THREADS`); 1-minute
load average before / after: {" / ".join(map(str, result.get("load", ("?", "?"))))} (a load above the core count
means other processes shared the cores, and the run took longer than it would on an idle machine).

Do the monitors do harm to a run that is noisy but still trains? No fault is injected: the noise is a
learning rate {multiples} each model's stable one ({stable}). Models, each d_model {settings.d_model},
{settings.n_layer} layers, {settings.n_head} heads, on the demo corpus ({settings.batch} x {settings.block}
characters a batch, {settings.steps} steps): the project's `TinyGPT` (dict batches); Hugging Face's
`GPT2LMHeadModel` from a random-init config (dropout 0, tied head; tuple batches `(input_ids, targets)`,
the loss computed in the LightningModule){llama}. Every model:
AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), {settings.warmup_steps} warm-up steps, then the
demo's cosine to 10%. Arms: no callbacks; `GradientSpikeGuard()`, `SpectralMonitor()`,
`SoftmaxSaturationMonitor()`, `InMemoryRollback()` at their defaults; and a control, `nudged`: no
callbacks, every gradient of step {int(settings.steps * NUDGE_AT)} multiplied by 1 + {NUDGE:g}, a change that does
nothing in principle, so its ratio to the unguarded run is how far chaos alone moves where a noisy run
ends (the floor under which a ratio says nothing about the callbacks). Seeds {", ".join(map(str, settings.seeds))}
draw the initial weights, the same in both arms; the data order is fixed. `eval loss`: the mean loss on
{settings.eval_batches} held-out batches (windows of another seed's corpus, the same for every run),
after the fit (from the halt's weights for a halted run), mean over seeds (a NaN is counted apart).
`ratio`: monitors over no callbacks, per seed, then its mean and worst over the seeds whose unguarded run
ended finite (NaN: the monitored run ended NaN where the unguarded one did not). `halted`: monitored runs
that stopped before step {settings.steps} or logged a halt. `interventions`: the monitors' non-routine
events over the seeds, by the action taken (or by kind where none was).

{table(result_rows)}

{goals}

Where the unguarded run did not end finite, what the monitors did:

{diverged}

Where a configuration misses a goal, the event log of its worst seed (source, detection -> action,
count, steps):

{misses}
"""


def main(argv: list[str] | None = None) -> int:
    from benchmarks.__main__ import run_section

    argv = list(sys.argv[1:] if argv is None else argv)
    full = FULL
    if "--llama" in argv:  # the third model: not in the default run, which it would make half again as long
        argv.remove("--llama")
        full = replace(FULL, models=MODELS)
    return run_section(argv, COMMAND, __doc__.splitlines()[0], SECTION, QUICK, full, run, render_section)


if __name__ == "__main__":
    sys.exit(main())
