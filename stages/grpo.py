"""grpo: online RL from rewards — sample a group of completions per prompt, score them, and train the
policy on group-normalised advantages (CISPO by default, as MiniMind; also GRPO, DAPO, Dr. GRPO, and any
loss type a plugin registers).

This file holds only what is grpo's own: its defaults, and how a group is produced (num_generations
single-turn samples per prompt). The rest is the online-RL library: the options in rl/config.py
(GRPOFamilyConfig), the reward scorer and frozen reference in rl/state.py, the sample -> score ->
collect path in rl/rollout.py, the group rollout and the loss in rl/grpo.py, the loss types
(objective x aggregation) in losses/policy.py. The data mapping is rl/prompts.py's; validation on held-out
prompts (one sampled completion each, scored as in training) is rl/evaluation.py's.
"""
from __future__ import annotations

from minimind_scale import StageSpec, register_stage
from minimind_scale.config import OutDir
from minimind_scale.rl import prompts as prompt_rows
from minimind_scale.rl.config import GRPOFamilyConfig
from minimind_scale.rl.evaluation import evaluate_prompts, reward_metric_names
from minimind_scale.rl.grpo import group_rollout, loss, steps_per_rollout
from minimind_scale.rl.rollout import ScoredBatch, sample_and_score
from minimind_scale.rl.scoring import check_rewards
from minimind_scale.rl.state import OnlineRLState, setup_online
from minimind_scale.training.context import Rollout


class GRPOConfig(GRPOFamilyConfig):
    """MiniMind's RLAIF defaults (train_grpo.py): 6 completions per prompt, beta 0.1 (k3 KL), CISPO with a
    ratio cap of 5, lr 3e-7. With num_iterations 1 the importance ratio is 1 by construction, so the loss
    value sits near 0 while the policy still learns."""

    out_dir: OutDir = "out/grpo"


def setup(model, cfg, ctx):
    setup_online(ctx, cfg, policy=model, kl_weight=cfg.beta)
    return model


def rollout(model, batches: list[dict], cfg, ctx) -> Rollout:
    return group_rollout(model, batches, cfg, ctx, sample_group)


def sample_group(model, batch: dict, cfg, ctx) -> ScoredBatch:
    """num_generations completions per prompt of one loader batch, scored."""
    return sample_and_score(model, batch, cfg, ctx, cfg.num_generations)


SPEC = register_stage(StageSpec(
    name="grpo",
    help="online RL from reward functions / a reward model: CISPO (default), GRPO, DAPO, Dr. GRPO",
    config=GRPOConfig,
    encode=prompt_rows.encode,
    encode_batch=prompt_rows.encode_batch,
    collate=prompt_rows.collate,
    loss=loss,
    check=check_rewards,
    setup=setup,
    rollout=rollout,
    steps_per_rollout=steps_per_rollout,
    evaluate=evaluate_prompts,
    eval_metric_names=reward_metric_names,
    state=OnlineRLState,
    packable=False,
    value_columns=prompt_rows.VALUE_COLUMNS,
    data_fields=prompt_rows.DATA_FIELDS,
))
