"""grpo: online RL from rewards — sample a group of completions per prompt, score them, and train the
policy on group-normalised advantages (CISPO by default, as MiniMind; also GRPO, DAPO and Dr. GRPO).

The stage's rollout (run by the engine without gradients, on the unwrapped policy) generates, scores
with the reward functions and the optional reward model, computes advantages and the reference
(and, with num_iterations > 1, old-policy) log-probs once, and returns the micro-batches the loss
trains on. The loss formulas are plain functions in minimind_scale/policy_losses.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator

from minimind_scale import LossOutput, StageSpec, StageState, register_stage
from minimind_scale.chat.conversation import TURN_END
from minimind_scale.config import BatchSize, LearningRate, OutDir
from minimind_scale.data.rows import IGNORE_INDEX
from minimind_scale.losses.policy import loss_units, reduce_policy_loss, scale_advantages, token_loss
from minimind_scale.rl import prompts as prompt_rows
from minimind_scale.rl.config import OnlineRLConfig
from minimind_scale.rl.sampling import completion_logprobs, sample
from minimind_scale.rl.scoring import RewardScorer, check_rewards, frozen_reference, log_completions, score_samples
from minimind_scale.training.context import Rollout


class GRPOConfig(OnlineRLConfig):
    """MiniMind's RLAIF defaults (train_grpo.py): 6 completions per prompt, beta 0.1 (k3 KL), CISPO with a
    ratio cap of 5, lr 3e-7 (sampling and reward options: online_config.py). With num_iterations 1 the
    importance ratio is 1 by construction, so the loss value sits near 0 while the policy still learns."""

    learning_rate: LearningRate = 3e-7
    batch_size: BatchSize = Field(2, description="prompts per micro-batch per process (each gives num_generations "
                                  "rows)")
    out_dir: OutDir = "out/grpo"
    num_generations: int = Field(6, ge=1, description="completions sampled per prompt (the group)")
    beta: float = Field(0.1, ge=0, description="weight of the k3 KL to the reference; 0 loads no reference model")
    loss_type: Literal["cispo", "grpo", "dapo", "dr_grpo"] = Field("cispo", description="policy loss and its "
                                                                   "normalisation (README, Online RL)")
    epsilon: float = Field(0.2, gt=0, description="lower clip of the ratio (grpo, dapo, dr_grpo)")
    epsilon_high: float | None = Field(None, gt=0, description="upper clip (default epsilon); for cispo the cap "
                                       "on the ratio weight (default 5.0)")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="advantage = (r − group mean) "
                                                             "divided by the group's std, the batch's std, or 1")
    num_iterations: int = Field(1, ge=1, description="optimizer steps on each rollout (old-policy log-probs are "
                                "computed once at rollout time)")

    @model_validator(mode="after")
    def _consistent(self):
        if self.num_generations == 1 and self.scale_rewards in ("group", "batch"):
            raise ValueError(f"num_generations 1 with scale_rewards {self.scale_rewards}: a group of one completion "
                             "always has advantage 0, so nothing would be learned; sample at least 2")
        return self

    @property
    def clip_high(self) -> float:
        if self.epsilon_high is not None:
            return self.epsilon_high
        return 5.0 if self.loss_type == "cispo" else self.epsilon


@dataclass
class GRPOState(StageState):
    """Frozen helpers built in setup, and the rollout count (checkpointed: it schedules completion logs).
    The sampling RNG is the process's torch RNG, which every checkpoint saves and resume restores."""

    scorer: RewardScorer | None = None
    ref_model: torch.nn.Module | None = None
    rollouts: int = 0

    def state_dict(self):
        return {"rollouts": self.rollouts}


# --------------------------------------------------------------------------- set-up and rollout


def setup(model, cfg, ctx):
    ctx.state.scorer = RewardScorer(cfg, ctx.accelerator.device)
    if cfg.beta > 0:
        ctx.state.ref_model = frozen_reference(model, cfg.ref_model, ctx.accelerator.device)
    return model


def rollout(model, batches: list[dict], cfg, ctx) -> Rollout:
    """Sample, score and build one micro-batch per loader batch of prompts."""
    return group_rollout(model, batches, cfg, ctx, sample_and_score)


def sample_and_score(model, batch: dict, cfg, ctx) -> tuple:
    """(samples, reward per completion, info) for one loader batch: num_generations completions per prompt."""
    end_id = ctx.tokenizer.convert_tokens_to_ids(TURN_END)
    samples = sample(model, batch["input_ids"], batch["attention_mask"], num_samples=cfg.num_generations,
                     max_new_tokens=cfg.max_gen_len, temperature=cfg.temperature, top_p=cfg.top_p,
                     top_k=cfg.top_k, end_id=end_id, pad_id=ctx.tokenizer.pad_token_id)
    started = time.perf_counter()
    rewards, info = score_samples(ctx.state.scorer, ctx.tokenizer, batch, samples, cfg.num_generations, end_id)
    return samples, rewards, {**info, "reward_sec": time.perf_counter() - started}


