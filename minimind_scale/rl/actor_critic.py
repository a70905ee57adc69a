"""A policy and its critic trained as one module: one forward gives the policy's logits and the critic's values.

Both are plain transformers models — the policy a causal LM, the critic a `*ForTokenClassification`
with one label (one value per position) — so each saves and loads with the Auto classes. Holding
them in one module lets Accelerate and DeepSpeed prepare, shard (ZeRO-3 partitions both), checkpoint
and restore them together, with one optimizer whose parameter groups give the critic its own
learning rate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minimind_scale.errors import UserError
from minimind_scale.models.build import is_model_dir


@dataclass
class ActorCriticOutput:
    logits: torch.Tensor   # [rows, L, vocab] the policy's next-token logits
    values: torch.Tensor   # [rows, L] the critic's value of the state after each position


class ActorCritic(torch.nn.Module):
    def __init__(self, actor, critic):
        super().__init__()
        self.actor, self.critic = actor, critic
        # What Accelerate reads to size DeepSpeed's buckets ("auto" in the configs) and gradient
        # checkpointing writes to: the policy's config.
        self.config = actor.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs) -> ActorCriticOutput:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        logits = self.actor(**inputs, use_cache=False).logits
        values = self.critic(**inputs).logits.squeeze(-1)
        return ActorCriticOutput(logits=logits, values=values)

    def set_attn_implementation(self, attention: str) -> None:
        self.actor.set_attn_implementation(attention)
        self.critic.set_attn_implementation(attention)

    def tie_weights(self) -> None:
        self.actor.tie_weights()
        self.critic.tie_weights()

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.actor.gradient_checkpointing_enable(**kwargs)
        self.critic.gradient_checkpointing_enable(**kwargs)


def build_critic(source: str, tokenizer):
    """A token classifier with one label: from a critic directory, or from a causal LM's weights (the
    backbone is loaded, the value head is new). Dropout on the value head is off: in training mode it
    would make the values the loss clips differ from those the rollout recorded."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    if not is_model_dir(source):
        raise UserError(f"critic {source}: not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(source, num_labels=1, classifier_dropout=0.0)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    try:
        return AutoModelForTokenClassification.from_pretrained(source, config=config, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"critic {source}: the model failed to load ({type(e).__name__}: {e})") from None
