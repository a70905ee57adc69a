"""A trained reward model (any sequence classifier with one label) as a frozen scorer of completions."""
from __future__ import annotations

from pathlib import Path

import torch

from minimind_scale.errors import UserError
from minimind_scale.models.build import load_tokenizer
from minimind_scale.models.model_dir import check_model_dir


def check_reward_model(path: str, needed_by: str) -> None:
    """A reward model gives one number per conversation: a sequence classifier with num_labels 1."""
    from transformers import AutoConfig

    check_model_dir(path, needed_by)  # its config loads, so AutoConfig below cannot fail
    config = AutoConfig.from_pretrained(path)
    if config.num_labels != 1:
        kind = ", ".join(config.architectures or []) or config.model_type
        raise UserError(f"{path} is not a reward model: it has num_labels {config.num_labels} ({kind}); {needed_by} "
                        "needs a sequence classifier with one output (train one with the reward stage)")


class RewardModel:
    """Scores the chat-templated conversation (prompt + completion), clamped to ±clip."""

    name = "reward_model"

    def __init__(self, path: str, device, clip: float, max_len: int = 4096):
        from transformers import AutoModelForSequenceClassification

        check_reward_model(path, "--reward_model")
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        self.model.eval().requires_grad_(False).to(device)
        has_tokenizer = (Path(path) / "tokenizer_config.json").is_file()
        self.tokenizer = load_tokenizer(path if has_tokenizer else None)
        if self.model.config.pad_token_id is None:  # the score is read at the last token that is not padding
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.clip, self.max_len, self.device = clip, max_len, device

    @torch.no_grad()
    def score(self, prompts: list[list[dict]], completions: list[str]) -> torch.Tensor:
        texts = [self.tokenizer.apply_chat_template(p + [{"role": "assistant", "content": c}], tokenize=False)
                 for p, c in zip(prompts, completions)]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_len,
                             add_special_tokens=False)
        logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
        return logits[:, 0].float().clamp(-self.clip, self.clip).cpu()
