"""The GRPO family's rollout and loss, shared by the grpo and agent stages (they differ in how a group of
completions is produced: single-turn sampling, or multi-turn trajectories that call tools).

The rollout scores each prompt's group of num_generations completions, turns the rewards into
group-normalised advantages, records the frozen log-probs once (the reference's; the old policy's when
a rollout serves num_iterations > 1 updates) and returns one micro-batch per loader batch. The loss is
the registered `loss_type`'s objective and aggregation (losses/policy.py) plus the k3 KL.
"""
from __future__ import annotations

import time

import torch

from minimind_scale.losses.causal_lm import LossOutput
from minimind_scale.losses.policy import loss_units, reduce_policy_loss, scale_advantages, token_loss
from minimind_scale.rl.rollout import Collected, Producer, collect, counted_batch
from minimind_scale.rl.sampling import Samples, completion_logprobs
from minimind_scale.training.batch import CountedBatch
from minimind_scale.training.context import Rollout


def steps_per_rollout(cfg) -> int:
    return cfg.num_iterations


def group_rollout(model, batches: list[dict], cfg, ctx, produce: Producer) -> Rollout:
    """Produce and score each loader batch's groups with `produce`, then build the micro-batches and metrics."""
    collected = collect(model, batches, cfg, ctx, produce, steps_per_rollout(cfg))
    rewards = collected.rewards
    advantages, group_std = scale_advantages(rewards, cfg.num_generations, cfg.scale_rewards)
    micro, start, started = [], 0, time.perf_counter()
    for scored in collected.batches:
        n = scored.samples.sequences.shape[0]
        micro.append(train_batch(model, scored.samples, advantages[start:start + n], cfg, ctx))
        start += n
    collected.seconds["reference"] = time.perf_counter() - started
    return Rollout(micro, {**collected.metrics(), **group_metrics(collected, advantages, group_std)})


def train_batch(model, samples: Samples, advantages: torch.Tensor, cfg, ctx) -> CountedBatch:
    """One micro-batch: the sequences, their completion mask, advantages, and the frozen log-probs
    (reference; old policy when a rollout serves several updates). Its unit count is the loss type's."""
    tensors = {"input_ids": samples.sequences, "attention_mask": samples.attention_mask,
               "completion_mask": samples.completion_mask, "advantages": advantages.to(samples.sequences.device),
               "prompt_len": samples.prompt_len}
    with ctx.accelerator.autocast():
        if cfg.num_iterations > 1:
            tensors["old_logps"] = completion_logprobs(model, samples.sequences, samples.attention_mask,
                                                       samples.prompt_len, cfg.temperature)
        if ctx.state.ref_model is not None:
            tensors["ref_logps"] = completion_logprobs(ctx.state.ref_model, samples.sequences,
                                                       samples.attention_mask, samples.prompt_len, cfg.temperature)
    return counted_batch(tensors, loss_units(cfg.loss_type, samples.completion_mask))


def group_metrics(collected: Collected, advantages: torch.Tensor,
                  group_std: torch.Tensor) -> dict[str, tuple[float, float]]:
    """(sum, count) on this process: each group's reward std, the share of groups that taught nothing (all
    rewards equal), and the advantages' std."""
    n_groups = float(group_std.numel())
    return {"reward_std": (float(group_std.sum()), n_groups),
            "frac_reward_zero_std": (float((group_std == 0).sum()), n_groups),
            "advantage_std": (float(advantages.std()) if advantages.numel() > 1 else 0.0, 1.0)}


def loss(model, batch: dict, cfg, ctx) -> LossOutput:
    """The loss type's sum over this micro-batch, with the KL and clip ratio per completion token."""
    logps = completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["prompt_len"],
                                cfg.temperature)
    mask = batch["completion_mask"]
    terms = token_loss(cfg.loss_type, logps, batch.get("old_logps"), batch["advantages"], epsilon=cfg.epsilon,
                       epsilon_high=cfg.clip_high, ref_logps=batch.get("ref_logps"), beta=cfg.beta)
    loss_sum = reduce_policy_loss(terms.loss, mask, cfg.loss_type, cfg.max_gen_len)
    m = mask.float()
    tokens = m.sum()
    kl = (terms.kl.detach() * m).sum() if terms.kl is not None else m.new_zeros(())
    metrics = {"kl": kl, "clip_ratio": (terms.clipped.float() * m).sum()}
    return LossOutput(loss_sum, metrics, metric_units={"kl": tokens, "clip_ratio": tokens})
