"""Preference losses (DPO and its IPO / hinge variants) as plain functions on log-probabilities.

No engine, no model: the stage computes sequence log-probabilities and hands them in, so the tests
can check the formulas on hand-made numbers.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from minimind_scale.losses.causal_lm import token_logprobs

LossType = Literal["sigmoid", "ipo", "hinge"]


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(sequence) per row: the SUM of next-token log-probs over loss-bearing tokens, [batch].

    A sum rather than a mean is what the DPO objective is defined on (the log-ratio of whole
    responses); a mean would let a long and a short answer weigh the same.
    """
    picked, _ = token_logprobs(logits, labels)
    return picked.sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: LossType = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards), each [pairs].

    With h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected):
      sigmoid (DPO, Rafailov et al. 2023; with label smoothing ε the "conservative" DPO):
          -(1-ε)·log σ(β·h) - ε·log σ(-β·h)
      ipo (Azar et al. 2023): (h - 1/(2β))²
      hinge (SLiC, Zhao et al. 2023): max(0, 1 - β·h)
    Rewards are β·(policy - reference), the implicit reward DPO trains; they carry no gradient.
    """
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected sigmoid, ipo or hinge")
    rewards_chosen = beta * (policy_chosen - ref_chosen).detach()
    rewards_rejected = beta * (policy_rejected - ref_rejected).detach()
    return losses, rewards_chosen, rewards_rejected
