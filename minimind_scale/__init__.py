"""minimind_scale: one trainer for MiniMind-family chat models, from a laptop CPU to many GPUs.

The names below are the public API: what a plugin needs to write an offline or an online stage. They load on
first use, so `python -m minimind_scale --help` imports no torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from minimind_scale.compat import install_moved_modules

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    # a stage and its registration
    "StageSpec": "minimind_scale.training.registry",
    "register_stage": "minimind_scale.training.registry",
    "Callback": "minimind_scale.training.callbacks",
    "register_callback": "minimind_scale.training.callbacks",
    "StageContext": "minimind_scale.training.context",
    "StageState": "minimind_scale.training.context",
    "Rollout": "minimind_scale.training.context",
    # configuration and errors
    "TrainConfig": "minimind_scale.config",
    "LearningRate": "minimind_scale.config",
    "RecordError": "minimind_scale.errors",
    "UserError": "minimind_scale.errors",
    # rows, batches and losses
    "IGNORE_INDEX": "minimind_scale.data.rows",
    "pad_collate": "minimind_scale.data.batching",
    "forward_kwargs": "minimind_scale.data.batching",
    "padded_length": "minimind_scale.data.batching",
    "LossOutput": "minimind_scale.losses.causal_lm",
    "causal_lm_loss": "minimind_scale.losses.causal_lm",
    "count_label_tokens": "minimind_scale.data.batching",
    "token_logprobs": "minimind_scale.losses.causal_lm",
    # the batch contract of a rollout
    "CountedBatch": "minimind_scale.training.batch",
    # online RL: GRPO-family loss types, generation backends
    "register_policy_loss": "minimind_scale.losses.policy",
    "TokenLoss": "minimind_scale.losses.policy",
    "register_backend": "minimind_scale.generation.registry",
    "GenerationBackend": "minimind_scale.generation.interface",
    "SamplingParams": "minimind_scale.generation.interface",
    "Completions": "minimind_scale.generation.interface",
    # conversations
    "normalize_messages": "minimind_scale.chat.messages",
    "encode_chat": "minimind_scale.chat.encoding",
}

__all__ = [
    "__version__",
    "Callback",
    "Completions",
    "CountedBatch",
    "GenerationBackend",
    "IGNORE_INDEX",
    "LearningRate",
    "LossOutput",
    "RecordError",
    "Rollout",
    "SamplingParams",
    "StageContext",
    "StageSpec",
    "StageState",
    "TokenLoss",
    "TrainConfig",
    "UserError",
    "causal_lm_loss",
    "count_label_tokens",
    "encode_chat",
    "forward_kwargs",
    "normalize_messages",
    "pad_collate",
    "padded_length",
    "register_backend",
    "register_callback",
    "register_policy_loss",
    "register_stage",
    "token_logprobs",
]

install_moved_modules()


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'minimind_scale' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:  # for editors and type checkers; at run time the names load lazily above
    from minimind_scale.chat.encoding import encode_chat
    from minimind_scale.chat.messages import normalize_messages
    from minimind_scale.config import LearningRate, TrainConfig
    from minimind_scale.data.batching import count_label_tokens, forward_kwargs, pad_collate, padded_length
    from minimind_scale.data.rows import IGNORE_INDEX
    from minimind_scale.errors import RecordError, UserError
    from minimind_scale.generation.interface import Completions, GenerationBackend, SamplingParams
    from minimind_scale.generation.registry import register_backend
    from minimind_scale.losses.causal_lm import LossOutput, causal_lm_loss, token_logprobs
    from minimind_scale.losses.policy import TokenLoss, register_policy_loss
    from minimind_scale.training.batch import CountedBatch
    from minimind_scale.training.callbacks import Callback, register_callback
    from minimind_scale.training.context import Rollout, StageContext, StageState
    from minimind_scale.training.registry import StageSpec, register_stage
