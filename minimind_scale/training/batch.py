"""The batch contract between a stage and the engine.

A stage hands the engine micro-batches in one of two forms:
- a plain dict of tensors from its `collate` (offline stages): the engine counts it with the stage's
  `loss_units(batch)` and `token_counts(batch)`;
- a `CountedBatch` from its `rollout` (online stages), which carries its counts with it, because they were
  known when the rollout built it (a completion's loss units depend on the loss type, not on the tensors).
The engine reads nothing else from a batch; the stage's `loss` receives the dict of tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class CountedBatch:
    tensors: dict[str, Any]  # what the stage's loss reads
    loss_units: float        # what the loss sums over; a step's loss is divided by their total over all processes
    label_tokens: float = 0.0   # loss-bearing tokens, reported as metrics.jsonl's `tokens`
    input_tokens: float = 0.0   # real tokens the model reads, for throughput and MFU
