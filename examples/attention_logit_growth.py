"""Attention logit growth: flagged before the loss falls behind, and undone by QK-clip.

    python examples/attention_logit_growth.py             # four runs, under a minute on 2 CPU cores
    python examples/attention_logit_growth.py --seeds 3   # the same from three seeds

The demo's tiny GPT (2 layers, width 64, 4 heads, characters of a generated corpus) trained with
AdamW at a healthy learning rate (3e-2), except that the attention's input projection (``qkv``)
learns ten times faster: a mis-set per-layer learning rate, the way attention logits run away in
practice. Query and key weights grow, the attention logits ``q.k / sqrt(d)`` reach the hundreds, the
attention turns one-hot and the loss stalls far above a healthy run's. Runs from the same seed:

- ``reference``: everything at 3e-2 (the monitor watching, remedies off): what the loss should do;
- ``no remedy``: ``qkv`` at 10x, the monitor watching with its remedies off: when it flags
  ``attention_logit_growth`` (a layer's largest logit above 100) and when the loss falls behind;
- ``qk_clip``: the same with ``SoftmaxSaturationMonitor``'s default ladder for this detection: QK-clip
  (Megatron's rule, tau = 100; the flagged heads' query and key rows are scaled after each step so
  their largest logit lands on tau), then advice;
- ``attn_softcap``: the same with the attention soft-cap as the only rung (``50 tanh(x / 50)`` on every
  attention logit while it is on), a rung to opt into.

The monitor samples every 10 steps (``every_n_steps=10``; every step while a detection is active).
It prints, per run, the first flag, the step from which the loss stays more than 10% above the
reference's (its 20-step moving average), the lead time between the two, and the final loss, and
writes a plot to ``runs/attention_logit_growth/attention_logit_growth.png`` (with matplotlib).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_stability import SoftmaxSaturationMonitor, get_event_log, resolve_precision
from lightning_stability.demos import TinyGPT, make_dataloader, warmup_cosine

LR = 3e-2
QKV_LR_SCALE = 10.0
ARMS = ("reference", "no remedy", "qk_clip", "attn_softcap")
BEHIND = 1.10  # "fallen behind": the smoothed loss more than 10% above the reference's, for good
SMOOTH = 20


class FastQKV(TinyGPT):
    """The tiny GPT with its attention input projections at ``qkv_lr_scale`` times the learning rate."""

    def __init__(self, *args: Any, qkv_lr_scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.qkv_lr_scale = qkv_lr_scale

    def configure_optimizers(self) -> Any:
        hp: Any = self.hparams
        qkv = {id(block.attn.qkv.weight) for block in self.blocks}
        groups = [
            {"params": [p for p in self.parameters() if p.dim() >= 2 and id(p) not in qkv], "weight_decay": hp.weight_decay},
            {"params": [p for p in self.parameters() if p.dim() < 2], "weight_decay": 0.0},
            {"params": [b.attn.qkv.weight for b in self.blocks], "weight_decay": hp.weight_decay,
             "lr": hp.lr * self.qkv_lr_scale},
        ]
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=(0.9, 0.95))

        # the demo model's warmup and cosine decay
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, hp.warmup_steps, hp.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Recorder(pl.Callback):
    """The loss of every step and the monitor's largest attention logit at every sample."""

    def __init__(self, monitor: SoftmaxSaturationMonitor) -> None:
        self.monitor = monitor
        self.losses: list[float] = []
        self.max_logits: list[tuple[int, float]] = []
        self._seen: Any = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))
        stats = self.monitor.last_stats
        if stats is not self._seen:  # the monitor sampled this step (it runs before this callback)
            self._seen = stats
            logits = [v for k, v in stats.items() if k.endswith("/max_logit")]
            if logits:
                self.max_logits.append((trainer.global_step - 1, max(logits)))


