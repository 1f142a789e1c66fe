"""A tiny GPT, a generated text corpus and a fault injector, for the demo, tests and benchmarks.

Everything here runs offline on a laptop CPU. Like ``lightning.pytorch.demos``, it is shipped with the
package so examples, tests and benchmarks train the same model.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

_SUBJECTS = ["the cat", "a dog", "the old sailor", "my sister", "the robot", "a small bird", "the teacher",
             "our neighbour", "the king", "a tired student"]
_VERBS = ["sees", "likes", "paints", "follows", "builds", "finds", "remembers", "carries", "hears", "counts"]
_OBJECTS = ["the red house", "a green apple", "the river", "seven stones", "the moon", "a long letter",
            "the market", "an empty box", "the garden", "three candles"]
_TAILS = ["at dawn", "in the rain", "without a word", "near the bridge", "every morning", "with care", "", ""]


def generate_corpus(n_sentences: int = 4000, seed: int = 0) -> str:
    """Sentences from a small seeded grammar: structured enough to learn, varied enough not to be trivial."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_TAILS)]
        lines.append(" ".join(w for w in words if w) + ".")
    return "\n".join(lines) + "\n"


class CharDataset(Dataset):
    """Windows of ``block_size + 1`` characters at seeded offsets; items carry their index."""

    def __init__(self, text: str, block_size: int = 64, n_samples: int = 4096, seed: int = 0) -> None:
        self.vocab = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.vocab)}
        self.data = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        self.block_size = block_size
        g = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(0, len(self.data) - block_size - 1, (n_samples,), generator=g)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        start = int(self.offsets[index])
        chunk = self.data[start : start + self.block_size + 1]
        return {"input_ids": chunk[:-1], "targets": chunk[1:], "index": torch.tensor(index)}

    def decode(self, ids: Tensor) -> str:
        return "".join(self.vocab[int(i)] for i in ids)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # (B, H, T, D)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def warmup_cosine(step: int, warmup_steps: int, max_steps: int) -> float:
    """The learning-rate factor of the tiny GPT: linear warmup, then cosine decay to 10%."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class TinyGPT(pl.LightningModule):
    """A GPT-style character model: token and position embeddings, pre-LN blocks, an ``lm_head``."""

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 64,
        d_model: int = 64,
        n_layer: int = 2,
        n_head: int = 4,
        lr: float = 3e-3,
        warmup_steps: int = 20,
        max_steps: int = 1000,
        optimizer: str = "adamw",
        weight_decay: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        t = input_ids.shape[1]
        x = self.tok_emb(input_ids) + self.pos_emb(torch.arange(t, device=input_ids.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, V)

    @override
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["input_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @override
    def configure_optimizers(self) -> Any:
        hp: Any = self.hparams
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.named_parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if hp.optimizer == "adamw":
            opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=(0.9, 0.95))
        elif hp.optimizer == "adamw8bit":
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(groups, lr=hp.lr, betas=(0.9, 0.95))
        elif hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=0.9)
        else:
            raise ValueError(f"TinyGPT(optimizer={hp.optimizer!r}): expected 'adamw', 'adamw8bit' or 'sgd'")

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, hp.warmup_steps, hp.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def make_dataloader(
    block_size: int = 64, batch_size: int = 16, n_samples: int = 4096, seed: int = 0, shuffle: bool = False
) -> tuple[DataLoader, CharDataset]:
    dataset = CharDataset(generate_corpus(seed=seed), block_size=block_size, n_samples=n_samples, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle), dataset


class FaultInjector(pl.Callback):
    """Injects known faults at given optimizer steps, for demos, tests and benchmarks.

    ``faults`` maps an optimizer step (``trainer.global_step`` when it happens) to one of:

    - ``("grad_scale", factor)``: multiply every gradient by ``factor``;
    - ``("grad_sparse", factor)``: multiply 1% of the elements of every gradient by ``factor``;
    - ``("grad_nan", None)``: put a NaN into one gradient;
    - ``("loss_nan", None)``: make the batch produce a NaN loss (its inputs hit a NaN embedding row);
    - ``("labels_shuffle", None)``: replace the batch's targets by random tokens (a corrupted batch);
    - ``("weight_nan", None)``: write a NaN into a weight before the step's forward (corrupted state:
      every later loss is NaN until the weight is restored).

    Place it before the guard in ``callbacks`` so the guard sees the fault.
    """

    GRAD_KINDS = ("grad_scale", "grad_sparse", "grad_nan")
    BATCH_KINDS = ("loss_nan", "labels_shuffle", "weight_nan")

    def __init__(self, faults: Mapping[int, tuple[str, float | None]], seed: int = 0) -> None:
        for step, (kind, _) in faults.items():
            if kind not in self.GRAD_KINDS + self.BATCH_KINDS:
                raise ValueError(
                    f"FaultInjector(faults[{step}]={kind!r}): expected one of {list(self.GRAD_KINDS + self.BATCH_KINDS)}"
                )
        self.faults = dict(faults)
        self.seed = seed
        self.injected: list[tuple[int, str]] = []
        self._nan_hook: Any = None

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        fault = self.faults.get(trainer.global_step)
        if fault is None or fault[0] not in self.BATCH_KINDS:
            return
        if fault[0] == "labels_shuffle":
            g = torch.Generator().manual_seed(self.seed + trainer.global_step)
            vocab = int(batch["targets"].max()) + 1
            batch["targets"].copy_(torch.randint(0, vocab, batch["targets"].shape, generator=g))
        elif fault[0] == "weight_nan":
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")
        else:
            # a NaN loss for this batch only: the model's output is poisoned until the batch ends
            # (under DDP the module's forward runs training_step: its output may be a dict of tensors)
            self._nan_hook = pl_module.register_forward_hook(
                lambda m, a, out: apply_to_collection(out, Tensor, lambda t: t + float("nan") if t.is_floating_point() else t))
        self.injected.append((trainer.global_step, fault[0]))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._nan_hook is not None:
            self._nan_hook.remove()
            self._nan_hook = None

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        fault = self.faults.get(trainer.global_step)
        if fault is None or fault[0] not in self.GRAD_KINDS:
            return
        kind, factor = fault
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        g = torch.Generator().manual_seed(self.seed + trainer.global_step)
        with torch.no_grad():
            for grad in grads:
                if kind == "grad_scale":
                    grad.mul_(float(factor))  # type: ignore[arg-type]
                elif kind == "grad_sparse":
                    mask = torch.rand(grad.shape, generator=g) < 0.01
                    grad[mask.to(grad.device)] *= float(factor)  # type: ignore[arg-type]
            if kind == "grad_nan":
                grads[0].view(-1)[0] = float("nan")
        self.injected.append((trainer.global_step, kind))
