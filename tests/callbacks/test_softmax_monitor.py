from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_stability import get_event_log
from lightning_stability.callbacks.softmax_monitor import SoftmaxSaturationMonitor
from lightning_stability.ops.saturation import attention_stats, softcapped_attention, softmax_stats
from tests.conftest import MemoryLogger, make_trainer, tiny_gpt

DRIFT_LADDER = {"logit_drift": ("z_loss", "softcap", "advise")}  # opt-in: not a default


class _Grads(pl.Callback):
    """Keeps the gradients the optimizer is about to use (after the monitor's own hook)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


class _Probe(pl.Callback):
    """Records the head's logits and the first attention's q and k of the last forward."""

    def on_train_start(self, trainer, pl_module):
        pl_module.lm_head.register_forward_hook(lambda m, a, out: setattr(self, "logits", out.detach().clone()))
        attn = pl_module.blocks[0].attn

        def qkv_hook(m, a, out):
            b, t, c3 = out.shape
            c = c3 // 3
            q, k, _ = out.detach().split(c, dim=2)
            h = attn.n_head
            self.q = q.view(b, t, h, c // h).transpose(1, 2).clone()
            self.k = k.view(b, t, h, c // h).transpose(1, 2).clone()

        attn.qkv.register_forward_hook(qkv_hook)


@pytest.mark.parametrize("capture", ["patch", "mode"])
def test_output_and_attention_statistics_match_direct_computation(tmp_path, capture):
    model, loader = tiny_gpt(3)
    probe = _Probe()
    # every row of every sequence: deterministic
    monitor = SoftmaxSaturationMonitor(every_n_steps=1, attention_rows=1000, attention_batch=1000, capture=capture)
    make_trainer(tmp_path, 3, [probe, monitor]).fit(model, loader)
    s = monitor.last_stats
    expected = softmax_stats(probe.logits)
    for key in ("logz_mean", "logz_std", "logz_max", "max_logit", "pmax_mean"):
        assert s[f"out_{key}"] == pytest.approx(float(expected[key]), rel=1e-5, abs=1e-6)
    assert s["sc_frac"] == 0.0 and s["zero_loss_frac"] == 0.0
    assert s["sc_headroom_p01"] == pytest.approx(float(expected["sc_headroom_p01"]), rel=1e-5)
    # the attention call inside blocks.0.attn was attributed to it and measured on every row, causally
    att = attention_stats(probe.q, probe.k, is_causal=True)
    assert s["blocks.0.attn/entropy_min"] == pytest.approx(float(att["entropy_mean"].min()), rel=1e-5)
    assert s["blocks.0.attn/max_logit"] == pytest.approx(float(att["max_logit"].max()), rel=1e-5)
    assert s["blocks.0.attn/pmax_p99"] == pytest.approx(float(att["pmax_p99"].max()), rel=1e-5)
    # a non-causal reading would differ: the causal mask really was applied
    full = attention_stats(probe.q, probe.k)
    assert s["blocks.0.attn/entropy_min"] != pytest.approx(float(full["entropy_mean"].min()), rel=1e-3)
    assert 0.0 < s["nlm_cos_max"] <= 1.0
    # after the fit the captured functions are the originals again
    assert torch.nn.functional.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention


class _MHAModel(pl.LightningModule):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(11, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.head = nn.Linear(16, 11)

    def forward(self, x):
        h = self.emb(x) * 3
        if not self.batch_first:
            h = h.transpose(0, 1)
        out, self.weights = self.attn(h, h, h, need_weights=True, average_attn_weights=False)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(out)

    def training_step(self, batch, batch_idx):
        x = batch[0]
        logits = self(x)
        return {"loss": F.cross_entropy(logits.flatten(0, 1), x.flatten()), "logits": logits, "targets": x}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_is_measured_against_its_own_weights(tmp_path, batch_first):
    torch.manual_seed(0)
    model = _MHAModel(batch_first)
    data = torch.randint(0, 11, (4, 8))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=4)

    class Keep(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.weights = pl_module.weights.detach().clone()  # (N, H, L, S), before the update

    keep = Keep()
    monitor = SoftmaxSaturationMonitor(every_n_steps=1, attention_rows=1000)
    make_trainer(tmp_path, 1, [monitor, keep]).fit(model, loader)
    p = keep.weights.double()
    ent = -(p * p.clamp_min(1e-300).log()).sum(-1) / math.log(p.shape[-1])  # (N, H, L)
    per_head = ent.transpose(0, 1).reshape(4, -1).mean(1)
    assert monitor.last_stats["attn/entropy_min"] == pytest.approx(float(per_head.min()), rel=1e-4)
    pmax = torch.quantile(p.amax(-1).transpose(0, 1).reshape(4, -1), 0.99, dim=1)
    assert monitor.last_stats["attn/pmax_p99"] == pytest.approx(float(pmax.max()), rel=1e-4)


def test_sampling_is_every_n_steps_and_logged_straight_to_the_loggers(tmp_path):
    model, loader = tiny_gpt(7)
    logger = MemoryLogger()
    monitor = SoftmaxSaturationMonitor(every_n_steps=3)
    make_trainer(tmp_path, 7, [monitor], logger=logger).fit(model, loader)
    steps = sorted({step for step, m in logger.records if "stability/softmax/out_logz_mean" in m})
    assert steps == [0, 3, 6]
    keys = logger.metrics_at(3)
    for key in ("out_logz_mean", "sc_headroom_p01", "sc_frac", "zero_loss_frac", "nlm_cos_max", "z_loss_coef"):
        assert f"stability/softmax/{key}" in keys
    for key in ("entropy_min", "entropy_median", "max_logit", "pmax_p99", "headroom_min"):
        assert f"stability/attention/blocks.0.attn/{key}" in keys


def _run_with_remedy(tmp_path, remedy: str, **kw):
    """One optimizer step with ``remedy`` on from the start (through the monitor's state), and the
    same step by hand without it."""
    model, loader = tiny_gpt(1)
    reference = copy.deepcopy(model)
    monitor = SoftmaxSaturationMonitor(every_n_steps=1000, z_loss_ramp=0, **kw)
    monitor.load_state_dict({"remedy_on": {remedy: 0}})
    grads = _Grads()
    make_trainer(tmp_path, 1, [monitor, grads]).fit(model, loader)
    batch = next(iter(loader))
    return monitor, grads, reference, batch


def test_z_loss_remedy_adds_the_exact_z_loss_gradient(tmp_path):
    monitor, grads, reference, batch = _run_with_remedy(tmp_path, "z_loss", z_loss_coef=0.05)
    logits = reference(batch["input_ids"])
    loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
    loss = loss + 0.05 * torch.logsumexp(logits, -1).pow(2).mean()
    loss.backward()
    for name in ("lm_head.weight", "blocks.0.attn.qkv.weight", "tok_emb.weight"):
        expected = dict(reference.named_parameters())[name].grad
        torch.testing.assert_close(grads.grads[name], expected, rtol=1e-4, atol=1e-6)
    # without the remedy the gradient is measurably different
    reference.zero_grad()
    logits = reference(batch["input_ids"])
    F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten()).backward()
    assert not torch.allclose(grads.grads["lm_head.weight"], reference.lm_head.weight.grad, rtol=1e-3, atol=1e-6)


def test_perp_grad_remedy_makes_every_gradient_orthogonal_to_its_weight(tmp_path):
    monitor, grads, reference, batch = _run_with_remedy(tmp_path, "perp_grad")
    logits = reference(batch["input_ids"])
    F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten()).backward()
    for name, g in grads.grads.items():
        w = grads.weights[name]
        original = dict(reference.named_parameters())[name].grad
        assert abs(float((g * w).sum())) <= 1e-5 * float(g.norm() * w.norm()) + 1e-12, name
        assert float(g.norm()) == pytest.approx(float(original.norm()), rel=1e-4), name


def test_softcap_remedy_bounds_the_logits(tmp_path):
    model, loader = tiny_gpt(2)
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
    monitor = SoftmaxSaturationMonitor(every_n_steps=1, softcap=2.0)
    monitor.load_state_dict({"remedy_on": {"softcap": 0}})
    make_trainer(tmp_path, 2, [monitor]).fit(model, loader)
    assert monitor.last_stats["out_max_logit"] <= 2.0
    assert monitor.last_stats["out_max_logit"] > 1.0


def test_logit_drift_climbs_its_ladder_and_recovers_turning_remedies_off(tmp_path):
    model, loader = tiny_gpt(14)
    monitor = SoftmaxSaturationMonitor(every_n_steps=1, logz_limit=0.5, patience=1, cooldown=2, remedies=DRIFT_LADDER)

    class Relax(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 6:
                monitor.logz_limit = 1e6  # from here on every sample is healthy
                self.remedies_then = monitor.active_remedies

    relax = Relax()
    trainer = make_trainer(tmp_path, 14, [monitor, relax])
    trainer.fit(model, loader)
    events = [e for e in get_event_log(trainer) if e.source == "SoftmaxSaturationMonitor"]
    drift = [e for e in events if e.kind == "logit_drift"]
    assert [e.action for e in drift] == ["z_loss", "softcap", "advise"]
    assert drift[0].metrics["logz_mean"] > 0.5
    assert relax.remedies_then == ["softcap", "z_loss"]
    recovered = [e for e in events if e.kind == "softmax_recovered"]
    assert len(recovered) == 1 and set(recovered[0].action.split(",")) == {"z_loss_off", "softcap_off"}
    assert monitor.active_remedies == []


def test_softmax_collapse_is_detected_and_gets_perpendicular_gradients(tmp_path):
    model, loader = tiny_gpt(3)
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)  # logits in the thousands: one-hot in float32
    monitor = SoftmaxSaturationMonitor(every_n_steps=1, remedies={"softmax_collapse": ("perp_grad", "advise")})
    trainer = make_trainer(tmp_path, 3, [monitor])
    trainer.fit(model, loader)
    kinds = {(e.kind, e.action) for e in get_event_log(trainer)}
    assert ("collapse_headroom_low", None) in kinds
    assert ("softmax_collapse", "perp_grad") in kinds
    assert monitor.last_stats["sc_frac"] > 0.5
    assert "perp_grad" in monitor.active_remedies


def test_state_round_trips(tmp_path):
    model, loader = tiny_gpt(4)
    monitor = SoftmaxSaturationMonitor(every_n_steps=1, logz_limit=0.5, remedies=DRIFT_LADDER)
    make_trainer(tmp_path, 4, [monitor]).fit(model, loader)
    state = monitor.state_dict()
    other = SoftmaxSaturationMonitor(every_n_steps=1, logz_limit=0.5, remedies=DRIFT_LADDER)
    other.load_state_dict(copy.deepcopy(state))
    assert other.state_dict()["active"] == state["active"]
    assert other.active_remedies == monitor.active_remedies and "z_loss" in monitor.active_remedies
    assert torch.equal(other._gen.get_state(), monitor._gen.get_state())  # the row sampler goes on alike


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"collapse_frac": 1.5}, "collapse_frac"),
        ({"remedies": {"logit_drift": ("rollback",)}}, "unknown remedy 'rollback'"),
        ({"remedies": {"spikes": ("z_loss",)}}, "unknown detection 'spikes'"),
        ({"loss_dtype": torch.int32}, "loss_dtype"),
        ({"capture": "hooks"}, "capture='hooks'"),
        ({"attention_batch": 0}, "attention_batch"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SoftmaxSaturationMonitor(**kwargs)


def test_unknown_head_is_a_clear_error(tmp_path):
    model, loader = tiny_gpt(1)
    with pytest.raises(ValueError, match="head='decoder'"):
        make_trainer(tmp_path, 1, [SoftmaxSaturationMonitor(head="decoder")]).fit(model, loader)


def test_attention_logit_growth_gets_qk_clip_and_the_logits_come_down(tmp_path):
    model, loader = tiny_gpt(6)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[:64].mul_(6.0)  # q and k rows: logits ~36x larger
    monitor = SoftmaxSaturationMonitor(every_n_steps=1, max_logit_limit=4.0, attention_rows=1000, attention_batch=1000)
    first = {}

    class First(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 1:
                first.update(monitor.last_stats)

    trainer = make_trainer(tmp_path, 6, [monitor, First()])
    trainer.fit(model, loader)
    events = [e for e in get_event_log(trainer) if e.source == "SoftmaxSaturationMonitor"]
    assert ("attention_logit_growth", "qk_clip", "blocks.0.attn") in {(e.kind, e.action, e.target) for e in events}
    clips = [e for e in events if e.kind == "qk_clip"]
    assert clips and clips[0].metrics["max_logit"] > 4.0
    assert first["blocks.0.attn/max_logit"] > 4.0
    # after the clip, one optimizer step later, the layer's largest logit is back near tau
    assert monitor.last_stats["blocks.0.attn/max_logit"] < 0.5 * first["blocks.0.attn/max_logit"]
    assert monitor.last_stats["blocks.0.attn/max_logit"] < 4.0 * 1.3


class _AttentionIO(pl.Callback):
    """Records, per training step, the first layer's q, k, v and what its attention returned."""

    def __init__(self) -> None:
        self.steps: dict[int, tuple] = {}

    def on_train_start(self, trainer, pl_module):
        attn = pl_module.blocks[0].attn
        seen = {}

        def qkv_hook(m, a, out):
            b, t, c3 = out.shape
            h = attn.n_head
            seen["qkv"] = [z.detach().view(b, t, h, c3 // 3 // h).transpose(1, 2).clone() for z in out.split(c3 // 3, 2)]

        def proj_hook(m, args):
            self.steps[trainer.global_step] = (*seen["qkv"], args[0].detach().clone())

        attn.qkv.register_forward_hook(qkv_hook)
        attn.proj.register_forward_pre_hook(proj_hook)


def _attention_out(q, k, v, cap=None):
    b, h, t, d = q.shape
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True) if cap is None else softcapped_attention(
        q, k, v, is_causal=True, cap=cap)
    return y.transpose(1, 2).reshape(b, t, h * d)


@pytest.mark.parametrize("capture", ["patch", "mode"])
def test_attention_softcap_remedy_caps_every_forward_while_on_and_leaves_nothing_behind(tmp_path, capture):
    original = F.scaled_dot_product_attention
    model, loader = tiny_gpt(4)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[:64].mul_(6.0)  # q and k rows: logits ~36x larger
    monitor = SoftmaxSaturationMonitor(
        every_n_steps=1, max_logit_limit=4.0, remedies={"attention_logit_growth": ("attn_softcap",)},
        attention_softcap=2.0, capture=capture,
    )
    io = _AttentionIO()
    trainer = make_trainer(tmp_path, 4, [io, monitor])
    with pytest.warns(UserWarning, match="runs attention as math"):
        trainer.fit(model, loader)
    events = [e for e in get_event_log(trainer) if e.source == "SoftmaxSaturationMonitor"]
    on = [e for e in events if e.action == "attn_softcap"]
    # decided at the end of the first step (the event carries the step count after it)
    assert [(e.kind, e.step, e.target) for e in on] == [("attention_logit_growth", 1, "blocks.0.attn")]
    assert on[0].metrics["attention_softcap"] == 2.0
    # step 0 ran plain attention; from step 1 every forward is capped at 2, a different function here
    q, k, v, y = io.steps[0]
    torch.testing.assert_close(y, _attention_out(q, k, v), rtol=1e-5, atol=1e-6)
    for step in (1, 2, 3):
        q, k, v, y = io.steps[step]
        torch.testing.assert_close(y, _attention_out(q, k, v, cap=2.0), rtol=1e-5, atol=1e-6)
        assert (y - _attention_out(q, k, v)).abs().max() > 1e-2
    # the statistics are those of the raw logits, measured on every capped step too: the cap does not
    # hide the growth from the detection
    assert monitor._samples == 4
    assert monitor.last_stats["blocks.0.attn/max_logit"] > 4.0
    assert F.scaled_dot_product_attention is original
    # validation (and test, predict) forwards are capped too while the remedy is on
    monitor.on_validation_batch_start(trainer, model, None, 0)
    assert F.scaled_dot_product_attention is not original
    with torch.no_grad():
        model(next(iter(loader))["input_ids"])
    q, k, v, y = io.steps[trainer.global_step]
    torch.testing.assert_close(y, _attention_out(q, k, v, cap=2.0), rtol=1e-5, atol=1e-6)
    monitor.on_validation_batch_end(trainer, model, None, None, 0)
    assert F.scaled_dot_product_attention is original


class _HFLlama(pl.LightningModule):
    """A tiny random-init Llama (grouped-query attention, RoPE) from Hugging Face transformers."""

    def __init__(self, implementation: str) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, attn_implementation=implementation,
        )
        self.llm = transformers.LlamaForCausalLM(config)

    def training_step(self, batch, batch_idx):
        x = batch[0]
        out = self.llm(input_ids=x, labels=x)
        return {"loss": out.loss, "logits": out.logits}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # the weights stay put: compare with eager later


def test_hugging_face_llama_attention_is_captured_after_rope_with_grouped_query_heads(tmp_path):
    model = _HFLlama("sdpa")
    data = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=2)
    monitor = SoftmaxSaturationMonitor(every_n_steps=1, attention_rows=1000)
    make_trainer(tmp_path, 1, [monitor]).fit(model, loader)
    s = monitor.last_stats
    # the reference: the same weights in eager attention, which returns its probabilities
    eager = _HFLlama("eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        attentions = eager.llm(input_ids=data, output_attentions=True).attentions
    for i, p in enumerate(attentions):  # (B, H, T, T), causal
        layer = f"llm.model.layers.{i}.self_attn"
        p = p.double()
        n = torch.arange(1, p.shape[-1] + 1, dtype=torch.float64)
        ent = -(p * p.clamp_min(1e-300).log()).sum(-1)
        norm = (ent[..., 1:] / n[1:].log())  # rows that see more than one key
        per_head = norm.transpose(0, 1).reshape(4, -1).mean(1)
        assert s[f"{layer}/entropy_min"] == pytest.approx(float(per_head.min()), rel=1e-4)
        pmax = torch.quantile(p[..., 1:, :].amax(-1).transpose(0, 1).reshape(4, -1), 0.99, dim=1)
        assert s[f"{layer}/pmax_p99"] == pytest.approx(float(pmax.max()), rel=1e-4)
    # and QK-clip finds its q_proj/k_proj with grouped key heads
    from lightning_stability.ops.saturation import find_qk_projection

    proj = find_qk_projection(model.llm.model.layers[0].self_attn)
    assert proj is not None and (proj.n_head, proj.n_kv_head, proj.head_dim) == (4, 2, 8)


def test_no_host_reads_on_steps_it_does_not_sample(tmp_path, monkeypatch):
    """With z-loss and perpendicular gradients on, a step that is not sampled reads nothing from the
    device (on a GPU each read would be a host sync): not in the hooks, not in the z-loss gradient."""
    from lightning_stability.callbacks import _softmax_z_loss as z_loss_module
    from tests.callbacks.test_spectral_monitor import _counting_host_reads

    model, loader = tiny_gpt(25)
    monitor = SoftmaxSaturationMonitor(every_n_steps=10, z_loss_ramp=0)
    monitor.load_state_dict({"remedy_on": {"z_loss": 0, "perp_grad": 0}})
    sampled, silent = [], []

    def wrap(owner, name):
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            with _counting_host_reads([]) as n:
                out = original(*args, **kwargs)
            (sampled if monitor._sampling else silent).append(n[0])
            return out

        monkeypatch.setattr(owner, name, wrapped)

    for hook in ("on_train_batch_start", "on_before_backward", "on_before_optimizer_step", "_head_hook"):
        wrap(monitor, hook)
    wrap(z_loss_module, "z_loss_grad")
    trainer = make_trainer(tmp_path, 25, [monitor])
    trainer.fit(model, loader)
    assert monitor._samples == 3  # steps 0, 10 and 20
    assert len(silent) > 4 * 20 and sum(silent) == 0
    assert monitor.active_remedies == ["perp_grad", "z_loss"]


def test_resume_continues_exactly(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(root, ckpt=None):
        model, loader = tiny_gpt(40, batches=20)  # step 20 is an epoch boundary: the data resume exactly
        monitor = SoftmaxSaturationMonitor(every_n_steps=3, logz_limit=0.5, cooldown=50, remedies=DRIFT_LADDER)
        saver = ModelCheckpoint(dirpath=root, every_n_train_steps=20, save_top_k=-1)
        trainer = make_trainer(root, 40, [monitor, saver], enable_checkpointing=True)
        trainer.fit(model, loader, ckpt_path=ckpt)
        return monitor, model, [(e.step, e.kind, e.action) for e in get_event_log(trainer)]

    straight, straight_model, straight_events = run(tmp_path / "full")
    resumed, resumed_model, resumed_events = run(tmp_path / "resumed", str(tmp_path / "full" / "epoch=0-step=20.ckpt"))
    assert "z_loss" in straight.active_remedies  # the resumed half ran with a remedy on
    for p, q in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    assert straight.state_dict() == resumed.state_dict()
    assert straight.last_stats == resumed.last_stats
    assert straight_events == resumed_events


class _LitGPT(pl.LightningModule):
    """A tiny random-init litgpt GPT (RoPE, grouped-query attention, fused qkv)."""

    def __init__(self) -> None:
        super().__init__()
        litgpt_config = pytest.importorskip("litgpt.config")
        litgpt_model = pytest.importorskip("litgpt.model")
        torch.manual_seed(0)
        config = litgpt_config.Config(
            block_size=32, vocab_size=40, padded_vocab_size=40, n_layer=2, n_head=4, n_query_groups=2, n_embd=32,
            bias=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=64,
        )
        self.gpt = litgpt_model.GPT(config)

    def training_step(self, batch, batch_idx):
        x = batch[0]
        logits = self.gpt(x)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # the weights stay put: compare afterwards


def test_litgpt_attention_is_captured_after_rope_and_qk_clip_finds_its_grouped_fused_qkv(tmp_path):
    from lightning_stability.ops.saturation import apply_qk_clip, find_qk_projection

    model = _LitGPT()
    data = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(2))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=2)
    monitor = SoftmaxSaturationMonitor(every_n_steps=1, attention_rows=1000)
    make_trainer(tmp_path, 1, [monitor]).fit(model, loader)
    s = monitor.last_stats
    # the reference: q and k as litgpt hands them to its attention (after RoPE, keys expanded per query head)
    seen = {}
    attn = model.gpt.transformer.h[0].attn
    original = attn.scaled_dot_product_attention

    def spy(q, k, v, mask=None):
        seen["q"], seen["k"] = q.detach().clone(), k.detach().clone()
        return original(q, k, v, mask)

    attn.scaled_dot_product_attention = spy
    with torch.no_grad():
        model.gpt(data)
    ref = attention_stats(seen["q"], seen["k"], is_causal=True)
    layer = "gpt.transformer.h.0.attn"
    assert s[f"{layer}/entropy_min"] == pytest.approx(float(ref["entropy_mean"].min()), rel=1e-5)
    assert s[f"{layer}/max_logit"] == pytest.approx(float(ref["max_logit"].max()), rel=1e-5)
    # a reading before RoPE (straight from the qkv projection) would be another number
    b, t = data.shape
    q_raw, k_raw, _ = attn.qkv(model.gpt.transformer.h[0].norm_1(model.gpt.transformer.wte(data))).detach().split(
        (32, 16, 16), dim=-1)
    q_raw = q_raw.view(b, t, 4, 8).transpose(1, 2)
    k_raw = k_raw.view(b, t, 2, 8).transpose(1, 2)
    before_rope = attention_stats(q_raw, k_raw, is_causal=True)
    assert s[f"{layer}/max_logit"] != pytest.approx(float(before_rope["max_logit"].max()), rel=1e-3)
    # QK-clip finds the fused [q | k | v] with two key groups, and scaling by it scales every head's logits
    proj = find_qk_projection(attn)
    assert proj is not None and (proj.n_head, proj.n_kv_head, proj.head_dim) == (4, 2, 8)
    assert (proj.q_rows, proj.k_rows) == (slice(0, 32), slice(32, 48))
    head_max = ref["max_logit"]
    tau = float(head_max.min()) * 0.5  # every head above tau: each comes down to tau
    apply_qk_clip(proj, head_max, tau=tau)
    with torch.no_grad():
        model.gpt(data)
    after = attention_stats(seen["q"], seen["k"], is_causal=True)
    torch.testing.assert_close(after["max_logit"], torch.full_like(after["max_logit"], tau), rtol=1e-4, atol=1e-5)


