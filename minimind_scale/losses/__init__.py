"""Losses as plain functions: cross-entropy (full and chunked), preference, distillation, reward model, policy, PPO."""
from __future__ import annotations

import importlib

# The names the flat layout's `minimind_scale.losses` module held, still importable from here (loaded on first use).
_MOVED_NAMES = frozenset({
    'LossOutput', 'shifted_labels', 'count_label_tokens', 'token_cross_entropy_sum', 'token_logprobs',
    'forward_logits', 'forward_loss_sum', 'causal_lm_loss',
})


def __getattr__(name: str):
    if name not in _MOVED_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module("minimind_scale.losses.causal_lm"), name)
