"""Options every online-RL stage shares: the prompts, how completions are sampled, and how they are rewarded.

Defaults are MiniMind's RLAIF ones (train_grpo.py / train_ppo.py): prompts of up to 768 tokens,
completions of up to 1024, temperature 0.8, top-p 0.85, top-k 50, 90% of prompts with thinking open.
"""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from minimind_scale.config import MaxSeqLen, ModelSource, TrainConfig


class OnlineRLConfig(TrainConfig):
    model: ModelSource = Field("out/full_sft/final", description="the policy's starting model (usually an SFT "
                               "run's final/)")
    ref_model: str | None = Field(None, description="frozen reference for the KL term (default: a copy of the "
                                  "starting model)")
    max_seq_len: MaxSeqLen = Field(1792, description="not used by online stages: max_prompt_len and max_gen_len "
                                   "bound every row")
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
