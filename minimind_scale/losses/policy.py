"""Policy-gradient losses for online RL (the GRPO family) as plain functions on per-token tensors.

No engine, no model, no generation: a stage samples completions, scores them, computes per-token
log-probabilities and hands the tensors in, so every formula here can be checked on hand-made numbers.

Shapes: per-token tensors are [completions, tokens]; ``advantages`` is [completions]; ``mask`` is 1
for completion tokens up to and including the first end-of-turn token and 0 after it (padding, or
what a model wrote past its turn).

Why every reduction is a SUM plus a unit count
----------------------------------------------
The engine splits an optimizer step into micro-batches (gradient accumulation) and ranks, and it
normalises a step by dividing the summed loss of all its pieces by the summed unit count of all its
pieces (see ``StageSpec.loss_units``). A per-micro-batch *mean* divided by the number of
accumulation steps is only the intended average when every micro-batch holds the same number of
units; a last partial batch, or ranks whose completions differ in length, silently re-weight
completions or tokens. Returning ``sum`` and ``units`` separately makes each definition exact
however the step is cut:

  ``grpo``    mean over completions of each completion's token mean. Sum: Σ_c (Σ_t l·m / Σ_t m);
              unit: completions. A completion's tokens share one weight, so long answers do not
              dominate, but each token of a short answer weighs more (the length bias Dr. GRPO names).
  ``dapo``    Σ over every completion token of the step / number of completion tokens in the whole
              step (all micro-batches and ranks). Sum: Σ l·m; unit: tokens. Every token weighs the
              same.
  ``dr_grpo`` Σ l·m / (completions × max_gen_len). Sum: Σ l·m / max_gen_len; unit: completions. A
              constant denominator: no length bias, and no dependence on how long the sampled
              completions happened to be.
  ``cispo``   as MiniMind's train_grpo.py normalises it: per-completion token mean, then the mean
              over the batch (then divided by the accumulation steps, i.e. a mean over the step's
              completions when micro-batches are equal). That is ``grpo``'s reduction, and it is used
              here. (TRL normalises its cispo by the step's token count, like ``dapo``.)

num_iterations == 1
-------------------
When each batch of completions is used for a single gradient step, ``old_logps`` is
``logps.detach()`` (pass ``old_logps=None``), so ratio = exp(logπ − sg(logπ)) is exactly 1 by
construction and no clipping can happen. The clipped surrogate's loss *value* is then
−mean(advantage) (+ β·KL), about 0 for group-normalised advantages, yet its gradient is
−A·∇logπ, which is not 0; a loss curve that sits near 0 is expected and says nothing about learning.
CISPO's value is −A·logπ (its ratio weight is detached), which is not near 0, but its gradient is
the same −A·∇logπ.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import torch

LossType = Literal["grpo", "dapo", "dr_grpo", "cispo"]
LOSS_TYPES: tuple[str, ...] = ("grpo", "dapo", "dr_grpo", "cispo")
ScaleMode = Literal["group", "batch", "none"]
SCALE_MODES: tuple[str, ...] = ("group", "batch", "none")
STD_EPS = 1e-4

# Loss types whose unit is a completion; the rest count tokens.
_PER_COMPLETION = ("grpo", "dr_grpo", "cispo")


class TokenLoss(NamedTuple):
    """Per-token loss terms and what the clip did, all [completions, tokens], unmasked.

    ``clipped_low`` / ``clipped_high`` mark tokens whose gradient the clip (grpo family) or the cap
    (cispo) changed; reduce them with ``masked_mean`` for the usual ``clip_ratio/*`` logs. ``kl`` is
    the k3 estimate against the reference, or None without one.
    """

    loss: torch.Tensor
    clipped_low: torch.Tensor
    clipped_high: torch.Tensor
    kl: torch.Tensor | None

    @property
    def clipped(self) -> torch.Tensor:
        return self.clipped_low | self.clipped_high


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π‖π_ref): exp(ref − π) − (ref − π) − 1.

    Unlike the plain log-ratio it is never negative for a single sample (e^x ≥ 1 + x), so a per-token
    penalty cannot reward moving away from the reference, and it is exactly 0 where the two agree.
    """
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def scale_advantages(rewards, group_size: int, mode: ScaleMode = "group", *,
                     unbiased: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [n], per-group reward std [n / group_size]) from rewards ordered group by group.

    ``group``: (r − mean_g) / (std_g + 1e-4); ``batch``: (r − mean_g) / (std over all n + 1e-4);
    ``none``: r − mean_g. The std is the sample (unbiased, n−1) std by default, as TRL's ``torch.std``
    uses; ``unbiased=False`` gives the population std MiniMind's train_grpo.py uses. A group whose
    rewards are all equal carries no signal about which completion was better: its advantages are set
    to exactly 0 (a float mean of equal values need not equal them) and its std is reported as exactly
    0, so ``frac_reward_zero_std = (std == 0).float().mean()``. The std is per group in every mode,
    because what callers log is how many groups gave no learning signal.

    For TRL parity under data parallelism, pass the rewards of the whole global batch: groups must be
    complete, and ``batch`` takes its std over what it is given.
    """
    if mode not in SCALE_MODES:
        raise ValueError(f"unknown advantage scaling {mode!r}; expected one of {', '.join(SCALE_MODES)}")
    r = torch.as_tensor(rewards)
    if not r.is_floating_point():
        r = r.float()
    r = r.reshape(-1)
    if group_size < 1 or r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    groups = r.view(-1, group_size)
    constant = groups.amax(dim=1) == groups.amin(dim=1)
    mean = groups.mean(dim=1, keepdim=True)
    if group_size > 1:
        group_std = groups.std(dim=1, unbiased=unbiased)
    else:
        group_std = torch.zeros(groups.size(0), dtype=r.dtype, device=r.device)
    group_std = torch.where(constant, torch.zeros_like(group_std), group_std)
    centred = groups - mean
    if mode == "group":
        centred = centred / (group_std.unsqueeze(1) + STD_EPS)
    elif mode == "batch":
        batch_std = r.std(unbiased=unbiased) if r.numel() > 1 else r.new_zeros(())
        centred = centred / (batch_std + STD_EPS)
    centred = torch.where(constant.unsqueeze(1), torch.zeros_like(centred), centred)
    return centred.reshape(-1), group_std


def _check(logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor,
           ref_logps: torch.Tensor | None, beta: float) -> torch.Tensor:
    if logps.dim() != 2:
        raise ValueError(f"logps must be [completions, tokens], got shape {tuple(logps.shape)}")
    for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if t is not None and t.shape != logps.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, logps {tuple(logps.shape)}")
    if advantages.shape != logps.shape[:1]:
        raise ValueError(f"advantages must be [completions] = [{logps.size(0)}], got {tuple(advantages.shape)}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 needs ref_logps (the reference model's log-probs)")
    ref = old_logps if old_logps is not None else logps
    return torch.exp(logps - ref.detach())


def _with_kl(loss: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor | None,
             beta: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    if ref_logps is None:
        return loss, None
    kl = k3_kl(logps, ref_logps.detach())
    return (loss + beta * kl if beta != 0.0 else loss), kl


def clipped_token_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor, *,
                       epsilon: float = 0.2, epsilon_high: float | None = None, ref_logps: torch.Tensor | None = None,
                       beta: float = 0.0) -> TokenLoss:
    """PPO's clipped surrogate per token: −min(ρ·A, clip(ρ, 1−ε, 1+ε_high)·A) + β·KL, ρ = exp(π − π_old).

    The per-token term of ``grpo``, ``dapo`` and ``dr_grpo`` alike; they differ only in the
    reduction. ``epsilon_high`` (default ``epsilon``) widens the upper bound alone, DAPO's
    "clip-higher". The clip flags follow where the min picks the clipped side, which is where the
    gradient vanishes: ρ < 1−ε with A < 0, and ρ > 1+ε_high with A > 0.
    """
    ratio = _check(logps, old_logps, advantages, ref_logps, beta)
    eh = epsilon if epsilon_high is None else epsilon_high
    a = advantages.detach().unsqueeze(1).to(ratio.dtype)
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eh) * a
    loss = -torch.min(unclipped, clipped)
    loss, kl = _with_kl(loss, logps, ref_logps, beta)
    with torch.no_grad():
        low = (ratio < 1 - epsilon) & (a < 0)
        high = (ratio > 1 + eh) & (a > 0)
    return TokenLoss(loss, low, high, kl)


def cispo_token_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor, *,
                     epsilon_high: float, ref_logps: torch.Tensor | None = None, beta: float = 0.0) -> TokenLoss:
    """CISPO per token: −sg(min(ρ, ε_high))·A·logπ + β·KL (MiniMind's default policy loss).

    ``epsilon_high`` is an absolute cap on the ratio here (MiniMind's default 5.0), not a margin
    above 1 as in the clipped surrogate. The weight is detached, so unlike PPO's clip no token ever
    loses its gradient: the cap only bounds how much one token can count, and the gradient flows
    through logπ alone. ``clipped_high`` marks every token whose ratio the cap lowered, whatever the
    sign of its advantage, because the cap changes those tokens' weight either way (TRL's
    ``cispo_clip_ratio`` counts only A > 0).
    """
    ratio = _check(logps, old_logps, advantages, ref_logps, beta)
    a = advantages.detach().unsqueeze(1).to(ratio.dtype)
    weight = torch.clamp(ratio, max=epsilon_high).detach()
    loss = -weight * a * logps
    loss, kl = _with_kl(loss, logps, ref_logps, beta)
    with torch.no_grad():
        high = ratio > epsilon_high
    return TokenLoss(loss, torch.zeros_like(high), high, kl)


def token_loss(loss_type: LossType, logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor,
               *, epsilon: float = 0.2, epsilon_high: float | None = None, ref_logps: torch.Tensor | None = None,
               beta: float = 0.0) -> TokenLoss:
    """The per-token objective of ``loss_type``; reduce it with ``reduce_policy_loss`` and the same type."""
    if loss_type == "cispo":
        if epsilon_high is None:
            raise ValueError("cispo needs epsilon_high, the absolute cap on the ratio (MiniMind uses 5.0)")
        return cispo_token_loss(logps, old_logps, advantages, epsilon_high=epsilon_high, ref_logps=ref_logps,
                                beta=beta)
    if loss_type in ("grpo", "dapo", "dr_grpo"):
        return clipped_token_loss(logps, old_logps, advantages, epsilon=epsilon, epsilon_high=epsilon_high,
                                  ref_logps=ref_logps, beta=beta)
    raise ValueError(f"unknown policy loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


def reduce_policy_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: LossType, max_gen_len: int,
                       step_tokens: int | None = None) -> torch.Tensor:
    """This micro-batch's SUM contribution to the step loss; the engine divides the step's total by
    the step's total ``loss_units`` (see the module docstring for why a sum, and for each definition).

    ``step_tokens`` (dapo only): when the caller already knows the number of completion tokens in the
    whole optimizer step, the sum is divided by it here, so the contributions add up to the final
    loss directly and the engine must then divide by 1, not by ``loss_units``. Other loss types
    ignore it: their unit, completions, is known per micro-batch.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown policy loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if mask.shape != per_token.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, per_token {tuple(per_token.shape)}")
    m = mask.to(per_token.dtype)
    masked = per_token * m
    if loss_type in ("grpo", "cispo"):
        return (masked.sum(dim=1) / m.sum(dim=1).clamp(min=1.0)).sum()
    if loss_type == "dr_grpo":
        if max_gen_len < 1:
            raise ValueError(f"dr_grpo needs max_gen_len >= 1, got {max_gen_len}")
        return masked.sum() / max_gen_len
    total = masked.sum()
    if step_tokens is not None:
        if step_tokens < 1:
            raise ValueError(f"step_tokens must be >= 1, got {step_tokens}")
        total = total / step_tokens
    return total


def loss_units(loss_type: LossType, mask: torch.Tensor) -> int:
    """How many units ``reduce_policy_loss`` summed over in this micro-batch: completions or tokens.

    Every completion counts for the per-completion types, even one with no unmasked token: it was
    sampled and scored, and the mean over completions includes it (contributing 0).
    """
    if loss_type in _PER_COMPLETION:
        return int(mask.size(0))
    if loss_type == "dapo":
        return int(mask.sum().item())
    raise ValueError(f"unknown policy loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the completion tokens, for logs (KL, clip ratios); 0 when there are none."""
    m = mask.to(torch.float32)
    return (values.detach().to(torch.float32) * m).sum() / m.sum().clamp(min=1.0)
