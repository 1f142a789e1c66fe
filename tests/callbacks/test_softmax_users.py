"""SoftmaxSaturationMonitor on models nobody here wrote: Hugging Face GPT-2, Llama, BERT, ViT, Lightning's
demos.Transformer, litgpt, and a model built in configure_model. Attention must be measured in every
layer, the head found, and what does not fit skipped with a reason."""

from __future__ import annotations

import inspect
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_stability import get_event_log
from lightning_stability.callbacks import _softmax_capture as capture_module
from lightning_stability.callbacks.softmax_monitor import SoftmaxSaturationMonitor
from lightning_stability.demos import Block, make_dataloader
from lightning_stability.ops.saturation import find_qk_projection
from tests.conftest import make_trainer

transformers = pytest.importorskip("transformers")


class _Wrapped(pl.LightningModule):
    """A user's LightningModule around a model it did not write (``self.model``)."""

    def __init__(self, make, step) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = make()
        self._step = step

    def training_step(self, batch, batch_idx):
        return self._step(self.model, batch)  # the loss only: the logits come from the head's hook

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # the weights stay put: compare afterwards


_IDS = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(0))
# padding at the end of two sequences: 7 and 4 real tokens of 12
_MASK = torch.ones(4, 12, dtype=torch.long)
_MASK[1, 7:] = 0
_MASK[3, 4:] = 0


def _gpt2(impl="sdpa"):
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=40, n_positions=32, attn_implementation=impl))


def _llama(impl="sdpa"):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation=impl))


def _bert(impl="sdpa"):
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation=impl))


def _vit(impl="sdpa"):
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3, attn_implementation=impl))


def _demo_transformer():
    from lightning.pytorch.demos import Transformer

    return Transformer(vocab_size=40, ninp=32, nhead=2, nhid=64, nlayers=2, dropout=0.0)


def _litgpt():
    litgpt = pytest.importorskip("litgpt")
    return litgpt.GPT(litgpt.Config(
        block_size=32, vocab_size=40, padded_vocab_size=40, n_layer=2, n_head=4, n_query_groups=2, n_embd=32,
        bias=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=64))


_LABELS = torch.tensor([0, 1, 2, 0])
CASES = {
    # name: (make, training step, batch tensors, head, attention layers)
    "hf-gpt2": (_gpt2, lambda m, b: m(input_ids=b[0], labels=b[0]).loss, (_IDS,), "model.lm_head",
                [f"model.transformer.h.{i}.attn" for i in range(2)]),
    "hf-llama-gqa": (_llama, lambda m, b: m(input_ids=b[0], labels=b[0]).loss, (_IDS,), "model.lm_head",
                     [f"model.model.layers.{i}.self_attn" for i in range(2)]),
    "hf-bert-padded": (_bert, lambda m, b: m(input_ids=b[0], attention_mask=b[1], labels=b[2]).loss,
                       (_IDS, _MASK, _LABELS), "model.classifier",
                       [f"model.bert.encoder.layer.{i}.attention.self" for i in range(2)]),
    "hf-vit": (_vit, lambda m, b: m(pixel_values=b[0], labels=b[1]).loss,
               (torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)), _LABELS), "model.classifier",
               [f"model.vit.layers.{i}.attention" for i in range(2)]),
    "lightning-demo-transformer": (
        _demo_transformer, lambda m, b: F.nll_loss(m(b[0], b[0]), b[0].flatten()), (_IDS,), "model.decoder",
        [f"model.transformer.{part}.layers.{i}.{attn}" for i in range(2)
         for part, attn in (("encoder", "self_attn"), ("decoder", "self_attn"), ("decoder", "multihead_attn"))]),
    "litgpt": (_litgpt, lambda m, b: F.cross_entropy(m(b[0]).flatten(0, 1), b[0].flatten()), (_IDS,), "model.lm_head",
               [f"model.transformer.h.{i}.attn" for i in range(2)]),
}


