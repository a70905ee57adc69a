"""Loss building blocks shared by stages. Plain functions on tensors: no engine, no accelerator.

Losses are returned as SUMS over their units (tokens, or pairs); the engine divides by the unit
count of the whole optimizer step across micro-batches and ranks (docs/architecture.md, "Loss normalisation").
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from minimind_scale.data.batching import count_label_tokens, forward_kwargs, unwrap_config
from minimind_scale.data.rows import IGNORE_INDEX


@dataclass
class LossOutput:
    loss_sum: torch.Tensor
    # Extra metrics as sums; the engine reports each sum over the step divided by the step's loss
    # units, or by the summed count in `metric_units` for a metric with its own denominator (a
    # per-token KL in a loss whose units are completions).
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    metric_units: dict[str, torch.Tensor | float] = field(default_factory=dict)
    # The part of loss_sum that is a regulariser (an MoE router loss), which validation leaves out to
    # report the objective itself.
    regularizer_sum: torch.Tensor | float = 0.0


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t+1: drop the first label and pad the end with IGNORE_INDEX."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def token_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over positions whose (unshifted) label is not ignored, in fp32."""
    target = shifted_labels(labels)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), target.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(next token) and the mask of loss-bearing positions, both [batch, seq]."""
    target = shifted_labels(labels)
    mask = target != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = torch.gather(logp, -1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def forward_logits(model, batch: dict):
    """One forward pass."""
    return model(**forward_kwargs(batch, model))


def forward_loss_sum(model, batch: dict, cfg):
    """The loss-only forward that chunked_loss.enable_loss_forward bound on the model (cross_entropy chunked
    or liger): `out.loss` is the fp32 next-token loss sum, and no logits exist. Called through `model`,
    the Accelerate wrapper, so its hooks (DDP, DeepSpeed) run. `max_tokens` bounds every micro-batch's
    positions, so that all ranks split theirs into the same number of chunks."""
    out = model(**forward_kwargs(batch, model), labels=batch["labels"], loss_sum_only=True,
                max_tokens=cfg.batch_size * cfg.max_seq_len)
    if out.logits is not None:
        # The plain forward ran (with a mean loss): nothing bound the loss-only variant.
        raise RuntimeError(f"cross_entropy {cfg.cross_entropy} needs losses.chunked.enable_loss_forward(model) "
                           "before accelerator.prepare")
    return out


def causal_lm_loss(model, batch: dict, cfg=None, ctx=None) -> LossOutput:
    """Next-token cross-entropy summed over loss-bearing tokens; an MoE model's router loss joins it."""
    if cfg is not None and cfg.cross_entropy != "full":
        out = forward_loss_sum(model, batch, cfg)
        loss_sum = out.loss
    else:
        out = forward_logits(model, batch)
        loss_sum = token_cross_entropy_sum(out.logits, batch["labels"])
    metrics = {}
    aux = getattr(out, "aux_loss", None)
    if aux is not None:
        # Weighted by this micro-batch's tokens, so after the engine divides by the step's tokens
        # the router loss enters as MiniMind adds it: coef · aux per batch.
        n = count_label_tokens(batch)
        coef = getattr(unwrap_config(model), "router_aux_loss_coef", 0.0)
        loss_sum = loss_sum + coef * aux * n
        metrics["aux_loss"] = aux.detach() * n
        return LossOutput(loss_sum, metrics, regularizer_sum=(coef * aux * n).detach())
    return LossOutput(loss_sum, metrics)