def group_rollout(model, batches: list[dict], cfg, ctx, sample_and_score) -> Rollout:
    """The GRPO family's rollout around any way of producing scored groups: `sample_and_score(model, batch,
    cfg, ctx)` gives (Samples, rewards, info with "per_function", "prompts", "texts", "reward_sec" and
    optionally "metrics", more (sum, count) pairs) for one loader batch; this computes group advantages,
    the frozen log-probs and the metrics."""
    groups, seconds = [], {"generation": 0.0, "reward": 0.0, "reference": 0.0}
    for batch in batches:
        started = time.perf_counter()
        samples, rewards, info = sample_and_score(model, batch, cfg, ctx)
        groups.append((batch, samples, rewards, info))
        seconds["generation"] += time.perf_counter() - started - info["reward_sec"]
        seconds["reward"] += info["reward_sec"]
    rewards = torch.cat([g[2] for g in groups])
    advantages, group_std = scale_advantages(rewards, cfg.num_generations, cfg.scale_rewards)
    ctx.state.rollouts += 1
    micro, start, started = [], 0, time.perf_counter()
    for _, samples, _, _ in groups:
        n = samples.sequences.shape[0]
        micro.append(train_rows(model, samples, advantages[start:start + n], cfg, ctx))
        start += n
    seconds["reference"] = time.perf_counter() - started
    log_completions(ctx.out_dir / "completions.jsonl", cfg, ctx.state.rollouts * cfg.num_iterations,
                    cfg.num_iterations, [p for g in groups for p in g[3]["prompts"]],
                    [t for g in groups for t in g[3]["texts"]], rewards, ctx.accelerator.is_main_process)
    metrics = rollout_metrics(groups, rewards, advantages, group_std)
    for _, _, _, info in groups:
        for name, (total, count) in info.get("metrics", {}).items():
            before = metrics.get(name, (0.0, 0.0))
            metrics[name] = (before[0] + total, before[1] + count)
    # Wall time of each rollout phase on this process (averaged over processes), for throughput work.
    metrics.update({f"time/{phase}_sec": (value, 1.0) for phase, value in seconds.items()})
    return Rollout(micro, metrics)


def train_rows(model, samples, advantages: torch.Tensor, cfg, ctx) -> dict:
    """One micro-batch: the sequences, their completion mask and labels, advantages, and the frozen
    log-probs (reference; old policy when a rollout serves several updates)."""
    device = samples.sequences.device
    labels = torch.full_like(samples.sequences, IGNORE_INDEX)
    labels[:, samples.prompt_len:] = torch.where(samples.completion_mask.bool(), samples.completion_ids, IGNORE_INDEX)
    rows = {"input_ids": samples.sequences, "attention_mask": samples.attention_mask, "labels": labels,
            "completion_mask": samples.completion_mask, "advantages": advantages.to(device),
            "prompt_len": samples.prompt_len, "_tokens": samples.attention_mask.sum(),
            "_units": loss_units(cfg.loss_type, samples.completion_mask)}
    with ctx.accelerator.autocast():
        if cfg.num_iterations > 1:
            rows["old_logps"] = completion_logprobs(model, samples.sequences, samples.attention_mask,
                                                    samples.prompt_len, cfg.temperature)
        if ctx.state.ref_model is not None:
            rows["ref_logps"] = completion_logprobs(ctx.state.ref_model, samples.sequences, samples.attention_mask,
                                                    samples.prompt_len, cfg.temperature)
    return rows


def rollout_metrics(groups, rewards: torch.Tensor, advantages: torch.Tensor, group_std: torch.Tensor) -> dict:
    """(sum, count) on this process for each rollout metric; the engine averages them over all processes."""
    lengths = torch.cat([s.completion_mask.sum(dim=1) for _, s, _, _ in groups]).float()
    clipped = torch.cat([s.clipped for _, s, _, _ in groups]).float()
    n, n_groups = float(rewards.numel()), float(group_std.numel())
    metrics = {"reward": (float(rewards.sum()), n), "reward_std": (float(group_std.sum()), n_groups),
               "frac_reward_zero_std": (float((group_std == 0).sum()), n_groups),
               "advantage_std": (float(advantages.std()) if advantages.numel() > 1 else 0.0, 1.0),
               "completion_length": (float(lengths.sum()), n), "completion_clipped_ratio": (float(clipped.sum()), n)}
    for name in groups[0][3]["per_function"]:
        values = [v for _, _, _, info in groups for v in info["per_function"][name] if v is not None]
        metrics[f"rewards/{name}"] = (float(sum(values)), float(len(values)))
    return metrics


# --------------------------------------------------------------------------- loss


def loss(model, batch: dict, cfg, ctx) -> LossOutput:
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


def steps_per_rollout(cfg) -> int:
    return cfg.num_iterations


SPEC = register_stage(StageSpec(
    name="grpo",
    help="online RL from reward functions / a reward model: CISPO (default), GRPO, DAPO, Dr. GRPO",
    config=GRPOConfig,
    encode=prompt_rows.encode,
    encode_batch=prompt_rows.encode_batch,
    collate=prompt_rows.collate,
    loss=loss,
    loss_units=lambda batch: batch["_units"],
    check=check_rewards,
    setup=setup,
    rollout=rollout,
    steps_per_rollout=steps_per_rollout,
    state=GRPOState,
    packable=False,
    value_columns=prompt_rows.VALUE_COLUMNS,
    data_fields=prompt_rows.DATA_FIELDS,
))
