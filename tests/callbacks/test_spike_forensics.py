"""Which layer and which batch a guard detection concerns, on models nobody here wrote."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch

from lightning_stability import GradientSpikeGuard, get_event_log
from lightning_stability.events import StabilityEvent
from tests.clients.models import Client, loader

pytest.importorskip("transformers")
SPIKE_AT = 40


class OneLayerSpike(pl.Callback):
    """At ``step``, one parameter's gradient times 1000: the guard must name that one first."""

    def __init__(self, name: str, step: int = SPIKE_AT) -> None:
        self.name, self.step = name, step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            with torch.no_grad():
                dict(pl_module.named_parameters())[self.name].grad.mul_(1000.0)


@pytest.mark.parametrize(("model", "batch", "layer"), [
    ("gpt2", "tuple", "model.transformer.h.1.mlp.c_fc.weight"),  # Conv1D, a tuple batch: no ids
    ("llama", "dict", "model.model.layers.0.self_attn.q_proj.weight"),  # GQA, a dict batch with "index"
])
def test_a_spike_in_one_layer_names_that_layer_first_and_the_batch(tmp_path, model, batch, layer):
    pl.seed_everything(0, verbose=False)
    guard = GradientSpikeGuard()
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=SPIKE_AT + 2, callbacks=[OneLayerSpike(layer), guard],
                         accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Client(model), loader(model, batch))
    (event,) = [e for e in get_event_log(trainer) if e.step == SPIKE_AT and e.severity != "info"]
    first, *rest = event.details["layers"]
    assert first["name"] == layer and 200 < first["ratio"] < 5000  # x1000 against its own last healthy norm
    assert len(rest) == 2 and all(r["ratio"] < 10 for r in rest)  # the others did not move
    if batch == "dict":  # the dataset's own ids: batch 40 of 8 samples, in order
        assert event.details["sample_ids"] == list(range(8 * SPIKE_AT, 8 * SPIKE_AT + 8))
    else:
        assert event.details["batches"] == [[0, SPIKE_AT]]
    # the details travel with the event: JSON and back
    again = StabilityEvent.from_dict(json.loads(json.dumps(event.to_dict())))
    assert again == event
    quiet = [e for e in get_event_log(trainer) if e.severity == "info"]
    assert quiet and all(not e.details for e in quiet)  # nothing is gathered for events that are no detection


def test_under_accumulation_the_step_names_every_micro_batch(tmp_path):
    pl.seed_everything(0, verbose=False)
    guard = GradientSpikeGuard(sample_ids=None)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=SPIKE_AT + 2, accumulate_grad_batches=2,
                         callbacks=[OneLayerSpike("model.transformer.h.0.attn.c_attn.weight"), guard],
                         accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Client("gpt2"), loader("gpt2", "dict", n=1024))
    (event,) = [e for e in get_event_log(trainer) if e.step == SPIKE_AT and e.severity != "info"]
    assert event.details["layers"][0]["name"] == "model.transformer.h.0.attn.c_attn.weight"
    assert event.details["batches"] == [[0, 2 * SPIKE_AT], [0, 2 * SPIKE_AT + 1]]  # both micro-batches of step 40
    assert guard._forensics.batches == [] or guard._forensics.step > SPIKE_AT  # nothing held past its step


class PerSample(Client):
    """A user's step that returns each sample's loss beside the mean (under ``"sample_losses"``), with
    one bad sample at ``SPIKE_AT``: its loss x50, as a corrupted sequence would have."""

    BAD_ROW = 3

    def training_step(self, batch, batch_idx):
        from tests.clients.models import VOCAB, unpack

        x, y = unpack(batch)
        logits = self.model(input_ids=x).logits
        per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), reduction="none")
        per_sample = per_token.view(x.shape[0], -1).mean(1)
        if self.trainer.global_step == SPIKE_AT:
            per_sample = per_sample * (1 + 49 * (torch.arange(x.shape[0]) == self.BAD_ROW).float())
        return {"loss": per_sample.mean(), "sample_losses": per_sample}


