"""The online stages' one path from a step's loader batches to scored completions, and the micro-batches they
train on.

`collect` runs a stage's producer on every loader batch (sample and score; or the agent stage's multi-turn
trajectories), times generation apart from scoring, counts the rollout and logs a few completions;
`Collected.metrics` gives what every online stage reports. A stage then builds what differs from the
scored completions (GRPO's group advantages, PPO's GAE experience) and wraps each micro-batch with
`counted_batch`, which carries the counts the engine normalises by (training/batch.py).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from minimind_scale.chat.markup import TURN_END
from minimind_scale.rl.sampling import Samples, sample
from minimind_scale.rl.scoring import log_completions, score_samples
from minimind_scale.training.batch import CountedBatch


@dataclass
class ScoredBatch:
    """One loader batch's completions (num_samples rows per prompt, grouped by prompt) and their rewards."""

    samples: Samples
    rewards: torch.Tensor          # [rows] the weighted reward of each completion
    per_function: dict[str, list]  # each reward's value per row (None where it did not apply)
    prompts: list                  # each row's prompt messages
    texts: list[str]               # each row's completion as completions.jsonl shows it
    reward_sec: float = 0.0        # of the producer's time, what scoring took
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)  # the stage's own: (sum, count)


# (model, loader batch, cfg, ctx) -> ScoredBatch
Producer = Callable[[Any, dict, Any, Any], ScoredBatch]


@dataclass
class Collected:
    """A rollout's scored batches, in loader order, and the wall time of each rollout phase on this process
    (a stage adds its own phases, e.g. "reference", before reading the metrics)."""

    batches: list[ScoredBatch]
    seconds: dict[str, float]

    @property
    def rewards(self) -> torch.Tensor:
        return torch.cat([b.rewards for b in self.batches])

    def metrics(self) -> dict[str, tuple[float, float]]:
        """(sum, count) on this process for what every online stage logs: the mean reward and each reward's
        mean, the completion length, the share of completions cut at max_gen_len, the producer's own
        metrics and each phase's seconds. The engine averages them over all processes."""
        rewards = self.rewards
        lengths = torch.cat([b.samples.completion_mask.sum(dim=1) for b in self.batches]).float()
        clipped = torch.cat([b.samples.clipped for b in self.batches]).float()
        n = float(rewards.numel())
        metrics = {"reward": (float(rewards.sum()), n), "completion_length": (float(lengths.sum()), n),
                   "completion_clipped_ratio": (float(clipped.sum()), n), **per_function_metrics(self.batches)}
        for b in self.batches:
            for name, (total, count) in b.metrics.items():
                before = metrics.get(name, (0.0, 0.0))
                metrics[name] = (before[0] + total, before[1] + count)
        metrics.update({f"time/{phase}_sec": (value, 1.0) for phase, value in self.seconds.items()})
        return metrics


def per_function_metrics(batches: list[ScoredBatch]) -> dict[str, tuple[float, float]]:
    """(sum, count) of each reward's values as `rewards/<name>`, counting only the completions it applied to
    (a None is neither a 0 nor counted)."""
    metrics = {}
    for name in batches[0].per_function:
        values = [v for b in batches for v in b.per_function[name] if v is not None]
        metrics[f"rewards/{name}"] = (float(sum(values)), float(len(values)))
    return metrics


def collect(model, batches: list[dict], cfg, ctx, produce: Producer, steps_per_rollout: int) -> Collected:
    """Produce and score every loader batch of this step, count the rollout (ctx.state.rollouts) and log a
    few completions when the rollout's steps include a logged one."""
    ctx.state.generator.update_weights(model)  # the policy as the last optimizer step left it
    scored, seconds = [], {"generation": 0.0, "reward": 0.0}
    for batch in batches:
        started = time.perf_counter()
        part = produce(model, batch, cfg, ctx)
        scored.append(part)
        seconds["generation"] += time.perf_counter() - started - part.reward_sec
        seconds["reward"] += part.reward_sec
    collected = Collected(scored, seconds)
    ctx.state.rollouts += 1
    log_completions(ctx.out_dir / "completions.jsonl", cfg, ctx.state.rollouts * steps_per_rollout, steps_per_rollout,
                    [p for b in scored for p in b.prompts], [t for b in scored for t in b.texts], collected.rewards,
                    ctx.accelerator.is_main_process)
    return collected


def sample_and_score(model, batch: dict, cfg, ctx, num_samples: int) -> ScoredBatch:
    """`num_samples` single-turn completions per prompt of a collated prompt batch, scored."""
    end_id = ctx.tokenizer.convert_tokens_to_ids(TURN_END)
    samples = sample(model, batch["input_ids"], batch["attention_mask"], num_samples=num_samples,
                     max_new_tokens=cfg.max_gen_len, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                     end_id=end_id, pad_id=ctx.tokenizer.pad_token_id, backend=ctx.state.generator)
    started = time.perf_counter()
    rewards, info = score_samples(ctx.state.scorer, ctx.tokenizer, batch, samples, num_samples, end_id)
    return ScoredBatch(samples, rewards, info["per_function"], info["prompts"], info["texts"],
                       reward_sec=time.perf_counter() - started)


def counted_batch(tensors: dict[str, Any], loss_units: float) -> CountedBatch:
    """A rollout's micro-batch with its counts: the loss-bearing tokens are the completion tokens
    (`completion_mask`), the input tokens every real token (`attention_mask`)."""
    return CountedBatch(tensors, float(loss_units), label_tokens=float(tensors["completion_mask"].sum()),
                        input_tokens=float(tensors["attention_mask"].sum()))