def test_z_loss_does_not_keep_the_logits_of_past_steps_alive(tmp_path):
    # the z-loss gradient hook must not refer to the tensor it is registered on: that cycle would keep
    # every step's logits (and their graph) alive until a garbage collection, a leak of a full logits
    # tensor a step. With the collector off, only reference counting frees them.
    import gc
    import weakref

    from lightning_stability.demos import TinyGPT, make_dataloader

    pl.seed_everything(0, verbose=False)
    loader, ds = make_dataloader(block_size=16, batch_size=8, n_samples=8 * 12, seed=0)
    model = TinyGPT(len(ds.vocab), block_size=16, d_model=32, n_layer=1, n_head=2, max_steps=10, warmup_steps=2)
    monitor = SoftmaxSaturationMonitor(every_n_steps=1, attention=False)
    monitor.load_state_dict({"remedy_on": {"z_loss": 0}})  # on from the first step
    alive: list[weakref.ref] = []

    class Track(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            pl_module.lm_head.register_forward_hook(lambda m, a, out: alive.append(weakref.ref(out)))

    trainer = pl.Trainer(accelerator="cpu", max_steps=10, callbacks=[monitor, Track()], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))
    gc.collect()
    gc.disable()
    try:
        trainer.fit(model, loader)
        assert "z_loss" in monitor.active_remedies and len(alive) == 10
        assert sum(ref() is not None for ref in alive) <= 1  # at most the last step's, held by the trainer
    finally:
        gc.enable()


