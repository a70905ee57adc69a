"""The batch contract between a stage and the engine.

A stage hands the engine micro-batches in one of two forms:
- a plain dict of tensors from its `collate` (offline stages): the engine counts it with the stage's
  `loss_units(batch)` and `token_counts(batch)` (default: `batching.token_counts`, for causal-LM batches);
- a `CountedBatch` from its `rollout` (online stages), which carries its counts with it, because they were
  known when the rollout built it (a completion's loss units depend on the loss type, not on the tensors).
The engine reads nothing else from a batch, except the width of `input_ids` (the row length its FLOPs
estimate needs); the stage's `loss` receives the dict of tensors.

Rows may carry one bookkeeping entry of the engine's: `loader.ROW_INDEX`, each row's position in the data
set, added for a stage that declares `row_index` (its collate passes it on to its loss).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from minimind_scale.data.batching import token_counts


@dataclass
class CountedBatch:
    tensors: dict[str, Any]  # what the stage's loss reads
    loss_units: float        # what the loss sums over; a step's loss is divided by their total over all processes
    label_tokens: float = 0.0   # loss-bearing tokens, reported as metrics.jsonl's `tokens`
    input_tokens: float = 0.0   # real tokens the model reads, for throughput and MFU


# What a step trains on: a collated dict, or a rollout's CountedBatch.
MicroBatch = dict | CountedBatch


def counted(batch: MicroBatch, spec) -> CountedBatch:
    """`batch` with its counts: a CountedBatch as it is, a dict counted by the stage `spec` (a StageSpec)."""
    if isinstance(batch, CountedBatch):
        return batch
    if spec.loss_units is None:
        raise RuntimeError(f"stage '{spec.name}' has no loss_units, so its micro-batches must be CountedBatch "
                           f"objects; it gave a {type(batch).__name__}")
    label_tokens, input_tokens = (spec.token_counts or token_counts)(batch)
    return CountedBatch(batch, float(spec.loss_units(batch)), float(label_tokens), float(input_tokens))


def row_length(batch: CountedBatch) -> int:
    """The width of the batch's rows (0 for a batch without `input_ids`), for the FLOPs per token."""
    ids = batch.tensors.get("input_ids")
    return int(ids.shape[1]) if ids is not None else 0