def run(arm: str, steps: int, seed: int, root: str, precision: str = "32-true") -> dict[str, Any]:
    loader, dataset = make_dataloader(block_size=64, batch_size=16, n_samples=16 * steps)
    pl.seed_everything(seed, verbose=False)
    model = FastQKV(len(dataset.vocab), block_size=64, d_model=64, n_layer=2, n_head=4, lr=LR, warmup_steps=50,
                    max_steps=steps, qkv_lr_scale=1.0 if arm == "reference" else QKV_LR_SCALE)
    ladders = {
        "reference": (), "no remedy": (), "qk_clip": ("qk_clip", "advise"), "attn_softcap": ("attn_softcap",),
    }
    # the runs differ only by the attention_logit_growth ladder ("qk_clip" is its default): the other
    # detections are reported with their remedies off
    remedies = {"attention_logit_growth": ladders[arm], "attention_collapse": (), "softmax_collapse": (), "logit_drift": ()}
    monitor = SoftmaxSaturationMonitor(every_n_steps=10, remedies=remedies)
    recorder = Recorder(monitor)
    setup = resolve_precision(precision)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, callbacks=[monitor, recorder, *setup.pop("callbacks")],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, **setup,
    )
    start = time.perf_counter()
    trainer.fit(model, loader)
    events = [e for e in get_event_log(trainer) if e.source == monitor.source]
    return {
        "arm": arm,
        "seed": seed,
        "losses": recorder.losses,
        "max_logits": recorder.max_logits,
        "seconds": time.perf_counter() - start,
        "first_flag": next((e.step for e in events if e.kind == "attention_logit_growth"), None),
        "actions": sum(1 for e in events if e.kind == "qk_clip" or e.action == "attn_softcap"),
    }


def smoothed(losses: list[float]) -> list[float]:
    return [sum(losses[max(0, i - SMOOTH + 1) : i + 1]) / (i + 1 - max(0, i - SMOOTH + 1)) for i in range(len(losses))]


def behind_from(losses: list[float], reference: list[float]) -> int | None:
    """The first step from which the smoothed loss stays above ``BEHIND`` times the reference's."""
    ours, ref = smoothed(losses), smoothed(reference)
    step = None
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a <= BEHIND * b:
            step = None
        elif step is None:
            step = i
    return step


def plot(results: list[dict[str, Any]], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    colors = {"reference": "black", "no remedy": "tab:red", "qk_clip": "tab:blue", "attn_softcap": "tab:green"}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 5.4), sharex=True)
    for r in results:
        if r["seed"] != results[0]["seed"]:
            continue
        top.plot(smoothed(r["losses"]), color=colors[r["arm"]], lw=1.4, label=r["arm"])
        if r["first_flag"] is not None and r["arm"] == "no remedy":
            top.axvline(r["first_flag"], color="tab:red", ls=":", lw=1)
        steps, values = zip(*r["max_logits"]) if r["max_logits"] else ((), ())
        bottom.plot(steps, values, color=colors[r["arm"]], lw=1.2, marker=".", ms=3)
    bottom.axhline(100, color="grey", ls="--", lw=1)
    bottom.set_yscale("log")
    top.set_ylabel(f"training loss ({SMOOTH}-step mean)")
    bottom.set_ylabel("largest attention logit")
    bottom.set_xlabel("optimizer step")
    top.legend(fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=1, help="repeat every run from seeds 0 .. N-1")
    parser.add_argument("--out", default="runs/attention_logit_growth")
    parser.add_argument("--precision", default="32-true", help="a precision flag: bf16-mixed, fp8, fp8-emulated, adamw8bit, fp8+adamw8bit, ... (lightning-stability doctor)")
    args = parser.parse_args()
    for pattern in (".*does not have many workers.*", ".*LeafSpec.*", ".*runs attention as math.*", ".*add qk-norm.*"):
        warnings.filterwarnings("ignore", pattern)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    results = [run(arm, args.steps, seed, args.out, args.precision) for seed in range(args.seeds) for arm in ARMS]
    print(f"\nTiny GPT, LR {LR:g}, qkv at {QKV_LR_SCALE:g}x (reference: 1x), {args.steps} steps\n")
    print(f"{'seed':>4s} {'run':13s} {'flagged at':>10s} {'behind from':>11s} {'lead (steps)':>12s} "
          f"{'remedy events':>13s} {'final loss':>10s} {'vs reference':>12s} {'seconds':>8s}")
    for r in results:
        ref = next(x for x in results if x["arm"] == "reference" and x["seed"] == r["seed"])
        behind = behind_from(r["losses"], ref["losses"]) if r is not ref else None
        flag, final = r["first_flag"], smoothed(r["losses"])[-1]
        lead = "-" if flag is None or behind is None else str(behind - flag)
        print(f"{r['seed']:4d} {r['arm']:13s} {'-' if flag is None else flag:>10} {'-' if behind is None else behind:>11} "
              f"{lead:>12s} {r['actions']:13d} {final:10.3f} {final / smoothed(ref['losses'])[-1]:11.2f}x "
              f"{r['seconds']:8.1f}")
    path = os.path.join(args.out, "attention_logit_growth.png")
    if plot(results, path):
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
