"""ppo: online RL with a learned critic — sample one completion per prompt, score it, estimate per-token
advantages with GAE against the critic's values, then train policy and critic together for ppo_epochs
passes over shuffled mini-batches of the rollout (early-stopped at target_kl).

The policy and the critic live in one module (rl/actor_critic.py), so the engine prepares, shards,
checkpoints and restores both with one optimizer (the critic's parameter group has its own learning
rate); final/ holds the policy and final/critic/ the critic. The formulas are plain functions in
losses/ppo.py.

This file holds what is PPO's own: its options, the actor-critic model, the experience (log-probs,
values, GAE) built from the scored completions, the shuffled mini-batches and the loss. Sampling and
scoring (rl/rollout.py), the reward scorer and frozen reference (rl/state.py) and the options every
online stage shares (rl/config.py) are the online-RL library's; the data mapping is rl/prompts.py's.
"""
from __future__ import annotations

import math
import time

import torch
from pydantic import Field, model_validator

from minimind_scale import LossOutput, StageSpec, register_stage
from minimind_scale.config import BatchSize, LearningRate, OutDir
from minimind_scale.losses.policy import k3_kl
from minimind_scale.losses.ppo import gae, policy_terms, token_rewards, value_terms, whiten
from minimind_scale.models.build import PRESETS, build_model, preset_config
from minimind_scale.models.model_dir import check_model_dir
from minimind_scale.rl import prompts as prompt_rows
from minimind_scale.rl.actor_critic import ActorCritic, build_critic
from minimind_scale.rl.config import OnlineRLConfig
from minimind_scale.rl.evaluation import evaluate_prompts, reward_metric_names
from minimind_scale.rl.rollout import ScoredBatch, collect, counted_batch, sample_and_score
from minimind_scale.rl.sampling import Samples, concat_samples, logprobs_from_logits, position_ids_from_mask
from minimind_scale.rl.scoring import check_rewards
from minimind_scale.rl.state import OnlineRLState, setup_online
from minimind_scale.training.batch import CountedBatch
from minimind_scale.training.context import Rollout
from minimind_scale.training.distributed import reduce_sum


class PPOConfig(OnlineRLConfig):
    """MiniMind's train_ppo.py defaults: actor lr 3e-7, critic lr 5e-7, clip 0.2, value clip 0.2, vf_coef 0.5,
    kl_coef 0.02 (k3 in the loss), γ 1.0, λ 0.95, 2 PPO epochs over mini-batches of 2, early stop at
    approximate KL 0.25. Sampling and reward options: OnlineRLConfig."""

    learning_rate: LearningRate = 3e-7
    critic_learning_rate: float = Field(5e-7, gt=0, description="the critic's peak learning rate")
    critic: str | None = Field(None, description="a critic directory (a token classifier with one label, e.g. an "
                               "earlier ppo run's final/critic); default: the policy's starting weights with a new "
                               "value head")
    batch_size: BatchSize = Field(2, description="prompts per micro-batch per process (one completion each)")
    out_dir: OutDir = "out/ppo"
    mini_batch_size: int | None = Field(None, ge=1, description="rows per PPO update per process (default "
                                        "batch_size); a rollout holds batch_size × accumulation_steps rows")
    ppo_epochs: int = Field(2, ge=1, description="passes over each rollout")
    cliprange: float = Field(0.2, gt=0, description="clip of the policy ratio")
    cliprange_value: float = Field(0.2, gt=0, description="clip of the value update around the rollout's values")
    vf_coef: float = Field(0.5, ge=0, description="weight of the value loss")
    kl_coef: float = Field(0.02, ge=0, description="weight of the KL to the reference; 0 loads no reference model")
    kl_in_reward: bool = Field(False, description="put the KL in the per-token reward as −kl_coef·k1 (TRL, "
                               "OpenRLHF) instead of k3 in the loss (MiniMind)")
    gamma: float = Field(1.0, gt=0, le=1, description="GAE discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ")
    target_kl: float | None = Field(0.25, gt=0, description="skip the rollout's remaining updates once an update's "
                                    "approximate KL 0.5·mean(log r²) over all processes exceeds it (null: never)")

    @model_validator(mode="after")
    def _mini_batches_fit(self):
        rows = self.batch_size * self.accumulation_steps
        if self.mini_batch_size is not None and self.mini_batch_size > rows:
            raise ValueError(f"mini_batch_size {self.mini_batch_size} is larger than a rollout ({rows} rows per "
                             "process: batch_size × accumulation_steps)")
        return self

    @property
    def rows_per_update(self) -> int:
        return self.mini_batch_size or self.batch_size


