"""Knowledge-distillation loss as plain functions on logits (no engine, no model).

Everything is a SUM over loss-bearing tokens (positions whose next-token label is not IGNORE_INDEX), so the
engine's per-step token normalisation applies to distillation exactly as to cross-entropy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minimind_scale.data.rows import IGNORE_INDEX
from minimind_scale.losses.causal_lm import shifted_labels


def kd_loss_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """T² · Σ over loss-bearing tokens of KL(softmax(teacher/T) ‖ softmax(student/T)).

    The T² factor (Hinton et al. 2015) keeps the soft-target gradients on the same scale as the
    hard-label ones when T changes. Only loss-bearing positions are gathered before the softmax, so
    prompt and padding positions cost no memory and an all-ignored batch gives exactly 0.
    """
    mask = shifted_labels(labels) != IGNORE_INDEX
    s = student_logits[mask].float() / temperature
    t = teacher_logits[mask].float() / temperature
    log_q = F.log_softmax(s, dim=-1)
    log_p = F.log_softmax(t, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum()
    return kl * temperature ** 2


def weighted_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor,
                               token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over loss-bearing tokens of weight · CE; weights are aligned with labels (weight of the
    token being predicted), 1 where not given."""
    target = shifted_labels(labels)
    mask = target != IGNORE_INDEX
    ce = F.cross_entropy(logits[mask].float(), target[mask], reduction="none")
    if token_weights is not None:
        ce = ce * F.pad(token_weights[:, 1:], (0, 1), value=0.0)[mask].to(ce.dtype)
    return ce.sum()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      alpha: float, temperature: float, token_weights: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_sum, ce_sum, kd_sum) with loss = alpha·CE + (1 - alpha)·T²·KL(teacher_T ‖ student_T)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ (the vocabularies must match)")
    ce = weighted_cross_entropy_sum(student_logits, labels, token_weights)
    kd = kd_loss_sum(student_logits, teacher_logits, labels, temperature) if alpha < 1 else ce.new_zeros(())
    return alpha * ce + (1 - alpha) * kd, ce, kd