# -- gradient accumulation: one decision per optimizer step --------------------------------------------
class _MicroBatches(pl.Callback):
    """The q/k rows of the first layer's qkv at the start of every micro-batch, and each forward's logits."""

    def __init__(self) -> None:
        self.qk: list[tuple[int, torch.Tensor]] = []
        self.logits: dict[int, list[torch.Tensor]] = {}

    def on_train_start(self, trainer, pl_module):
        pl_module.lm_head.register_forward_hook(
            lambda m, a, out: self.logits.setdefault(trainer.global_step, []).append(out.detach().clone()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.qk.append((trainer.global_step, pl_module.blocks[0].attn.qkv.weight[:64].detach().clone()))


def test_under_accumulation_qk_clip_waits_for_the_optimizer_step_and_decides_once_per_step(tmp_path):
    model, loader = tiny_gpt(8)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[:64].mul_(6.0)  # every step above the limit: QK-clip every step
    monitor = SoftmaxSaturationMonitor(every_n_steps=1, max_logit_limit=4.0, attention_rows=1000, attention_batch=1000)
    micro = _MicroBatches()
    trainer = make_trainer(tmp_path, 4, [monitor, micro], accumulate_grad_batches=2)
    trainer.fit(model, loader)
    assert trainer.global_step == 4 and len(micro.qk) == 8
    # q and k are the same in both micro-batches of one optimizer step: nothing rescaled them in between
    for (s0, w0), (s1, w1) in zip(micro.qk[0::2], micro.qk[1::2]):
        assert s0 == s1
        assert torch.equal(w0, w1), s0
    # one sample, one decision and one QK-clip per optimizer step
    assert monitor._samples == 4
    events = [e for e in get_event_log(trainer) if e.source == "SoftmaxSaturationMonitor"]
    clips = [e.step for e in events if e.kind == "qk_clip"]
    assert clips[:3] == [1, 2, 3] and clips == sorted(set(clips))  # never twice in one step
    assert [(e.step, e.action) for e in events if e.kind == "attention_logit_growth"] == [(1, "qk_clip")]
    # the statistics are those of the step's two micro-batches together
    both = torch.cat(micro.logits[3])
    assert len(micro.logits[3]) == 2
    assert monitor.last_stats["out_logz_mean"] == pytest.approx(float(softmax_stats(both)["logz_mean"]), rel=1e-5)
    assert monitor.last_stats["out_logz_mean"] != pytest.approx(
        float(softmax_stats(micro.logits[3][1])["logz_mean"]), rel=1e-4)


def test_under_accumulation_patience_counts_optimizer_steps(tmp_path):
    model, loader = tiny_gpt(12)
    monitor = SoftmaxSaturationMonitor(every_n_steps=1, logz_limit=0.5, patience=2, cooldown=50, remedies=DRIFT_LADDER)
    trainer = make_trainer(tmp_path, 6, [monitor], accumulate_grad_batches=2)
    trainer.fit(model, loader)
    drift = [(e.step, e.action) for e in get_event_log(trainer) if e.kind == "logit_drift"]
    # a rung every two optimizer steps (two samples), each event at the step count after the step
    assert drift == [(1, "z_loss"), (3, "softcap"), (5, "advise")]
    assert monitor._samples == 6


class _LogitGrads(pl.Callback):
    """The gradient reaching the head's output before the monitor's z-loss hook and after it."""

    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module):
        def first(module, args, out):  # runs before the monitor's forward hook: its tensor hook too
            self.logits.append(out.detach().clone())
            out.register_hook(lambda g: self.before.append(g.detach().clone()))

        def last(module, args, out):
            out.register_hook(lambda g: self.after.append(g.detach().clone()))

        pl_module.lm_head.register_forward_hook(first, prepend=True)
        pl_module.lm_head.register_forward_hook(last)


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_z_loss_gradient_carries_the_loss_scale_and_the_accumulation_factor(tmp_path, precision, accumulate):
    """The z-loss gradient added to the logits' gradient is d/dz of c mean((log Z)^2), 2 c log Z softmax(z)
    / rows, divided by accumulate_grad_batches as Lightning divides the loss, and multiplied by the AMP
    loss scale under 16-mixed, as the gradient it is added to is (a GradScaler on CPU, enabled)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from lightning_stability import z_loss

    coef, scale = 0.05, 1024.0
    model, loader = tiny_gpt(4)
    monitor = SoftmaxSaturationMonitor(every_n_steps=1000, z_loss_ramp=0, z_loss_coef=coef)
    monitor.load_state_dict({"remedy_on": {"z_loss": 0}})
    grads = _LogitGrads()
    kw = {"accumulate_grad_batches": accumulate}
    if precision == "16-mixed":
        kw["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=scale))]
    make_trainer(tmp_path, 1, [monitor, grads], **kw).fit(model, loader)
    assert len(grads.after) == accumulate
    factor = (scale if precision == "16-mixed" else 1.0) / accumulate
    for logits, before, after in zip(grads.logits, grads.before, grads.after):
        z = logits.float().requires_grad_(True)
        (expected,) = torch.autograd.grad(z_loss(z, coef), z)  # the explicit loss, by autograd
        added = after.float() - before.float()
        if precision == "16-mixed":
            assert logits.dtype == torch.float16  # autocast really ran the head in float16
            # float16 gradients: the difference is exact to a few units in the last place of the larger
            ulp = float(torch.maximum(before.abs(), after.abs()).max().float()) * 2**-10
            torch.testing.assert_close(added, expected * factor, rtol=2e-2, atol=2 * ulp)
        else:
            torch.testing.assert_close(added, expected * factor, rtol=1e-5, atol=1e-9)


# -- what is logged: a detection's step reaches the logger ------------------------------------------
def test_a_detection_at_a_step_that_is_not_a_logging_step_is_logged(tmp_path):
    model, loader = tiny_gpt(12)
    logger = MemoryLogger()
    monitor = SoftmaxSaturationMonitor(every_n_steps=5, logz_limit=0.5, cooldown=50)
    make_trainer(tmp_path, 12, [monitor], logger=logger, log_every_n_steps=50).fit(model, loader)
    at0 = logger.metrics_at(0)  # step 0: sampled, a logit_drift detection, and not one of Lightning's logging steps
    assert at0["stability/events/logit_drift"] == 1.0
    assert at0["stability/softmax/out_logz_mean"] > 0.5
    assert "stability/events/advice" in at0


# -- defaults: only QK-clip (shown to help in docs/benchmarks.md) acts without being asked ----------
def test_at_its_defaults_drift_and_collapse_are_reported_with_an_advice_event_and_training_is_untouched(tmp_path):
    model, loader = tiny_gpt(3)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for m in (model, reference):
            m.lm_head.weight.mul_(1e4)  # logits in the thousands: log Z drifts and the softmax collapses
    monitor = SoftmaxSaturationMonitor(every_n_steps=1)
    trainer = make_trainer(tmp_path, 3, [monitor])
    trainer.fit(model, loader)
    events = [e for e in get_event_log(trainer) if e.source == "SoftmaxSaturationMonitor"]
    assert [(e.kind, e.action) for e in events if e.severity == "warning" and e.kind != "collapse_headroom_low"] == [
        ("logit_drift", "advise"), ("softmax_collapse", "advise")]
    advice = {e.action for e in events if e.kind == "advice"}
    assert advice == {"remedies={'logit_drift': ('z_loss', 'softcap', 'advise')}",
                      "remedies={'softmax_collapse': ('perp_grad', 'advise')}"}
    assert all(e.severity == "info" for e in events if e.kind == "advice")
    assert monitor.active_remedies == []
    # the same three steps without the monitor: the same weights (nothing was changed)
    make_trainer(tmp_path, 3, []).fit(reference, loader)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_a_ladder_the_user_chose_gets_no_advice_event(tmp_path):
    model, loader = tiny_gpt(2)
    monitor = SoftmaxSaturationMonitor(every_n_steps=1, logz_limit=0.5, remedies={"logit_drift": ("advise",)})
    trainer = make_trainer(tmp_path, 2, [monitor])
    trainer.fit(model, loader)
    assert [e.action for e in get_event_log(trainer) if e.kind == "logit_drift"] == ["advise"]
    assert [e for e in get_event_log(trainer) if e.kind == "advice"] == []


def test_qk_clip_tau_follows_the_max_logit_limit_the_user_passed():
    assert SoftmaxSaturationMonitor(max_logit_limit=7.0).qk_clip_tau == 7.0
    assert SoftmaxSaturationMonitor(max_logit_limit=7.0, qk_clip_tau=9.0).qk_clip_tau == 9.0
    with pytest.raises(ValueError, match=r"qk_clip_tau=-1\.0") as err:
        SoftmaxSaturationMonitor(qk_clip_tau=-1.0)
    assert "max_logit_limit" not in str(err.value)


def test_a_checkpoint_from_before_the_shared_hysteresis_loads_and_counts_its_healthy_samples():
    """The older ``active`` entries count healthy samples, not the step of the last bad one: such a
    detection is open after loading, and clears after the samples it still lacked (5 - 2 here)."""
    monitor = SoftmaxSaturationMonitor(every_n_steps=50, logz_limit=0.5, cooldown=5, remedies=DRIFT_LADDER)
    monitor.load_state_dict({"active": {"logit_drift": {"rung": 0, "repeats": 1, "healthy": 2}},
                             "remedy_on": {"z_loss": 3}, "headroom_warned": False, "samples": 7})
    assert monitor.active_remedies == ["z_loss"] and monitor._policy.watching
    assert monitor.schedule.due(11, active=monitor._policy.watching)  # every step while it is open
    healthy = {"out_logz_mean": 0.1}
    assert monitor._policy.decide(healthy, 10) == [] and monitor._policy.decide(healthy, 11) == []
    (recovered,) = monitor._policy.decide(healthy, 12)
    assert (recovered.kind, recovered.detection, recovered.off) == ("recovered", "logit_drift", ("z_loss", "softcap", "advise"))
    # a new checkpoint keeps the step of the last bad sample, and round-trips
    monitor.load_state_dict({"active": {"logit_drift": {"rung": 1, "repeats": 3, "since": 40}}})
    # (rung 1 after 3 repeats: the shared ladder's 4th strike, softcap on)
    assert monitor.state_dict()["active"] == {"logit_drift": {"strikes": 4, "failed": [], "on": "softcap", "then": None,
                                                              "since": 40}}
    assert monitor._policy.decide(healthy, 44) == [] and monitor._policy.decide(healthy, 45)[0].kind == "recovered"


def test_the_remedies_are_registered_in_their_documented_order_and_their_state_round_trips():
    from lightning_stability.callbacks._softmax_remedies import RUNGS

    assert RUNGS == ("z_loss", "softcap", "perp_grad", "qk_clip", "attn_softcap", "advise")
    monitor = SoftmaxSaturationMonitor()
    monitor.load_state_dict({"remedy_on": {"qk_clip": 4, "attn_softcap": 9}})
    assert monitor.active_remedies == ["attn_softcap", "qk_clip"]
    assert monitor.state_dict()["remedy_on"] == {"qk_clip": 4, "attn_softcap": 9}
    monitor.load_state_dict({})  # an empty state switches every remedy off
    assert monitor.active_remedies == [] and monitor.state_dict()["remedy_on"] == {}


@pytest.mark.parametrize(("later", "reverted"), [(30.0, False), (50.0, True)], ids=["held", "got-worse"])
def test_a_remedy_under_which_its_statistic_got_worse_is_switched_off_and_not_used_again(later, reverted):
    """z-loss is on from the drift's detection at |log Z| = 30; at the climb after ``patience`` repeats
    the statistic is judged against that: held at 30 the remedy stays on beside the next rung; at 50
    (worse than 30 / release) it is switched off, the decision says so, and the incident goes on
    without it, also once it ends and the ladder's rungs are switched off."""
    monitor = SoftmaxSaturationMonitor(logz_limit=5.0, patience=2, cooldown=3, warmup=0, remedies=DRIFT_LADDER)
    policy = monitor._policy
    (first,) = policy.decide({"out_logz_mean": -30.0}, 10)
    assert (first.kind, first.rung) == ("detected", "z_loss")
    assert policy.decide({"out_logz_mean": -later}, 11) == []
    decisions = policy.decide({"out_logz_mean": -later}, 12)
    assert [(d.kind, d.rung) for d in decisions] == ([("reverted", "z_loss")] if reverted else []) + [("detected", "softcap")]
    if reverted:
        assert decisions[0].off == ("z_loss",)
        assert (decisions[0].metrics["then"], decisions[0].metrics["now"]) == (30.0, later)
    assert policy.ladders["logit_drift"].failed == (("z_loss",) if reverted else ())
    assert policy.ladders["logit_drift"].then == later  # softcap is judged against the value it started at
    # round-trips with the checkpoint
    fresh = SoftmaxSaturationMonitor(logz_limit=5.0, patience=2, cooldown=3, warmup=0, remedies=DRIFT_LADDER)
    fresh.load_state_dict(monitor.state_dict())
    assert fresh.state_dict()["active"] == monitor.state_dict()["active"]


class _GrowHead(pl.Callback):
    """Scales the output head's weight by ``factor`` after every optimizer step from ``start``: the
    logits' scale, and |log Z| with it, grows whatever z-loss does."""

    def __init__(self, start: int, factor: float) -> None:
        self.start, self.factor = start, factor

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step - 1 >= self.start:
            with torch.no_grad():
                pl_module.lm_head.weight.mul_(self.factor)


def test_z_loss_that_cannot_hold_a_growing_log_z_is_switched_off_in_a_fit(tmp_path):
    model, loader = tiny_gpt(40)
    monitor = SoftmaxSaturationMonitor(every_n_steps=1, logz_limit=4.0, patience=2, cooldown=50, warmup=0,
                                       attention=False, remedies={"logit_drift": ("z_loss", "advise")})
    trainer = make_trainer(tmp_path, 30, [_GrowHead(5, 1.4), monitor])
    with pytest.warns(UserWarning, match="logit_drift"):
        trainer.fit(model, loader)
    events = [e for e in get_event_log(trainer) if e.source == monitor.source]
    (on,) = [e for e in events if e.kind == "logit_drift" and e.action == "z_loss"]
    (off,) = [e for e in events if e.kind == "intervention_reverted"]
    assert off.action == "revert_z_loss" and off.step > on.step and off.metrics["now"] > off.metrics["then"] / 0.8
    assert "z_loss" not in monitor.active_remedies
    assert not any(e.action == "z_loss" for e in events if e.step > off.step)
