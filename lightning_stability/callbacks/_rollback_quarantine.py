"""The rollback's quarantine: the batches a rollback discarded, by their sample ids or their position.

The rollback does not replay the batches consumed since the snapshot it restores: it records them in
``<run dir>/quarantine.json`` (with their sample ids where the batch carries them), so that a later
run can leave them out (:func:`read_quarantine`). Only the ids are kept of a batch, never the batch.

No Lightning here: the callback says which batch belongs to which step and gathers the records of
every rank; this module extracts ids, keeps them per step and writes the file.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

QUARANTINE_FILE = "quarantine.json"
SampleIds = str | Callable[[Any], Any] | None


def check_sample_ids(owner: str, value: Any) -> SampleIds:
    if value is not None and not isinstance(value, str) and not callable(value):
        raise TypeError(f"{owner}(sample_ids={value!r}): expected a batch key (str), a callable or None")
    return value


@dataclass
class BatchRecord:
    step: int  # the optimizer step the batch contributed to
    epoch: int
    batch_idx: int
    sample_ids: Any  # a tensor or a sequence, converted to a list only when the batch is quarantined

    def record(self, rank: int) -> dict[str, Any]:
        return {"rank": rank, "step": self.step, "epoch": self.epoch, "batch_idx": self.batch_idx,
                "sample_ids": to_list(self.sample_ids)}


class BatchLog:
    """The batches of the steps a rollback may still discard (those since the oldest snapshot held)."""

    def __init__(self) -> None:
        self.batches: list[BatchRecord] = []

    def add(self, batch: BatchRecord) -> None:
        self.batches.append(batch)

    def prune(self, oldest: int) -> None:
        self.batches = [b for b in self.batches if b.step >= oldest]

    def take_since(self, step: int) -> list[BatchRecord]:
        """Remove and return the batches of the steps from ``step`` on."""
        taken = [b for b in self.batches if b.step >= step]
        self.batches = [b for b in self.batches if b.step < step]
        return taken


def sample_ids_of(batch: Any, spec: SampleIds) -> Any:
    """The batch's sample ids (``spec``: a key, an attribute name or a function), or ``None`` (the batch
    is then known by its position).

    Only the ids are kept, never the batch: a bound method (``tuple.index``, ``list.index``) or any
    other attribute that is not id-like is not taken for ids.
    """
    if spec is None:
        return None
    if callable(spec):
        ids = spec(batch)
    elif isinstance(batch, Mapping):
        ids = batch.get(spec)
    elif isinstance(batch, (tuple, list)) and not hasattr(batch, "_fields"):
        ids = None  # a plain tuple or list has no named fields; its attributes are its methods
    else:
        ids = getattr(batch, spec, None)  # dataclasses, named tuples, custom batches
    return detached_ids(ids)


def detached_ids(ids: Any) -> Any:
    """Sample ids that keep nothing else alive: a tensor, a list of scalars, or ``None`` when ``ids``
    does not look like ids (a method, a string of text, a nested structure)."""
    if ids is None or callable(ids):
        return None
    if isinstance(ids, Tensor):
        ids = ids.detach()
        if ids.untyped_storage().nbytes() > ids.numel() * ids.element_size():
            ids = ids.clone()  # a view of a larger tensor would keep all of it
        return ids
    if isinstance(ids, (bool, int, str)) or (hasattr(ids, "tolist") and not isinstance(ids, (list, tuple))):
        return to_list(ids)
    if isinstance(ids, Sequence) and all(isinstance(i, (int, str)) or isinstance(i, Tensor) and i.numel() == 1 for i in ids):
        return list(ids)
    return None


def to_list(ids: Any) -> list[Any] | None:
    if ids is None:
        return None
    if isinstance(ids, Tensor):
        return ids.detach().flatten().cpu().tolist()
    if hasattr(ids, "tolist"):  # numpy arrays and scalars
        out = ids.tolist()
        return out if isinstance(out, list) else [out]
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        return [ids]
    return [i.item() if hasattr(i, "item") else i for i in ids]


def gather_records(items: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
    """Every rank's records, rank by rank."""
    # Records of different lengths from each rank, once per rollback: all_gather_object fits, tensors do not.
    if world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return items
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, items)
    return [r for rank_items in gathered for r in rank_items]


def write_quarantine(run_dir: str, step: int, restored: int, reason: str, records: list[dict[str, Any]]) -> None:
    """Add a rollback's quarantined batches to ``<run_dir>/quarantine.json``, and the union of every
    rollback's sample ids. The file is replaced whole (a crash mid-write leaves the previous one)."""
    path = os.path.join(run_dir, QUARANTINE_FILE)
    data: dict[str, Any] = {"version": 1, "rollbacks": []}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data["rollbacks"].append({"step": step, "restored_step": restored, "reason": reason, "batches": records})
    ids = {i for rb in data["rollbacks"] for r in rb["batches"] for i in (r["sample_ids"] or [])}
    data["sample_ids"] = sorted(ids, key=lambda i: (isinstance(i, str), i if isinstance(i, (int, float)) else str(i)))
    os.makedirs(run_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def read_quarantine(path: str | os.PathLike[str]) -> set[Any]:
    """The sample ids quarantined in ``quarantine.json`` (a file, or the run directory holding it).

    Feed them back to leave those samples out of a later run::

        skip = read_quarantine("runs/demo/version_0")
        keep = [i for i in range(len(dataset)) if i not in skip]
        loader = DataLoader(torch.utils.data.Subset(dataset, keep), ...)
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, QUARANTINE_FILE)
    with open(path) as f:
        data = json.load(f)
    return {i for rollback in data.get("rollbacks", []) for r in rollback["batches"] for i in (r["sample_ids"] or [])}


def quarantine(batches: list[BatchRecord], rank: int, world_size: int, writes: bool, run_dir: str,
               rollback: tuple[int, int, str], emit: Callable[[dict[str, float], dict[str, Any]], None],
               owner: str) -> list[dict[str, Any]]:
    """Quarantine the batches a rollback discarded: every rank's records (gathered), a ``quarantine``
    event each through ``emit`` (its details: the batch's ``sample_ids``, the same on every rank), and
    the file written where ``writes`` (rank zero). ``rollback`` is
    (step, restored step, reason). A file that cannot be written is warned about: the rollback itself
    is done, and losing the file must not stop training."""
    records = gather_records([b.record(rank) for b in batches], world_size)
    for r in records:
        emit({"epoch": float(r["epoch"]), "batch_idx": float(r["batch_idx"]), "batch_step": float(r["step"]),
              "rank": float(r["rank"]), "samples": float(len(r["sample_ids"] or []))},
             {"sample_ids": r["sample_ids"]} if r["sample_ids"] else {})
    if writes:
        try:
            write_quarantine(run_dir, *rollback, records)
        except OSError as err:
            warnings.warn(f"{owner}: could not write {os.path.join(run_dir, QUARANTINE_FILE)}: {err}", stacklevel=2)
    return records
