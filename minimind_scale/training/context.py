"""What a stage's hooks receive besides the model, the batch and the config: the run's shared objects
and the stage's own state, both typed."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from minimind_scale.training.batch import MicroBatch


class StageState:
    """A stage's own per-run state: auxiliary models, precomputed tables, running statistics, an RNG.

    Subclass it (a dataclass works) and name the class as the StageSpec's `state`; the engine creates one
    per run before `setup`. What `state_dict()` returns is saved in every checkpoint, per process, and
    handed back to `load_state_dict()` on resume. By default nothing is saved: models and tables that
    `setup` rebuilds from the config do not belong in it.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class StageContext:
    """Handed to a stage's setup, loss, rollout and finalize."""

    tokenizer: Any
    accelerator: Any
    out_dir: Path
    dataset: Any   # the tokenised (possibly packed) training rows; a held-out set's rows while evaluating
    state: StageState
    # The held-out sets (--val_size's "val", --eval_data_path's), by name: unpacked rows encoded as
    # given. Present from setup on, so a stage can precompute per-row tables for them too.
    eval_sets: dict[str, Any] = field(default_factory=dict)
    evaluating: str | None = None  # the held-out set being measured; None while training


@dataclass
class Rollout:
    """What a stage's rollout returns: the micro-batches to train on, and metrics of its own.

    Each micro-batch is a dict of tensors or a batch.CountedBatch (the batch contract, StageSpec).
    `metrics` maps a name to (sum, count) on this process; the engine logs Σ sum / Σ count over all
    processes (mean reward over completions, completion length, the share of clipped completions).
    A rollout may also return a plain list of micro-batches.

    `steps`, when given, replaces `micro_batches`: the micro-batches of each optimizer step, for a stage
    whose steps on one rollout train on different rows (PPO's shuffled mini-batches, epoch after epoch).
    It may hold fewer entries than the stage's steps_per_rollout (a short last window of an epoch); the
    steps it lacks are skipped. Every process must plan the same number of steps; under DeepSpeed a step
    holds at most accumulation_steps micro-batches (DeepSpeed steps its optimizer at that count).
    """

    micro_batches: list[MicroBatch] = field(default_factory=list)
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)
    steps: list[list[MicroBatch]] | None = None

    def plan(self, steps_per_rollout: int) -> list[list[MicroBatch]]:
        """The micro-batches of each step this rollout trains."""
        return self.steps if self.steps is not None else [self.micro_batches] * steps_per_rollout
