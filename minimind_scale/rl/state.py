"""The per-run state every online-RL stage keeps beside its policy, and the setup that fills it.

One class for all of them: the generation backend, the reward scorer, the frozen KL reference, and the rollout
count (the only part a checkpoint saves). A stage with more (the agent stage's tool box) subclasses it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from minimind_scale.generation.interface import GenerationBackend
from minimind_scale.generation.registry import create_backend
from minimind_scale.rl.scoring import RewardScorer
from minimind_scale.training.context import StageState


@dataclass
class OnlineRLState(StageState):
    """Frozen helpers built in setup, and the rollout count (checkpointed: it schedules completion logs and
    seeds PPO's mini-batch shuffle). The sampling RNG is the process's torch RNG, which every checkpoint
    saves and resume restores."""

    scorer: RewardScorer | None = None
    ref_model: torch.nn.Module | None = None
    generator: GenerationBackend | None = None  # samples from the live policy; rebuilt by setup, never saved
    rollouts: int = 0

    def state_dict(self):
        return {"rollouts": self.rollouts}


def setup_online(ctx, cfg, policy: torch.nn.Module, kl_weight: float) -> None:
    """Fill ctx.state with the generation backend that samples from `policy` (--generation_backend), the reward
    scorer and, when the KL to a reference has a weight, the reference (a frozen copy of `policy`, or
    --ref_model)."""
    device = ctx.accelerator.device
    ctx.state.generator = create_backend(cfg.generation_backend, policy, pad_id=ctx.tokenizer.pad_token_id)
    ctx.state.scorer = RewardScorer(cfg, device)
    if kl_weight > 0:
        ctx.state.ref_model = frozen_reference(policy, cfg.ref_model, device)


def frozen_reference(model, path: str | None, device) -> torch.nn.Module:
    """The KL reference: a copy of the starting policy, or the model at `path`. A full replica on every
    rank (never prepared), also under ZeRO-3: fine at MiniMind's sizes."""
    if path is None:
        ref = copy.deepcopy(model)
    else:
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return ref.eval().requires_grad_(False).to(device)
