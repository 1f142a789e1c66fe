"""Models and training steps that users have, nobody here wrote: Hugging Face GPT-2, Llama, BERT and ViT,
Lightning's own ``demos.Transformer``, litgpt, and a nanoGPT-style model written the way people write it.
Tiny random-init configs, no downloads."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

VOCAB, T, D = 64, 16, 32


class NanoGPT(nn.Module):
    """nanoGPT's shape: a fused ``c_attn``, ``F.scaled_dot_product_attention``, the head tied to ``wte``."""

    def __init__(self, n_layer: int = 2, n_head: int = 2) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, D), nn.Embedding(T, D)
        self.h = nn.ModuleList(_Block(n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight
        nn.init.normal_(self.wte.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class _Block(nn.Module):
    def __init__(self, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.c_attn, self.c_proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))  # (B, H, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.c_proj(y)
        return x + self.mlp(self.ln_2(x))


def _hf(name: str) -> nn.Module:
    import transformers as tf

    if name == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(
            n_embd=D, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=T, bos_token_id=0, eos_token_id=0))
    if name == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(
            hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=T))
    if name == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(
            hidden_size=D, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
            max_position_embeddings=T, num_labels=3))
    if name == "vit":
        return tf.ViTForImageClassification(tf.ViTConfig(
            image_size=8, patch_size=4, num_channels=3, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, num_labels=3))
    raise KeyError(name)


def build(name: str) -> nn.Module:
    if name in ("gpt2", "llama", "bert", "vit"):
        return _hf(name)
    if name == "lightning_transformer":
        from lightning.pytorch.demos import Transformer

        return Transformer(vocab_size=VOCAB, ninp=D, nhead=2, nhid=64, nlayers=1, dropout=0.0)
    if name == "litgpt":
        from litgpt import GPT, Config

        return GPT(Config(n_layer=2, n_head=2, n_embd=D, block_size=T, vocab_size=VOCAB, padded_vocab_size=VOCAB))
    if name == "nanogpt":
        return NanoGPT()
    raise KeyError(name)


# attention layers each model has: the softmax monitor must capture every one
ATTENTION_LAYERS = {"gpt2": 2, "llama": 2, "bert": 2, "vit": 2, "lightning_transformer": 3, "litgpt": 2, "nanogpt": 2}
MODELS = list(ATTENTION_LAYERS)


def two_d_weights(model: nn.Module) -> set[str]:
    """The names of every distinct 2-D weight (a tied weight once, under its first name)."""
    seen: set[int] = set()
    names = set()
    for name, p in model.named_parameters():  # named_parameters already yields a tied weight once
        if p.ndim == 2 and id(p) not in seen:
            seen.add(id(p))
            names.add(name)
    return names


# -- data --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TokenBatch:
    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor


