"""PPO with a learned critic, as plain functions on per-token tensors [rows, T] with a completion mask.

Conventions: position t of a completion is the state before its token t; `values[:, t]` is the critic's
estimate there, `logps[:, t]` the policy's log-probability of token t. The episode ends after the last
masked token (its next value is 0), and positions after it contribute nothing.

The reward is a scalar per completion, placed on its last token. The KL to the reference enters in one
of two places: in the loss as the k3 estimate (MiniMind's train_ppo.py; `losses.policy.k3_kl`), or in the
per-token reward as −kl_coef·k1 with k1 = log π_old − log π_ref (TRL's and OpenRLHF's PPO). The policy's
per-token term is the GRPO family's clipped surrogate (`losses.policy.clipped_ratio`) with per-token advantages.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from minimind_scale.losses.policy import clipped_ratio

WHITEN_EPS = 1e-8


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, kl_coef: float = 0.0,
                  old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token rewards [rows, T]: each completion's score on its last token, minus kl_coef·k1 on every
    token when the reference's log-probs are given (the KL-in-reward placement)."""
    mask = mask.float()
    rewards = torch.zeros_like(mask)
    if ref_logps is not None:
        rewards = -kl_coef * (old_logps - ref_logps) * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    has_tokens = mask.sum(dim=1) > 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has_tokens]
    rewards[rows, last[has_tokens]] += scores.to(rewards)[has_tokens]
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation: δ_t = r_t + γ·V_{t+1} − V_t (V after the last token is 0),
    A_t = δ_t + γλ·A_{t+1}; returns (advantages, returns = A + V), both 0 outside the mask."""
    mask = mask.float()
    values = values.float() * mask
    rewards = rewards.float() * mask
    width = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(width)):
        next_value = values[:, t + 1] if t + 1 < width else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor,
           reduce_sum: Callable[[list[float]], list[float]] = lambda xs: xs) -> torch.Tensor:
    """(x − mean) / sqrt(var + eps) over the masked entries, 0 elsewhere. `reduce_sum` sums a list of floats
    over every process, so the mean and the (population) variance are those of the whole batch."""
    mask = mask.float()
    total, count = reduce_sum([float((values * mask).sum()), float(mask.sum())])
    mean = total / max(count, 1.0)
    (squares,) = reduce_sum([float((((values - mean) * mask) ** 2).sum())])
    var = squares / max(count, 1.0)
    return (values - mean) * (var + WHITEN_EPS) ** -0.5 * mask


class PolicyTerms(NamedTuple):
    loss: torch.Tensor       # per-token clipped surrogate, −min(r·A, clip(r, 1 ± ε)·A)
    clipped: torch.Tensor    # bool: the clipped branch was taken (its gradient is 0)
    approx_kl: torch.Tensor  # per-token 0.5·(log r)², the early-stop statistic


def policy_terms(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                 cliprange: float) -> PolicyTerms:
    """The clipped surrogate with a symmetric clip, on per-token advantages [rows, T]."""
    log_ratio = logps - old_logps
    terms = clipped_ratio(torch.exp(log_ratio), advantages, logps, epsilon=cliprange, epsilon_high=cliprange)
    return PolicyTerms(terms.loss, terms.clipped, 0.5 * log_ratio.detach() ** 2)


def value_terms(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped value loss 0.5·max((V − R)², (V_old + clip(V − V_old, ±ε_v) − R)²), and where the
    clipped term was the larger."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    plain, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(plain, clipped), clipped > plain