def _fit(tmp_path, model, batch, steps=1, **kw):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*batch), batch_size=4)
    monitor = SoftmaxSaturationMonitor(every_n_steps=1, attention_rows=1000, attention_batch=1000, **kw)
    trainer = make_trainer(tmp_path, steps, [monitor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, loader)
    mine = [str(w.message) for w in caught if str(w.message).startswith("SoftmaxSaturationMonitor")]
    return monitor, trainer, mine


def _measured(stats):
    return sorted(k[: -len("/entropy_min")] for k in stats if k.endswith("/entropy_min"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_attention_is_measured_in_every_layer_and_the_head_is_found(tmp_path, case):
    make, step, batch, head, layers = CASES[case]
    monitor, trainer, warned = _fit(tmp_path, _Wrapped(make, step), batch)
    assert _measured(monitor.last_stats) == sorted(layers)
    for layer in layers:
        assert 0.0 < monitor.last_stats[f"{layer}/entropy_min"] <= 1.0 + 1e-6, layer
        assert math.isfinite(monitor.last_stats[f"{layer}/max_logit"]), layer
    assert monitor._head_name == head
    assert "out_logz_mean" in monitor.last_stats  # the logits came from the head's hook
    assert [e.kind for e in get_event_log(trainer) if e.kind in ("attention_skipped", "no_head")] == []
    assert warned == []


def _entropy_per_head(p, n_keys):
    """Each head's mean row entropy / log n_i from materialised probabilities p (B, H, T, S), the
    rows that see more than one key; n_keys (B, T) the keys each row sees."""
    p = p.double()
    ent = -(p * p.clamp_min(1e-300).log()).sum(-1)  # (B, H, T)
    n = n_keys.double().unsqueeze(1).expand_as(ent)
    norm = torch.where(n > 1, ent / n.clamp_min(2).log(), torch.full_like(ent, math.nan))
    return norm.transpose(0, 1).reshape(p.shape[1], -1).nanmean(1)


def test_bert_padding_mask_is_honoured_padded_keys_excluded(tmp_path):
    """The padded keys of HF BERT's mask are not keys a row sees: the entropy is divided by the log of
    the real keys' count. The reference is the same weights in eager attention, which returns its
    probabilities."""
    make, step, batch, _, layers = CASES["hf-bert-padded"]
    model = _Wrapped(make, step)
    monitor, _, _ = _fit(tmp_path, model, batch)
    eager = _Wrapped(lambda: _bert("eager"), step)
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        attentions = eager.model(input_ids=_IDS, attention_mask=_MASK, output_attentions=True).attentions
    real = _MASK.sum(1, keepdim=True).expand(4, 12)  # every row (padded queries too) sees the real keys only
    for layer, p in zip(layers, attentions):
        assert float(p[1, :, :, 7:].abs().max()) < 1e-6  # the reference gives padded keys nothing
        right = _entropy_per_head(p, real)
        assert monitor.last_stats[f"{layer}/entropy_min"] == pytest.approx(float(right.min()), rel=1e-4)
        # what a wrong implementation would report: all 12 keys counted for the normalisation
        wrong = _entropy_per_head(p, torch.full((4, 12), 12))
        assert float(right.min()) > float(wrong.min()) * 1.02


class _PaddedMHA(pl.LightningModule):
    def __init__(self, separate: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        # kdim != embed_dim: separate q/k/v projection weights
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True, kdim=12 if separate else None,
                                          vdim=12 if separate else None)
        self.kv = nn.Linear(16, 12) if separate else nn.Identity()
        self.head = nn.Linear(16, 40)

    def forward(self, x, padding):
        h = self.emb(x) * 3
        kv = self.kv(h)
        out, self.weights = self.attn(h, kv, kv, key_padding_mask=padding, need_weights=True,
                                      average_attn_weights=False)
        return self.head(out)

    def training_step(self, batch, batch_idx):
        x, keep = batch
        logits = self(x, keep == 0)  # key_padding_mask: True where padded
        return F.cross_entropy(logits.flatten(0, 1), x.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("separate", [False, True])
def test_multihead_attention_key_padding_mask_is_honoured(tmp_path, separate):
    torch.manual_seed(0)
    model = _PaddedMHA(separate)
    monitor, _, warned = _fit(tmp_path, model, (_IDS, _MASK))
    p = model.weights.detach()  # (N, H, L, S), padded keys at exactly 0
    right = _entropy_per_head(p, _MASK.sum(1, keepdim=True).expand(4, 12))
    assert monitor.last_stats["attn/entropy_min"] == pytest.approx(float(right.min()), rel=1e-4)
    wrong = _entropy_per_head(p, torch.full((4, 12), 12))
    assert float(right.min()) > float(wrong.min()) * 1.02
    assert warned == []


def test_need_weights_false_multihead_attention_is_one_layer_measured_once(tmp_path):
    """Without need_weights, multi_head_attention_forward calls scaled_dot_product_attention itself:
    that call is the same layer, not a second measurement of it."""
    calls = []

    class M(_PaddedMHA):
        def forward(self, x, padding):
            out, _ = self.attn(self.emb(x), self.emb(x), self.emb(x), need_weights=False)
            return self.head(out)

    torch.manual_seed(0)
    model = M(False)
    monitor = SoftmaxSaturationMonitor(every_n_steps=1)
    capture = monitor._attention
    original = capture._measure
    capture._measure = lambda *a: (calls.append(capture._caller()), original(*a))[1]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(_IDS, _MASK), batch_size=4)
    make_trainer(tmp_path, 1, [monitor]).fit(model, loader)
    assert calls == ["attn"]


class _BuiltLate(pl.LightningModule):
    """The demo's blocks, built in configure_model (as Lightning recommends for large models)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.blocks: nn.ModuleList | None = None

    def configure_model(self) -> None:
        if self.blocks is not None:
            return
        self.tok_emb = nn.Embedding(self.vocab, 32)
        self.blocks = nn.ModuleList(Block(32, 2) for _ in range(2))
        self.lm_head = nn.Linear(32, self.vocab)

    def training_step(self, batch, batch_idx):
        x = self.tok_emb(batch["input_ids"])
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(x)
        return F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_a_model_built_in_configure_model_has_attention_measured_in_every_layer(tmp_path):
    pl.seed_everything(0, verbose=False)
    loader, ds = make_dataloader(block_size=16, batch_size=8, n_samples=16, seed=0)
    monitor = SoftmaxSaturationMonitor(every_n_steps=1)
    make_trainer(tmp_path, 2, [monitor]).fit(_BuiltLate(len(ds.vocab)), loader)
    assert _measured(monitor.last_stats) == ["blocks.0.attn", "blocks.1.attn"]
    assert monitor._head_name == "lm_head"  # and the head (built there too) gives the output statistics
    assert "out_logz_mean" in monitor.last_stats


def test_eager_hugging_face_attention_is_reported_as_not_measured_never_silently(tmp_path):
    make, step, batch, _, layers = CASES["hf-llama-gqa"]
    monitor, trainer, warned = _fit(tmp_path, _Wrapped(lambda: _llama("eager"), step), batch)
    assert _measured(monitor.last_stats) == []
    skipped = [e for e in get_event_log(trainer) if e.kind == "attention_skipped"]
    assert sorted(e.target for e in skipped) == layers and all(e.severity == "info" for e in skipped)
    assert len(warned) == 2 and all("attn_implementation='sdpa'" in w for w in warned)


def test_a_model_without_any_head_says_so_once_and_names_the_argument(tmp_path):
    class NoHead(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 5))

        def training_step(self, batch, batch_idx):
            return {"loss": (batch[0] @ self.w).pow(2).mean(), "logits": batch[0] @ self.w}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    monitor, trainer, warned = _fit(tmp_path, NoHead(), (torch.randn(4, 4),), steps=2)
    events = [e for e in get_event_log(trainer) if e.kind == "no_head"]
    assert [(e.severity, e.action) for e in events] == [("info", "pass head=<module name>")]
    assert [w for w in warned if "head=<module name>" in w] and len(warned) == 1
    assert "out_logz_mean" in monitor.last_stats  # still measured from outputs["logits"]


def test_an_attention_call_it_cannot_read_is_skipped_with_the_reason_not_a_crash(tmp_path):
    class ThreeD(nn.Module):
        def forward(self, x):  # an unbatched (3-D) SDPA call
            return F.scaled_dot_product_attention(x, x, x)

    class M(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.attn = ThreeD()
            self.head = nn.Linear(8, 5)

        def training_step(self, batch, batch_idx):
            return self.head(self.attn(batch[0])).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    monitor, trainer, warned = _fit(tmp_path, M(), (torch.randn(4, 6, 8),), steps=2)
    assert [(e.kind, e.target) for e in get_event_log(trainer) if e.kind == "attention_skipped"] == [("attention_skipped", "attn")]
    assert len(warned) == 1 and "query of shape (4, 6, 8)" in warned[0]


# -- what the monitor relies on inside other libraries: pinned, so a move fails here, loudly ----------
def test_pin_multi_head_attention_forward_takes_what_the_monitor_reads():
    params = inspect.signature(F.multi_head_attention_forward).parameters
    assert [p for p in capture_module.MHA_PARAMS if p not in params] == []


def test_pin_multihead_attention_in_training_calls_the_functional_core_by_module_attribute(monkeypatch):
    seen = []
    original = F.multi_head_attention_forward
    monkeypatch.setattr(F, "multi_head_attention_forward", lambda *a, **k: (seen.append(k), original(*a, **k))[1])
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8)
    mha(x, x, x, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    assert len(seen) == 1 and {"key_padding_mask", "attn_mask", "is_causal"} <= set(seen[0])


def test_a_moved_multi_head_attention_forward_is_a_warning_not_a_silent_gap(tmp_path, monkeypatch):
    monkeypatch.setattr(capture_module, "MHA_PARAMS", (*capture_module.MHA_PARAMS, "renamed_in_a_future_torch"))
    torch.manual_seed(0)
    monitor, trainer, warned = _fit(tmp_path, _PaddedMHA(False), (_IDS, _MASK))
    assert _measured(monitor.last_stats) == []
    assert len(warned) == 1 and "renamed_in_a_future_torch" in warned[0]
    assert [e.target for e in get_event_log(trainer) if e.kind == "attention_skipped"] == ["attn"]


@pytest.mark.parametrize("family", ["hf-gpt2", "hf-bert-padded"])
def test_pin_hugging_face_sdpa_attention_calls_torch_sdpa_by_module_attribute(monkeypatch, family):
    make, step, batch, _, layers = CASES[family]
    seen = []
    original = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: (seen.append(a[0].shape), original(*a, **k))[1])
    model = make()
    step(model, batch)
    assert len(seen) == len(layers) and all(len(shape) == 4 for shape in seen)


def test_pin_litgpt_attention_calls_torch_sdpa_by_module_attribute(monkeypatch):
    seen = []
    original = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: (seen.append(a[0].shape), original(*a, **k))[1])
    _litgpt()(_IDS)
    assert len(seen) == 2


@pytest.mark.parametrize(("family", "found"), [
    ("hf-llama-gqa", (4, 2, 8)), ("hf-bert-padded", (4, 4, 8)), ("hf-vit", (4, 4, 8)), ("litgpt", (4, 2, 8)),
    ("hf-gpt2", (2, 2, 16)), ("lightning-demo-transformer", (2, 2, 16)),
])
def test_qk_clip_finds_the_projections_where_they_are_linears_and_says_where_not(tmp_path, family, found):
    """QK-clip on every family at its default: the q/k rows are found for Llama, BERT and ViT (query/key
    linears), litgpt, GPT-2's fused Conv1D (its weight stored (in, out)) and nn.MultiheadAttention's
    packed in_proj_weight (Lightning's demo Transformer); an nn.MultiheadAttention with keys of another
    width keeps separate q/k/v weights: a warning per layer, no crash, and the weights left as they were."""
    make, step, batch, _, layers = CASES[family]
    model = _Wrapped(make, step)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    monitor, trainer, warned = _fit(tmp_path, model, batch, max_logit_limit=1e-3)  # every head above tau
    clipped = sorted(e.target for e in get_event_log(trainer) if e.kind == "qk_clip")
    assert clipped == sorted(layers) and not [w for w in warned if "QK-clip cannot find" in w]
    proj = find_qk_projection(dict(model.named_modules())[layers[0]])
    assert (proj.n_head, proj.n_kv_head, proj.head_dim) == found
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_qk_clip_on_a_multihead_attention_with_keys_of_another_width_warns_and_leaves_the_weights(tmp_path):
    """kdim != embed_dim: q, k and v are separate weights, not found: a warning naming the way out."""
    torch.manual_seed(0)
    model = _PaddedMHA(separate=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, trainer, warned = _fit(tmp_path, model, (_IDS, _MASK), max_logit_limit=1e-3)
    assert [e for e in get_event_log(trainer) if e.kind == "qk_clip"] == []
    assert [w for w in warned if "QK-clip cannot find" in w] == [
        "SoftmaxSaturationMonitor: QK-clip cannot find the q/k projections of attn; pass "
        "qk_projections=lambda name, module: QKProjection(...)."]
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("flag", ["bf16-mixed", "fp8-emulated"])
def test_precisions_every_layer_measured_and_the_head_found_after_the_plugin_converted_it(tmp_path, flag):
    from lightning_stability import resolve_precision
    from tests.conftest import tiny_gpt

    model, loader = tiny_gpt(2)
    setup = resolve_precision(flag)
    monitor = SoftmaxSaturationMonitor(every_n_steps=1)
    trainer = make_trainer(tmp_path, 2, [monitor, *setup.pop("callbacks")], **setup)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, loader)
    assert [str(w.message) for w in caught if str(w.message).startswith("SoftmaxSaturationMonitor")] == []
    assert _measured(monitor.last_stats) == ["blocks.0.attn"]
    # the hook sits on the head the model runs (after the plugin's conversion): its logits were seen
    assert dict(model.named_modules())[monitor._head_name] is monitor._head_module
    assert math.isfinite(monitor.last_stats["out_logz_mean"]) and monitor.last_stats["out_logz_mean"] > 0
