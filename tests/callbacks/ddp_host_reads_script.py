"""Run by test_host_reads.py as its own program: Lightning's DDP launcher re-executes this file per rank.

Each rank counts the package's host reads per step with every stability callback at its defaults,
on Hugging Face GPT-2, and reports the counts of its quiet steps."""

from __future__ import annotations

import json
import sys
import warnings

import lightning.pytorch as pl

from tests.callbacks._host_reads import Clock, CountReads, Monitors
from tests.clients.models import Client, loader

STEPS = 40


def main(out: str) -> None:
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    monitors = Monitors()
    with CountReads() as reads:
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=STEPS, logger=False,
                             callbacks=[Clock(reads), *monitors.callbacks()], default_root_dir=out,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(Client("gpt2", max_steps=STEPS), loader("gpt2", "dict", n=16 * STEPS))
    quiet = monitors.quiet_steps(trainer, STEPS)
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as fh:
        json.dump({"reads": {str(s): reads.by_step[s] for s in quiet},
                   "callers": sorted({c for s in quiet for c in reads.callers.get(s, [])}),
                   "where": [list(k) + [n] for k, n in reads.where.most_common(5)]}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