@pytest.mark.parametrize(("batch", "accumulate"), [("dict", 1), ("tuple", 2)])
def test_per_sample_losses_follow_the_detection_and_name_the_bad_sample_first(tmp_path, batch, accumulate):
    pl.seed_everything(0, verbose=False)
    guard = GradientSpikeGuard()
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=SPIKE_AT + 2, callbacks=[guard],
                         accumulate_grad_batches=accumulate, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(PerSample("llama"), loader("llama", batch, n=8 * accumulate * (SPIKE_AT + 2)))
    log = get_event_log(trainer)
    (detection,) = [e for e in log if e.step == SPIKE_AT and e.severity != "info"]
    follows = [e for e in log if e.kind == "sample_losses"]
    detected = {e.step for e in log if e.source == "GradientSpikeGuard" and e.severity != "info"}
    assert {e.step for e in follows} == detected  # one after each detection, at its step; none on a quiet step
    (follow,) = [e for e in follows if e.step == SPIKE_AT]
    assert list(log).index(follow) > list(log).index(detection)
    losses = follow.details["sample_losses"]
    assert follow.metrics["samples"] == 8 * accumulate and len(losses) == min(16, 8 * accumulate)
    assert losses == sorted(losses, reverse=True) and losses[0] > 20 * follow.metrics["loss_median"]
    first = follow.details["sample_ids"][0]
    if batch == "dict":  # the dataset's own id of row 3 of batch 40
        assert first == 8 * SPIKE_AT + PerSample.BAD_ROW
    else:  # no ids: [epoch, batch_idx, row] of both micro-batches' bad rows, the worst first
        assert first in ([0, 2 * SPIKE_AT, 3], [0, 2 * SPIKE_AT + 1, 3])
        assert follow.details["sample_ids"][1] in ([0, 2 * SPIKE_AT, 3], [0, 2 * SPIKE_AT + 1, 3])
    assert guard._forensics.losses == [] or guard._forensics.step > SPIKE_AT  # nothing held past its step


class BadUpdate(pl.Callback):
    """After the optimizer step before ``step``, noise three times the weight's own scale added to one
    layer's weight: an update far out of line with the others, which the next step's loss pays for."""

    def __init__(self, name: str, step: int = SPIKE_AT) -> None:
        self.name, self.step = name, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:  # the step before SPIKE_AT has just run
            w = dict(pl_module.named_parameters())[self.name]
            with torch.no_grad():
                w.add_(3.0 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))


def test_a_detection_names_the_layers_whose_last_update_was_largest_under_the_guards_names(tmp_path):
    from lightning_stability import SpectralMonitor
    from lightning_stability.report import _incident_rows, load_run

    layer = "model.transformer.h.1.mlp.c_fc.weight"  # GPT-2's Conv1D: the spectral monitor calls it h.1.mlp.c_fc
    pl.seed_everything(0, verbose=False)
    guard, spectral = GradientSpikeGuard(), SpectralMonitor(check_every_n_steps=SPIKE_AT + 1)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=SPIKE_AT + 2, callbacks=[BadUpdate(layer), guard, spectral],
                         accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Client("gpt2"), loader("gpt2", "tuple"))
    log = list(get_event_log(trainer))
    detections = {e.step for e in log if e.source == "GradientSpikeGuard" and e.severity != "info"}
    updates = [e for e in log if e.kind == "update_ratio"]
    assert SPIKE_AT in detections and {e.step for e in updates} == detections  # one at each detection, no other
    (update,) = [e for e in updates if e.step == SPIKE_AT]
    first, *rest = update.details["layers"]
    assert first["name"] == layer and first["ratio"] > 0.5  # noise of 3x the weight's scale
    assert len(rest) == 2 and all(r["ratio"] < first["ratio"] / 10 for r in rest)  # ordinary AdamW updates
    assert update.details["measured_at"] == SPIKE_AT - 1 and update.metrics["update_ratio_max"] == first["ratio"]
    assert spectral._forensics.parameters["model.transformer.h.1.mlp.c_fc"] == layer  # its own name for the layer
    # and the report's incident row says it
    (tmp_path / "stability_events.jsonl").write_text("\n".join(json.dumps(e.to_dict()) for e in log))
    (row,) = [r for r in _incident_rows(load_run(str(tmp_path))) if r[0] == str(SPIKE_AT)][:1]
    assert row[4].startswith(f"{layer} (")
