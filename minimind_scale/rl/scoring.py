"""Scoring sampled completions for online RL: the weighted reward functions and reward model, and completion logs."""
from __future__ import annotations

import json

import torch

from minimind_scale.rl.reward_funcs import load_reward_funcs
from minimind_scale.rl.reward_model import RewardModel, check_reward_model
from minimind_scale.rl.reward_scoring import score_completions


def check_rewards(cfg) -> None:
    """Reward files and the reward model, before any tokenising: a typo there should not wait for the data."""
    load_reward_funcs(cfg.all_reward_funcs)
    if cfg.reward_model is not None:
        check_reward_model(cfg.reward_model, "--reward_model")


class RewardScorer:
    """The weighted sum of the reward functions (TRL's signature) and the optional reward model."""

    def __init__(self, cfg, device):
        self.funcs = load_reward_funcs(cfg.all_reward_funcs)
        self.model = RewardModel(cfg.reward_model, device, cfg.reward_clip) if cfg.reward_model is not None else None
        self.weights = cfg.reward_weights or [1.0] * (len(self.funcs) + (self.model is not None))

    def __call__(self, prompts: list[list[dict]], completions: list, completion_ids: list[list[int]],
                 texts: list[str], columns: dict[str, list]) -> tuple[torch.Tensor, dict[str, list]]:
        """(weighted reward per completion, each reward's values). `completions` are what the reward
        functions receive (TRL's conversational form); `texts` the final answers the reward model reads."""
        total, per_function = score_completions(self.funcs, self.weights[:len(self.funcs)], prompts, completions,
                                                completion_ids, columns)
        if self.model is not None:
            scores = self.model.score(prompts, texts)
            total = total + self.weights[-1] * scores
            per_function[RewardModel.name] = scores.tolist()
        return total, per_function


def score_samples(scorer: RewardScorer, tokenizer, batch: dict, samples, group: int,
                  end_id: int) -> tuple[torch.Tensor, dict]:
    """Rewards of `group` sampled completions per prompt of a collated prompt batch (prompts.collate), with
    TRL's signature: the reward functions get the completion as one assistant message and the record's
    other keys as columns. Returns (reward per completion, {"per_function", "prompts", "texts"})."""
    prompts, columns = group_columns(batch, group)
    ids = generated_ids(samples)
    texts = [tokenizer.decode([t for t in row if t != end_id]) for row in ids]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    total, per_function = scorer(prompts, completions, ids, texts, columns)
    return total, {"per_function": per_function, "prompts": prompts, "texts": texts}


def group_columns(batch: dict, group: int) -> tuple[list, dict[str, list]]:
    """A prompt batch's prompts and record columns, each repeated for the `group` completions of its prompt."""
    prompts = [p for p in batch["prompts"] for _ in range(group)]
    keys = sorted({k for c in batch["columns"] for k in c})
    return prompts, {k: [c.get(k) for c in batch["columns"] for _ in range(group)] for k in keys}


def generated_ids(samples) -> list[list[int]]:
    """Each completion's tokens that the model generated (its completion mask)."""
    return [row[mask.bool()].tolist() for row, mask in zip(samples.completion_ids.cpu(), samples.completion_mask.cpu())]


def log_completions(path, cfg, steps_done: int, steps_per_rollout: int, prompts: list, texts: list[str],
                    rewards: torch.Tensor, is_main: bool) -> None:
    """A few sampled rows to completions.jsonl when this rollout's steps include a logged step (main process)."""
    logged = steps_done // cfg.log_interval != (steps_done - steps_per_rollout) // cfg.log_interval
    if not (cfg.log_completions and logged and is_main):
        return
    with open(path, "a", encoding="utf-8") as f:
        for i in range(min(cfg.log_completions, len(texts))):
            f.write(json.dumps({"step": steps_done, "prompt": prompts[i], "completion": texts[i],
                                "reward": float(rewards[i])}, ensure_ascii=False) + "\n")