# --------------------------------------------------------------------------- models


def check_sources(cfg) -> None:
    """The reward functions, the reward model and a --critic directory, before any tokenising."""
    check_rewards(cfg)
    if cfg.critic is not None:
        check_model_dir(cfg.critic, "--critic")


def build_policy_and_critic(cfg, tokenizer) -> ActorCritic:
    actor = build_model(cfg.model, tokenizer, cfg.hidden_size, cfg.num_hidden_layers)
    source = cfg.critic or cfg.model
    if source in PRESETS:  # a fresh policy gets a fresh critic of the same shape
        from transformers import AutoModelForTokenClassification

        config = preset_config(source, len(tokenizer), tokenizer, cfg.hidden_size, cfg.num_hidden_layers)
        config.num_labels, config.classifier_dropout = 1, 0.0
        critic = AutoModelForTokenClassification.from_config(config, dtype=torch.float32)
    else:
        critic = build_critic(source, tokenizer)
    return ActorCritic(actor, critic)


def setup(model, cfg, ctx):
    setup_online(ctx, cfg, policy=model.actor, kl_weight=cfg.kl_coef)
    return model


# --------------------------------------------------------------------------- rollout


def rollout(model, batches: list[dict], cfg, ctx) -> Rollout:
    """Sample and score one completion per prompt, record the frozen log-probs and values, compute
    whitened GAE advantages over all processes, and plan the shuffled mini-batches of every PPO epoch."""
    collected = collect(model.actor, batches, cfg, ctx, sample_one, steps_per_rollout(cfg))
    samples = concat_samples([b.samples for b in collected.batches], ctx.tokenizer.pad_token_id)
    rewards = collected.rewards
    started = time.perf_counter()
    rows = experience(model, samples, rewards.to(samples.sequences.device), cfg, ctx)
    collected.seconds["experience"] = time.perf_counter() - started
    mask = samples.completion_mask.float()
    metrics = {**collected.metrics(), "value_mean": (float((rows["old_values"] * mask).sum()), float(mask.sum()))}
    return Rollout(steps=mini_batches(samples, rows, cfg, ctx), metrics=metrics)


def sample_one(policy, batch: dict, cfg, ctx) -> ScoredBatch:
    return sample_and_score(policy, batch, cfg, ctx, num_samples=1)


def experience(model, samples: Samples, rewards: torch.Tensor, cfg, ctx) -> dict[str, torch.Tensor]:
    """Per-token tensors of the rollout, computed in micro-batch-sized chunks: the policy's and the
    reference's log-probs, the critic's values, and the whitened advantages and returns."""
    old_logps, ref_logps, values = [], [], []
    with ctx.accelerator.autocast():
        for start in range(0, samples.sequences.shape[0], cfg.batch_size):
            ids = samples.sequences[start:start + cfg.batch_size]
            mask = samples.attention_mask[start:start + cfg.batch_size]
            out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
            old_logps.append(logprobs_from_logits(out.logits, ids, samples.prompt_len, cfg.temperature))
            values.append(out.values[:, samples.prompt_len - 1:-1].float())
            if ctx.state.ref_model is not None:
                ref = ctx.state.ref_model(input_ids=ids, attention_mask=mask,
                                          position_ids=position_ids_from_mask(mask), use_cache=False)
                ref_logps.append(logprobs_from_logits(ref.logits, ids, samples.prompt_len, cfg.temperature))
    rows = {"old_logps": torch.cat(old_logps), "old_values": torch.cat(values)}
    if ref_logps:
        rows["ref_logps"] = torch.cat(ref_logps)
    mask = samples.completion_mask
    rows["old_values"] = rows["old_values"] * mask
    kl_terms = (rows["old_logps"], rows["ref_logps"]) if cfg.kl_in_reward and ref_logps else (None, None)
    per_token = token_rewards(rewards, mask, cfg.kl_coef, *kl_terms)
    advantages, rows["returns"] = gae(per_token, rows["old_values"], mask, cfg.gamma, cfg.lam)
    rows["advantages"] = whiten(advantages, mask, lambda xs: reduce_sum(ctx.accelerator, xs))
    return rows