class Tokens(Dataset):
    """Sequences that continue a pattern (learnable), with padding for the encoder and images for ViT."""

    def __init__(self, n: int = 512, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        step = torch.randint(1, 4, (n, 1), generator=g)
        self.seq = (start + step * torch.arange(T + 1)) % VOCAB
        self.lengths = torch.randint(T // 2, T + 1, (n,), generator=g)
        self.images = torch.randn(n, 3, 8, 8, generator=g)
        self.labels = step.view(-1) - 1

    def __len__(self) -> int:
        return len(self.seq)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"seq": self.seq[i], "length": self.lengths[i], "image": self.images[i], "label": self.labels[i], "index": i}


def collate_for(model: str, batch_type: str) -> Callable[[list[dict[str, Any]]], Any]:
    def fn(items: list[dict[str, Any]]) -> Any:
        b = torch.utils.data.default_collate(items)
        if model == "vit":
            x, y = b["image"], b["label"]
        elif model == "bert":
            mask = (torch.arange(T) < b["length"][:, None]).long()  # (B, T): 1 for tokens, 0 for padding
            x = {"input_ids": b["seq"][:, :T] * mask, "attention_mask": mask}
            y = b["label"]
        else:
            x, y = b["seq"][:, :T], b["seq"][:, 1:]
        if batch_type == "tuple":
            return x, y
        if batch_type == "list":
            return [x, y]
        if batch_type == "dataclass":
            return TokenBatch(x, y, b["index"])
        data = {"x": x, "y": y, "index": b["index"]}
        if batch_type == "batch_encoding":
            from transformers import BatchEncoding

            return BatchEncoding(data)
        return data

    return fn


def loader(model: str, batch_type: str = "dict", batch_size: int = 8, n: int = 512) -> DataLoader:
    return DataLoader(Tokens(n), batch_size=batch_size, collate_fn=collate_for(model, batch_type))


def unpack(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, TokenBatch):
        return batch.x, batch.y
    if isinstance(batch, (tuple, list)):
        return batch[0], batch[1]
    return batch["x"], batch["y"]


# -- the LightningModule -------------------------------------------------------------------------------
SCHEDULERS = ("none", "sequential", "chained", "plateau", "onecycle", "lambda")


class Client(pl.LightningModule):
    """A user's module around ``name``: built in ``__init__`` or in ``configure_model``; BERT's step returns
    the loss tensor only, the others ``{"loss": ...}``."""

    def __init__(self, name: str, build_in: str = "init", scheduler: str = "none", lr: float = 3e-3,
                 optimizer: str = "adamw", max_steps: int = 60) -> None:
        super().__init__()
        self.name, self.build_in, self.scheduler, self.lr = name, build_in, scheduler, lr
        self.optimizer_name, self.max_steps = optimizer, max_steps
        self.model: nn.Module | None = build(name) if build_in == "init" else None

    def configure_model(self) -> None:
        if self.model is None:
            self.model = build(self.name)

    def forward_loss(self, batch: Any) -> torch.Tensor:
        x, y = unpack(batch)
        m = self.model
        if self.name in ("gpt2", "llama"):
            return m(input_ids=x, labels=x).loss  # Hugging Face shifts the labels itself
        if self.name == "bert":
            return m(**x, labels=y).loss
        if self.name == "vit":
            return m(pixel_values=x, labels=y).loss
        if self.name == "lightning_transformer":
            out = m(x, y)  # log-probabilities (B, T, V)
            return F.nll_loss(out.reshape(-1, VOCAB), y.reshape(-1))
        logits = m(x)
        return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = self.forward_loss(batch)
        self.log("train_loss", loss.detach(), on_step=True, prog_bar=False)
        self.log("plateau_metric", 1.0, on_step=True)  # constant: ReduceLROnPlateau decays on a fixed beat
        return loss if self.name == "bert" else {"loss": loss}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.forward_loss(batch))

    def configure_optimizers(self) -> Any:
        params = self.parameters()
        if self.optimizer_name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        else:
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01)
        s = torch.optim.lr_scheduler
        n = self.max_steps
        if self.scheduler == "none":
            return opt
        if self.scheduler == "sequential":
            sched: Any = s.SequentialLR(opt, [s.LinearLR(opt, 0.1, 1.0, total_iters=10), s.CosineAnnealingLR(opt, n - 10)],
                                        milestones=[10])
        elif self.scheduler == "chained":
            sched = s.ChainedScheduler([s.LinearLR(opt, 0.2, 1.0, total_iters=8), s.ExponentialLR(opt, 0.98)])
        elif self.scheduler == "plateau":
            sched = s.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=3)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "monitor": "plateau_metric"}}
        elif self.scheduler == "onecycle":
            sched = s.OneCycleLR(opt, max_lr=self.lr, total_steps=n + 5)
        elif self.scheduler == "lambda":
            sched = s.LambdaLR(opt, lambda k: min(1.0, (k + 1) / 10) * math.exp(-k / 50))
        else:
            raise KeyError(self.scheduler)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
