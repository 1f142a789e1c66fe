"""The stability callbacks and a precision flag through LightningCLI and a YAML config.

    python examples/lightning_cli.py fit --config examples/lightning_cli.yaml
    python examples/lightning_cli.py fit --config examples/lightning_cli.yaml --precision fp8-emulated+adamw8bit
    python examples/lightning_cli.py fit --config examples/lightning_cli.yaml --trainer.max_steps=50

The callbacks are ordinary classes, so the config lists them under ``trainer.callbacks`` with their
arguments (``examples/lightning_cli.yaml``). ``--precision FLAG`` is this script's shortcut for
``lightning_stability.resolve_precision``: without it, write the same in the config
(``trainer.plugins: [{class_path: lightning_stability.FP8Precision}]`` and a ``LowBitOptimizer`` among the
callbacks; docs/precision.md).
"""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

from lightning_stability import HALTED_EXIT_CODE, halt_report, resolve_precision
from lightning_stability.demos import TinyGPT, make_dataloader


class CharData(pl.LightningDataModule):
    """The demo's generated character corpus."""

    def __init__(self, block_size: int = 64, batch_size: int = 16, n_samples: int = 16 * 300, seed: int = 0) -> None:
        super().__init__()
        self.loader, self.dataset = make_dataloader(block_size, batch_size, n_samples, seed)

    def train_dataloader(self) -> DataLoader:
        return self.loader


class StabilityCLI(LightningCLI):
    """LightningCLI with ``--precision FLAG``: its plugin goes to the trainer, its callbacks after the config's."""

    def __init__(self, *args: Any, precision_flag: str | None = None, **kwargs: Any) -> None:
        self.precision_setup = resolve_precision(precision_flag) if precision_flag else None
        defaults = dict(kwargs.pop("trainer_defaults", None) or {})
        if self.precision_setup is not None:
            defaults.update({k: v for k, v in self.precision_setup.items() if k != "callbacks"})
        super().__init__(*args, trainer_defaults=defaults, **kwargs)

    def before_fit(self) -> None:
        if self.precision_setup is not None:
            self.trainer.callbacks.extend(self.precision_setup["callbacks"])  # type: ignore[attr-defined]

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.dataset", "model.vocab_size", compute_fn=lambda ds: len(ds.vocab),
                              apply_on="instantiate")


def main(args: list[str] | None = None) -> StabilityCLI:
    args = list(sys.argv[1:] if args is None else args)
    flag = None
    for i, arg in enumerate(args):
        if arg == "--precision" and i + 1 < len(args):
            flag = args[i + 1]
            del args[i : i + 2]
            break
        if arg.startswith("--precision="):
            flag = arg.split("=", 1)[1]
            del args[i]
            break
    return StabilityCLI(TinyGPT, CharData, args=args, precision_flag=flag, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    cli = main()
    # a halt (on_halt="stop") ends fit like a finished run: say so in the exit code
    sys.exit(HALTED_EXIT_CODE if cli.trainer is not None and halt_report(cli.trainer) is not None else 0)