def mini_batches(samples: Samples, rows: dict[str, torch.Tensor], cfg, ctx) -> list[list[CountedBatch]]:
    """For each PPO epoch, the rollout's rows in a fresh order (seeded by seed, rollout and process, so a
    resumed run shuffles alike), cut into updates of rows_per_update rows, each cut into micro-batches of
    batch_size rows trimmed to their longest completion."""
    n = samples.sequences.shape[0]
    generator = torch.Generator().manual_seed(hash((cfg.seed, ctx.state.rollouts, ctx.accelerator.process_index))
                                              % 2**63)
    plan = []
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.rows_per_update):
            update = order[start:start + cfg.rows_per_update]
            plan.append([micro_batch(samples, rows, update[i:i + cfg.batch_size], epoch)
                         for i in range(0, len(update), cfg.batch_size)])
    return plan


def micro_batch(samples: Samples, rows: dict[str, torch.Tensor], index: torch.Tensor, epoch: int) -> CountedBatch:
    """The rows at `index`, trimmed to their longest completion; its loss units are completion tokens."""
    index = index.to(samples.sequences.device)
    completion_mask = samples.completion_mask[index]
    width = int(completion_mask.sum(dim=1).max())
    end = samples.prompt_len + width
    tensors = {"input_ids": samples.sequences[index, :end], "attention_mask": samples.attention_mask[index, :end],
               "completion_mask": completion_mask[:, :width], "prompt_len": samples.prompt_len, "ppo_epoch": epoch}
    tensors.update({name: value[index, :width] for name, value in rows.items()})
    return counted_batch(tensors, completion_mask.sum())


# --------------------------------------------------------------------------- loss


def loss(model, batch: dict, cfg, ctx) -> LossOutput:
    mask, prompt_len = batch["completion_mask"].float(), batch["prompt_len"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=position_ids_from_mask(batch["attention_mask"]))
    logps = logprobs_from_logits(out.logits, batch["input_ids"], prompt_len, cfg.temperature)
    values = out.values[:, prompt_len - 1:-1].float()
    policy = policy_terms(logps, batch["old_logps"], batch["advantages"], cfg.cliprange)
    value_loss, value_clipped = value_terms(values, batch["old_values"], batch["returns"], cfg.cliprange_value)
    per_token = policy.loss + cfg.vf_coef * value_loss
    metrics = {"policy_loss": (policy.loss.detach() * mask).sum(), "value_loss": (value_loss.detach() * mask).sum(),
               "approx_kl": (policy.approx_kl * mask).sum(), "clipfrac": (policy.clipped.float() * mask).sum(),
               "value_clipfrac": (value_clipped.float() * mask).sum(),
               "ppo_epochs_run": mask.new_tensor(float(batch["ppo_epoch"] + 1))}
    if "ref_logps" in batch:
        kl = k3_kl(logps, batch["ref_logps"])
        metrics["kl"] = (kl.detach() * mask).sum()
        if not cfg.kl_in_reward:
            per_token = per_token + cfg.kl_coef * kl
    # Every metric is per completion token, except the epoch index (one per micro-batch).
    return LossOutput((per_token * mask).sum(), metrics, metric_units={"ppo_epochs_run": 1.0})


def steps_per_rollout(cfg) -> int:
    return cfg.ppo_epochs * math.ceil(cfg.batch_size * cfg.accumulation_steps / cfg.rows_per_update)


def stop_reusing(metrics: dict[str, float], cfg) -> bool:
    return cfg.target_kl is not None and metrics.get("approx_kl", 0.0) > cfg.target_kl


# --------------------------------------------------------------------------- validation


def evaluate(model, batch: dict, cfg, ctx) -> dict[str, tuple[float, float]]:
    """The policy's reward metrics on a held-out batch, one completion per prompt (the critic is not measured)."""
    return evaluate_prompts(model.actor, batch, cfg, ctx)


SPEC = register_stage(StageSpec(
    name="ppo",
    help="online RL with a critic (GAE, clipped policy and value losses, KL to a reference)",
    config=PPOConfig,
    encode=prompt_rows.encode,
    encode_batch=prompt_rows.encode_batch,
    collate=prompt_rows.collate,
    loss=loss,
    check=check_sources,
    build_model=build_policy_and_critic,
    setup=setup,
    rollout=rollout,
    steps_per_rollout=steps_per_rollout,
    stop_reusing=stop_reusing,
    evaluate=evaluate,
    eval_metric_names=reward_metric_names,
    learning_rates=lambda cfg: {"critic.": cfg.critic_learning_rate},
    final_models=lambda model: {"": model.actor, "critic": model.critic},
    state=OnlineRLState,
    packable=False,
    value_columns=prompt_rows.VALUE_COLUMNS,
    data_fields=prompt_rows.DATA_FIELDS,
))
