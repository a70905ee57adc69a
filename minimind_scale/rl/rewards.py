"""Transitional: the names this module held, now in modules with one job each.

`rl.reward_funcs` defines a reward function and loads one by name (`RewardFunc`, `load_reward_funcs`),
`rl.reward_builtins` holds the built-ins (`accuracy`, `minimind_format`, `minimind_agent`, ...),
`rl.reward_scoring` scores completions (`score_completions`), and `chat.reply_parser` cuts a reply's
answer (`answer_text`). This module re-exports them until every importer uses their new homes.
"""
from __future__ import annotations

from minimind_scale.chat.reply_parser import answer_text
from minimind_scale.rl.reward_builtins import (
    AGENT_CLIP,
    BUILTIN_REWARDS,
    NUMERIC_TOLERANCE,
    accuracy,
    completion_text,
    minimind_agent,
    minimind_format,
    repetition_penalty,
)
from minimind_scale.rl.reward_funcs import RESERVED, RewardFunc, load_reward_funcs
from minimind_scale.rl.reward_scoring import score_completions

__all__ = [
    "AGENT_CLIP", "BUILTIN_REWARDS", "NUMERIC_TOLERANCE", "RESERVED", "RewardFunc", "accuracy", "answer_text",
    "completion_text", "load_reward_funcs", "minimind_agent", "minimind_format", "repetition_penalty",
    "score_completions",
]
