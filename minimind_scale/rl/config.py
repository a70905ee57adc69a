"""Options of the online-RL stages: what every one shares (the prompts, how completions are sampled, how they
are rewarded), and what the GRPO family (the grpo and agent stages) adds: group size, KL weight, loss type.

Defaults are MiniMind's RLAIF ones (train_grpo.py / train_ppo.py): prompts of up to 768 tokens,
completions of up to 1024, temperature 0.8, top-p 0.85, top-k 50, 90% of prompts with thinking open.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from minimind_scale.config import BatchSize, LearningRate, MaxSeqLen, ModelSource, TrainConfig
from minimind_scale.generation.registry import DEFAULT_BACKEND, BackendName
from minimind_scale.losses.policy import POLICY_LOSSES, policy_loss


class OnlineRLConfig(TrainConfig):
    model: ModelSource = Field("out/full_sft/final", description="the policy's starting model (usually an SFT "
                               "run's final/)")
    ref_model: str | None = Field(None, description="frozen reference for the KL term (default: a copy of the "
                                  "starting model)")
    max_seq_len: MaxSeqLen = Field(1792, description="not used by online stages: max_prompt_len and max_gen_len "
                                   "bound every row")
    generation_backend: BackendName = DEFAULT_BACKEND
    reward_funcs: list[str] = Field(default_factory=list, description="reward functions: built-in names "
                                    "(minimind_format, accuracy, minimind_agent) or FILE.py:FUNCTION, TRL's signature")
    reward_weights: list[float] = Field(default_factory=list, description="one weight per reward function, then one "
                                        "for --reward_model (default 1.0 each)")
    reward_model: str | None = Field(None, description="a sequence-classifier directory (num_labels 1) that scores "
                                     "the conversation, e.g. a reward stage's final/")
    reward_clip: float = Field(3.0, gt=0, description="the reward model's score is clamped to ±reward_clip")
    max_gen_len: int = Field(1024, ge=1, description="most new tokens per completion; longer ones are cut and counted")
    max_prompt_len: int = Field(768, ge=8, description="prompt tokens kept; longer prompts keep their end")
    temperature: float = Field(0.8, gt=0, description="sampling temperature (log-probs use the same)")
    top_p: float = Field(0.85, gt=0, le=1, description="nucleus sampling mass")
    top_k: int = Field(50, ge=0, description="sample among the k most likely tokens (0: all)")
    thinking_ratio: float = Field(0.9, ge=0, le=1, description="share of prompts rendered with open_thinking "
                                  "(chosen per prompt, deterministically from seed)")
    log_completions: int = Field(0, ge=0, description="sampled prompt/completion/reward rows written to "
                                 "completions.jsonl per logged step (main process)")

    # Reward functions a stage always applies before the user's (the agent stage's trajectory reward).
    builtin_reward_funcs: ClassVar[tuple[str, ...]] = ()

    @property
    def all_reward_funcs(self) -> list[str]:
        return [*self.builtin_reward_funcs, *self.reward_funcs]

    @model_validator(mode="after")
    def _rewards_consistent(self):
        if not self.all_reward_funcs and self.reward_model is None:
            raise ValueError("no reward: give --reward_funcs NAME|FILE.py:FUNCTION ... and/or --reward_model DIR")
        wanted = len(self.all_reward_funcs) + (self.reward_model is not None)
        if self.reward_weights and len(self.reward_weights) != wanted:
            builtin = "".join(f"{name}, " for name in self.builtin_reward_funcs)
            raise ValueError(f"reward_weights has {len(self.reward_weights)} values for {wanted} rewards "
                             f"({builtin}the reward functions, then the reward model)")
        return self


class GRPOFamilyConfig(OnlineRLConfig):
    """The GRPO family's options (the grpo and agent stages), with MiniMind's train_grpo.py defaults: 6
    completions per prompt, beta 0.1 (k3 KL), CISPO with a ratio cap of 5, lr 3e-7."""

    learning_rate: LearningRate = 3e-7
    batch_size: BatchSize = Field(2, description="prompts per micro-batch per process (each gives num_generations "
                                  "rows)")
    num_generations: int = Field(6, ge=1, description="completions sampled per prompt (the group)")
    beta: float = Field(0.1, ge=0, description="weight of the k3 KL to the reference; 0 loads no reference model")
    # A str checked against the registry, so a loss type registered by a plugin is accepted too; the
    # description lists the types registered when this class is defined (the built-in ones).
    loss_type: str = Field("cispo", description=f"policy loss and its normalisation: {' | '.join(POLICY_LOSSES)} "
                           "(docs/online-rl.md), or one registered with losses.policy.register_policy_loss")
    epsilon: float = Field(0.2, gt=0, description="lower clip of the ratio (grpo, dapo, dr_grpo)")
    epsilon_high: float | None = Field(None, gt=0, description="upper clip (default: the loss type's, else "
                                       "epsilon); for cispo the cap on the ratio weight (default 5.0)")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="advantage = (r − group mean) "
                                                             "divided by the group's std, the batch's std, or 1")
    num_iterations: int = Field(1, ge=1, description="optimizer steps on each rollout (old-policy log-probs are "
                                "computed once at rollout time)")

    @field_validator("loss_type")
    @classmethod
    def _registered_loss_type(cls, v: str) -> str:
        policy_loss(v)  # raises, listing the registered names
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.num_generations == 1 and self.scale_rewards in ("group", "batch"):
            raise ValueError(f"num_generations 1 with scale_rewards {self.scale_rewards}: a group of one completion "
                             "always has advantage 0, so nothing would be learned; sample at least 2")
        return self

    @property
    def clip_high(self) -> float:
        """--epsilon_high, else the upper clip the loss type registered, else --epsilon (a symmetric clip)."""
        if self.epsilon_high is not None:
            return self.epsilon_high
        registered = policy_loss(self.loss_type).clip_high
        return self.epsilon if registered is None else registered
