"""grpo: online RL from rewards — sample a group of completions per prompt, score them, and train the
policy on group-normalised advantages (CISPO by default, as MiniMind; also GRPO, DAPO and Dr. GRPO).

The stage's rollout (run by the engine without gradients, on the unwrapped policy) generates, scores
with the reward functions and the optional reward model, computes advantages and the reference
(and, with num_iterations > 1, old-policy) log-probs once, and returns the micro-batches the loss
trains on. The loss formulas are plain functions in minimind_scale/policy_losses.py.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator

from minimind_scale import LossOutput, StageSpec, StageState, TrainConfig, register_stage
from minimind_scale.config import BatchSize, LearningRate, MaxSeqLen, ModelSource, OutDir
from minimind_scale.context import Rollout
from minimind_scale.conversation import TURN_END, encode_prompt, normalize_messages
from minimind_scale.errors import RecordError
from minimind_scale.policy_losses import loss_units, reduce_policy_loss, scale_advantages, token_loss
from minimind_scale.reward_funcs import load_reward_funcs, score_completions
from minimind_scale.reward_model import RewardModel, check_reward_model
from minimind_scale.rows import IGNORE_INDEX
from minimind_scale.sampling import completion_logprobs, sample


class GRPOConfig(TrainConfig):
    """MiniMind's RLAIF defaults (train_grpo.py): 6 completions per prompt of up to 1024 tokens from
    768-token prompts, temperature 0.8, top-p 0.85, top-k 50, 90% of prompts with thinking open,
    beta 0.1 (k3 KL), CISPO with a ratio cap of 5, lr 3e-7. With num_iterations 1 the importance
    ratio is 1 by construction, so the loss value sits near 0 while the policy still learns."""

    model: ModelSource = Field("out/full_sft/final", description="the policy's starting model (usually an SFT "
                               "run's final/)")
    ref_model: str | None = Field(None, description="frozen reference for the KL term (default: a copy of the "
                                  "starting model)")
    learning_rate: LearningRate = 3e-7
    batch_size: BatchSize = Field(2, description="prompts per micro-batch per process (each gives num_generations "
                                  "rows)")
    out_dir: OutDir = "out/grpo"
    max_seq_len: MaxSeqLen = Field(1792, description="not used by grpo: max_prompt_len and max_gen_len bound "
                                   "every row (default their sum)")
    reward_funcs: list[str] = Field(default_factory=list, description="reward functions: built-in names "
                                    "(minimind_format, accuracy) or FILE.py:FUNCTION, TRL's signature")
    reward_weights: list[float] = Field(default_factory=list, description="one weight per reward function, then one "
                                        "for --reward_model (default 1.0 each)")
    reward_model: str | None = Field(None, description="a sequence-classifier directory (num_labels 1) that scores "
                                     "the conversation, e.g. a reward stage's final/")
    reward_clip: float = Field(3.0, gt=0, description="the reward model's score is clamped to ±reward_clip")
    num_generations: int = Field(6, ge=1, description="completions sampled per prompt (the group)")
    max_gen_len: int = Field(1024, ge=1, description="most new tokens per completion; longer ones are cut and counted")
    max_prompt_len: int = Field(768, ge=8, description="prompt tokens kept; longer prompts keep their end")
    temperature: float = Field(0.8, gt=0, description="sampling temperature (log-probs use the same)")
    top_p: float = Field(0.85, gt=0, le=1, description="nucleus sampling mass")
    top_k: int = Field(50, ge=0, description="sample among the k most likely tokens (0: all)")
    thinking_ratio: float = Field(0.9, ge=0, le=1, description="share of prompts rendered with open_thinking "
                                  "(chosen per prompt, deterministically from seed)")
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
    log_completions: int = Field(0, ge=0, description="sampled prompt/completion/reward rows written to "
                                 "completions.jsonl per logged step (main process)")

    @model_validator(mode="after")
    def _consistent(self):
        if self.num_generations == 1 and self.scale_rewards in ("group", "batch"):
            raise ValueError(f"num_generations 1 with scale_rewards {self.scale_rewards}: a group of one completion "
                             "always has advantage 0, so nothing would be learned; sample at least 2")
        if not self.reward_funcs and self.reward_model is None:
            raise ValueError("no reward: give --reward_funcs NAME|FILE.py:FUNCTION ... and/or --reward_model DIR")
        wanted = len(self.reward_funcs) + (self.reward_model is not None)
        if self.reward_weights and len(self.reward_weights) != wanted:
            raise ValueError(f"reward_weights has {len(self.reward_weights)} values for {wanted} rewards "
                             "(the reward functions, then the reward model)")
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

    reward_funcs: list | None = None
    reward_model: RewardModel | None = None
    ref_model: torch.nn.Module | None = None
    rollouts: int = 0

    def state_dict(self):
        return {"rollouts": self.rollouts}


# --------------------------------------------------------------------------- data


def prompt_messages(record: dict) -> tuple[list[dict], list | None]:
    """The prompt of an rlaif record: its conversation without a trailing assistant turn (MiniMind's
    file carries a placeholder one), or `prompt` as text or messages."""
    key = next((k for k in ("prompt", "conversations", "messages") if k in record), None)
    if key is None:
        raise RecordError("prompt", "missing (a prompt record has \"prompt\" or \"conversations\")")
    turns = record[key]
    if key == "prompt" and isinstance(turns, str):
        if not turns.strip():
            raise RecordError("prompt", "is empty")
        return [{"role": "user", "content": turns}], None
    if isinstance(turns, list) and turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "assistant":
        turns = turns[:-1]  # the answer to be generated; MiniMind's rlaif file carries a placeholder
    messages, tools = normalize_messages({**record, key: turns}, key=key, require_assistant=False)
    if not any(m["role"] == "user" for m in messages):
        raise RecordError("prompt", "has no user turn")
    return messages, tools


def thinking_open(messages: list[dict], cfg) -> bool:
    """Whether this prompt is rendered with open_thinking: fixed per prompt and seed, so caches and resumes agree."""
    digest = hashlib.blake2b(f"{cfg.seed}:{json.dumps(messages, sort_keys=True)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < cfg.thinking_ratio


def encode(record: dict, tokenizer, cfg) -> dict:
    messages, tools = prompt_messages(record)
    ids = encode_prompt(messages, tools, tokenizer, open_thinking=thinking_open(messages, cfg))
    columns = {k: v for k, v in record.items() if k not in ("prompt", "conversations", "messages")}
    return {"prompt_ids": ids[-cfg.max_prompt_len:], "prompt": json.dumps(messages, ensure_ascii=False),
            "columns": json.dumps(columns, ensure_ascii=False)}


def collate(rows, tokenizer, cfg) -> dict:
    """Prompts left-padded, so generation starts at the same column for every row; their messages and
    extra record keys (the reward functions' columns) ride along."""
    width = max(len(r["prompt_ids"]) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["prompt_ids"])
        ids[i, width - n:] = torch.as_tensor(r["prompt_ids"])
        mask[i, width - n:] = 1
    return {"input_ids": ids, "attention_mask": mask, "prompts": [json.loads(r["prompt"]) for r in rows],
            "columns": [json.loads(r["columns"]) for r in rows]}


# --------------------------------------------------------------------------- set-up and rollout


def check(cfg) -> None:
    """Reward files and the reward model, before any tokenising: a typo there should not wait for the data."""
    load_reward_funcs(cfg.reward_funcs)
    if cfg.reward_model is not None:
        check_reward_model(cfg.reward_model, "--reward_model")


def setup(model, cfg, ctx):
    device = ctx.accelerator.device
    ctx.state.reward_funcs = load_reward_funcs(cfg.reward_funcs)
    if cfg.reward_model is not None:
        ctx.state.reward_model = RewardModel(cfg.reward_model, device, cfg.reward_clip)
    if cfg.beta > 0:
        if cfg.ref_model is None:
            ref = copy.deepcopy(model)
        else:
            from transformers import AutoModelForCausalLM

            ref = AutoModelForCausalLM.from_pretrained(cfg.ref_model, dtype=torch.float32)
        # A full replica on every rank (never prepared), also under ZeRO-3: fine at MiniMind's sizes.
        ctx.state.ref_model = ref.eval().requires_grad_(False).to(device)
    return model


def rollout(model, batches: list[dict], cfg, ctx) -> Rollout:
    """Sample, score and build one micro-batch per loader batch of prompts."""
    end_id = ctx.tokenizer.convert_tokens_to_ids(TURN_END)
    groups, seconds = [], {"generation": 0.0, "reward": 0.0, "reference": 0.0}
    for batch in batches:
        started = time.perf_counter()
        samples = sample(model, batch["input_ids"], batch["attention_mask"], num_samples=cfg.num_generations,
                         max_new_tokens=cfg.max_gen_len, temperature=cfg.temperature, top_p=cfg.top_p,
                         top_k=cfg.top_k, end_id=end_id, pad_id=ctx.tokenizer.pad_token_id)
        scored = time.perf_counter()
        groups.append((batch, samples, *score(batch, samples, end_id, cfg, ctx)))
        seconds["generation"] += scored - started
        seconds["reward"] += time.perf_counter() - scored
    rewards = torch.cat([g[2] for g in groups])
    advantages, group_std = scale_advantages(rewards, cfg.num_generations, cfg.scale_rewards)
    ctx.state.rollouts += 1
    micro, start, started = [], 0, time.perf_counter()
    for _, samples, _, _ in groups:
        n = samples.sequences.shape[0]
        micro.append(train_rows(model, samples, advantages[start:start + n], cfg, ctx))
        start += n
    seconds["reference"] = time.perf_counter() - started
    log_completions(groups, rewards, cfg, ctx)
    metrics = rollout_metrics(groups, rewards, advantages, group_std)
    # Wall time of each rollout phase on this process (averaged over processes), for throughput work.
    metrics.update({f"time/{phase}_sec": (value, 1.0) for phase, value in seconds.items()})
    return Rollout(micro, metrics)


def score(batch: dict, samples, end_id: int, cfg, ctx) -> tuple[torch.Tensor, dict]:
    """(weighted reward per completion, per-reward values) with TRL's reward-function signature."""
    g = cfg.num_generations
    prompts = [p for p in batch["prompts"] for _ in range(g)]
    ids = [row[mask.bool()].tolist() for row, mask in zip(samples.completion_ids.cpu(), samples.completion_mask.cpu())]
    texts = [ctx.tokenizer.decode([t for t in row if t != end_id]) for row in ids]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    keys = sorted({k for c in batch["columns"] for k in c})
    columns = {k: [c.get(k) for c in batch["columns"] for _ in range(g)] for k in keys}
    weights = cfg.reward_weights or [1.0] * (len(ctx.state.reward_funcs) + (ctx.state.reward_model is not None))
    total, per_function = score_completions(ctx.state.reward_funcs, weights[:len(ctx.state.reward_funcs)], prompts,
                                            completions, ids, columns)
    if ctx.state.reward_model is not None:
        scores = ctx.state.reward_model.score(prompts, texts)
        total = total + weights[-1] * scores
        per_function[RewardModel.name] = scores.tolist()
    return total, {"per_function": per_function, "prompts": prompts, "texts": texts}


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


def log_completions(groups, rewards: torch.Tensor, cfg, ctx) -> None:
    """A few sampled rows per logged step to completions.jsonl (main process only)."""
    steps_done = ctx.state.rollouts * cfg.num_iterations
    logged = steps_done // cfg.log_interval != (steps_done - cfg.num_iterations) // cfg.log_interval
    if not (cfg.log_completions and logged and ctx.accelerator.is_main_process):
        return
    prompts = [p for _, _, _, info in groups for p in info["prompts"]]
    texts = [t for _, _, _, info in groups for t in info["texts"]]
    with open(ctx.out_dir / "completions.jsonl", "a", encoding="utf-8") as f:
        for i in range(min(cfg.log_completions, len(texts))):
            f.write(json.dumps({"step": steps_done, "prompt": prompts[i], "completion": texts[i],
                                "reward": float(rewards[i])}, ensure_ascii=False) + "\n")


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
    encode=encode,
    collate=collate,
    loss=loss,
    loss_units=lambda batch: batch["_units"],
    check=check,
    setup=setup,
    rollout=rollout,
    steps_per_rollout=steps_per_rollout,
    state=GRPOState,
    packable=False,
    value_columns={"prompt": "string", "columns": "string"},
    data_fields=("max_prompt_len", "thinking_ratio", "seed"),
))
