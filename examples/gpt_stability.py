"""Train a tiny GPT on CPU with the stability callbacks, inject a few faults, and show what was done.

    python examples/gpt_stability.py                 # about 15 seconds on a laptop CPU
    python examples/gpt_stability.py --no-faults     # a clean run: nothing to detect, nothing to undo
    python examples/gpt_stability.py --precision fp8-emulated+adamw8bit
    tensorboard --logdir runs/demo          # the curves; the Custom Scalars tab has the stability panels

Four callbacks watch the run: ``GradientSpikeGuard`` repairs or skips bad steps, ``SpectralMonitor``
tracks the singular spectrum of every weight (and names the remedy to opt into when a layer's top singular
value runs away), ``SoftmaxSaturationMonitor`` samples the output and attention softmaxes every 50 steps (it
clips q/k on runaway attention logits and advises on logit drift and collapse), ``InMemoryRollback`` keeps snapshots in
memory and goes back to the last good one when the state itself is corrupted. ``StabilityPanels`` lays their metrics out as TensorBoard panels and writes
the event timeline to TensorBoard's Text tab.
The run writes TensorBoard logs, ``stability_events.jsonl`` (the event log), after a rollback
``quarantine.json`` (the batches that were not replayed), and the stability report (``report.html``
with its plots, ``report.md``) under ``runs/demo``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_stability import (
    HALTED_EXIT_CODE,
    GradientSpikeGuard,
    InMemoryRollback,
    SoftmaxSaturationMonitor,
    SpectralMonitor,
    StabilityPanels,
    get_event_log,
    halt_report,
    resolve_precision,
)
from lightning_stability.demos import FaultInjector, TinyGPT, make_dataloader
from lightning_stability.report import write_report

# The faults the demo injects, by optimizer step: what a bad node, a bad batch or a bad kernel does.
FAULTS = {
    150: ("grad_scale", 1000.0),  # a 1000x gradient spike on every element
    260: ("grad_sparse", 300.0),  # 1% of the elements spike 300x
    380: ("grad_nan", None),  # a NaN in one gradient
    430: ("weight_nan", None),  # a NaN written into a weight: the state itself is corrupted
    470: ("labels_shuffle", None),  # a corrupted batch: random targets
    540: ("loss_nan", None),  # a batch whose loss is NaN
}
# Events that only say the callbacks are doing their routine work.
ROUTINE = ("snapshot", "snapshot_committed", "quarantine", "tor", "spectral_recovered")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--logdir", default="runs")
    parser.add_argument("--no-faults", action="store_true", help="train without injected faults")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="32-true", help="a precision flag: bf16-mixed, fp8, fp8-emulated, adamw8bit, fp8+adamw8bit, ... (lightning-stability doctor)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    pl.seed_everything(args.seed, verbose=False)
    loader, dataset = make_dataloader(block_size=64, batch_size=16, n_samples=16 * args.steps, seed=args.seed)
    model = TinyGPT(vocab_size=len(dataset.vocab), max_steps=args.steps)
    faults = {} if args.no_faults else {s: f for s, f in FAULTS.items() if s < args.steps}
    guard = GradientSpikeGuard()
    rollback = InMemoryRollback(every_n_steps=50, commit_after=10)
    spectral = SpectralMonitor(full_every_n_steps=200)  # sigma_max of every layer every step; full spectra too
    precision = resolve_precision(args.precision)  # {"precision": ..., "plugins": [...], "callbacks": [...]}
    trainer = pl.Trainer(
        max_steps=args.steps,
        logger=TensorBoardLogger(args.logdir, name="demo"),
        # the injector first, so the others see its faults; the panels last
        callbacks=[FaultInjector(faults), guard, spectral, SoftmaxSaturationMonitor(), rollback, StabilityPanels(),
                   *precision.pop("callbacks")],
        **precision,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, loader)
    elapsed = time.perf_counter() - start

    log = get_event_log(trainer)
    print(f"\nTrained {trainer.global_step} steps in {elapsed:.1f} s; final loss {float(trainer.callback_metrics['train/loss']):.3f}")
    print(f"Injected faults: {', '.join(f'{k} at step {s}' for s, (k, _) in faults.items()) or 'none'}")
    print("\nWhat the callbacks detected and did:")
    print(f"  {'step':>5}  {'detected':<18} {'severity':<9} {'action':<14} details")
    for e in log:
        if e.kind in ROUTINE:
            continue
        m = e.metrics
        if e.kind == "armed":
            details = f"baselines ready after {int(m['window'])} healthy steps"
        elif "grad_norm" in m:
            details = (
                f"grad norm {m['grad_norm']:.3g} (baseline {m['grad_baseline']:.3g}), "
                f"loss {m.get('loss', float('nan')):.3g} (baseline {m.get('loss_baseline', float('nan')):.3g}), "
                f"spiking elements {int(m['spike_count'])}"
            )
        elif e.kind == "rollback":
            details = (
                f"restored the snapshot of step {int(m['restored_step'])}: {int(m['lost_steps'])} steps undone, "
                f"{int(m['quarantined_batches'])} batches quarantined"
            )
        else:
            details = ", ".join(f"{k}={v:.3g}" for k, v in m.items())
        if e.target:
            details = f"layer {e.target}: {details}"
        print(f"  {e.step:>5}  {e.kind:<18} {e.severity:<9} {e.action or '-':<14} {details}")
    detections = [e for e in log if e.severity != "info" and e.source == guard.source]
    print(f"\n{len(detections)} detections for {len(faults)} injected faults; {len(rollback.rollbacks)} rollbacks; "
          f"the weights are finite: {all(bool(p.isfinite().all()) for p in model.parameters())}")
    print(f"Training Overhead Ratio {rollback.tor:.3f} ({rollback.lost_steps} steps lost of {trainer.global_step}); "
          f"snapshots hold {rollback.summary['snapshot_bytes'] / 2**20:.1f} MiB of host memory")
    print(f"TensorBoard logs and the event log: {trainer.log_dir}  (tensorboard --logdir {args.logdir})")
    html_path, _, _ = write_report(trainer.log_dir, os.path.join(trainer.log_dir, "report.html"))
    print(f"The stability report: {html_path} (and report.md beside it)")
    if (report := halt_report(trainer)) is not None:
        print(f"\nTraining was halted: {report}")
        return HALTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
