"""Measuring an online stage's policy on held-out prompts, as validation during training does.

Each prompt gets ONE completion: evaluation measures, it does not train, and a group of num_generations
would only make the same estimate slower. The completion is sampled with the stage's own sampling options
(temperature, top-p, top-k, max_gen_len) through the generation backend the rollout uses, and scored by
the rollout's scorer, so a held-out `reward` means what the training `reward` means and `rewards/<name>`
are the names the rollout logs. The engine calls a stage's `evaluate` inside a torch RNG fork seeded
with the run's seed: the same weights give the same completions at every evaluation, and training's RNG
never moves.

Nothing here counts a rollout or writes completions.jsonl: the rollout count seeds PPO's shuffle and
schedules the completion logs, which hold training samples only.
"""
from __future__ import annotations

from minimind_scale.rl.reward_funcs import reward_func_name
from minimind_scale.rl.reward_model import RewardModel
from minimind_scale.rl.rollout import Producer, ScoredBatch, per_function_metrics, sample_and_score

EVAL_SAMPLES = 1  # completions per held-out prompt

Sums = dict[str, tuple[float, float]]


def reward_metric_names(cfg) -> list[str]:
    """`reward`, then `rewards/<name>` for each reward the scorer applies (the reward functions in order, then
    the reward model), known from the config alone."""
    names = [reward_func_name(spec) for spec in cfg.all_reward_funcs]
    if cfg.reward_model is not None:
        names.append(RewardModel.name)
    return ["reward", *(f"rewards/{name}" for name in names)]


def scored_metrics(scored: ScoredBatch) -> Sums:
    """(sum, count) over one held-out batch's completions: the weighted reward of every completion, each
    reward's values where it applied, then the producer's own metrics."""
    rewards = scored.rewards
    return {"reward": (float(rewards.sum()), float(rewards.numel())), **per_function_metrics([scored]),
            **scored.metrics}


def evaluate_with(policy, batch: dict, cfg, ctx, produce: Producer) -> Sums:
    """The metrics of one collated held-out batch: `produce` makes and scores EVAL_SAMPLES completion per
    prompt from the policy's current weights (handed to the backend first, as a rollout does)."""
    ctx.state.generator.update_weights(policy)
    return scored_metrics(produce(policy, batch, cfg, ctx))


def sample_one_and_score(policy, batch: dict, cfg, ctx) -> ScoredBatch:
    """EVAL_SAMPLES single-turn completion per prompt, by the rollout's sample -> score path."""
    return sample_and_score(policy, batch, cfg, ctx, num_samples=EVAL_SAMPLES)


def evaluate_prompts(policy, batch: dict, cfg, ctx) -> Sums:
    """The reward metrics (`reward_metric_names`) of one single-turn completion per held-out prompt."""
    return evaluate_with(policy, batch, cfg, ctx, sample_one_and_score)
