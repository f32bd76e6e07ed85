"""Locating in shards, for workers on several machines: the pieces and their merges.

One pass (lego_core.locate) = selection over every row, contribution sums over the
selected samples, masks from the sums. Split across workers:

1. selection: `selection_ranges` cuts the rows into contiguous ranges on multiples of
   the selection batch, so every row is scored in the same batch as in one pass;
   `select_shard` scores one range and keeps its top `samples_per_class` candidates
   per class with their scores; `merge_selections` keeps the best of all candidates,
   ordered as one pass orders them (score, then row). The global top N of a class
   is among the shards' top Ns, so the merge equals `select_samples`.
2. contributions: `lego_core.locate.shard_plan` splits the selected samples on
   whole classes; `contribution_sums` per shard; `add_sums` adds them (float64 sums of
   float32 batches: the order of the shards does not change the result).
3. masks: `masks_from_sums`, once, on the merged sums.

`save_shard` / `load_shard` store a shard's result (tensors only, read back with
torch.load(weights_only=True)) atomically, so a shard that is done twice (a worker
that died after writing, a redelivered message) writes the same file again and is
counted once.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lego_core.errors import LegoError
from lego_core.files import atomic_write
from lego_core.locate import (
    SELECT_BATCH,
    _check_data_spec,
    class_mapping,
    forward_batch,
    true_class_scores,
)
from lego_core.model import SourceModel


def selection_batch(model: SourceModel) -> int:
    """The batch `select_samples` scores `model` in: selection shards start on its
    multiples so that every row is scored in the same batch as in one pass."""
    return forward_batch(model, SELECT_BATCH)


Candidates = dict[int, tuple[torch.Tensor, torch.Tensor]]  # class -> (rows, scores)


def selection_ranges(rows: int, shards: int, batch: int = SELECT_BATCH) -> list[tuple[int, int]]:
    """`shards` contiguous row ranges (fewer when there are fewer batches), each
    starting on a multiple of `batch`."""
    batches = max(1, -(-rows // batch))
    shards = max(1, min(int(shards), batches))
    bounds = [min(rows, round(k * batches / shards) * batch) for k in range(shards + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


@torch.no_grad()
def select_shard(
    model: SourceModel,
    data,
    start: int,
    stop: int,
    samples_per_class: int,
    device: str | torch.device = "cpu",
) -> Candidates:
    """The top `samples_per_class` rows of [start, stop) per model class, by true-class
    probability, with those probabilities, scored by `select_samples`' own
    `true_class_scores` in batches aligned as in one pass (`selection_batch`)."""
    if samples_per_class < 1:
        raise LegoError("samples_per_class must be at least 1")
    batch = selection_batch(model)
    if start % batch:
        raise LegoError(f"a selection shard starts on a multiple of {batch}, not at {start}")
    _check_data_spec(model, data)
    labels = class_mapping(model, data)[data.labels]
    rows = torch.arange(start, min(stop, len(data)))
    scores = true_class_scores(model, data, labels, rows, SELECT_BATCH, device)
    out: Candidates = {}
    shard_labels = labels[rows]
    for c in sorted(set(shard_labels[shard_labels >= 0].tolist())):
        members = torch.nonzero(shard_labels == c).flatten()
        order = torch.sort(-scores[members], stable=True).indices[:samples_per_class]
        out[c] = (rows[members[order]].clone(), scores[members[order]].clone())
    return out


def merge_selections(shards: list[Candidates], samples_per_class: int) -> dict[int, torch.Tensor]:
    """The selected rows per class from the shards' candidates: highest score first,
    ties by row, as `select_samples` orders them."""
    merged: dict[int, torch.Tensor] = {}
    for c in sorted({c for shard in shards for c in shard}):
        rows = torch.cat([s[c][0] for s in shards if c in s])
        scores = torch.cat([s[c][1] for s in shards if c in s])
        by_row = torch.argsort(rows, stable=True)
        rows, scores = rows[by_row], scores[by_row]
        order = torch.sort(-scores, stable=True).indices[:samples_per_class]
        merged[c] = rows[order].clone()
    return merged


def save_shard(path: str | Path, result: dict) -> None:
    """Writes a shard's result (tensors, numbers, strings in dicts/lists) atomically."""
    atomic_write(path, lambda f: torch.save(result, f))


def load_shard(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise LegoError(f"not a shard result: {path}: {exc}") from None


def candidates_state(c: Candidates) -> dict:
    """`Candidates` as a dict that `save_shard` stores (string keys)."""
    return {str(k): {"rows": r, "scores": s} for k, (r, s) in c.items()}


def candidates_from_state(state: dict) -> Candidates:
    return {int(k): (v["rows"], v["scores"]) for k, v in state.items()}


__all__ = [
    "candidates_from_state",
    "candidates_state",
    "load_shard",
    "merge_selections",
    "save_shard",
    "select_shard",
    "selection_ranges",
]
