"""Policy-gradient losses for online RL (the GRPO family): a per-token OBJECTIVE times an AGGREGATION.

No engine, no model, no generation: a stage samples completions, scores them, computes per-token
log-probabilities and hands the tensors in, so every formula here can be checked on hand-made numbers.

Shapes: per-token tensors are [completions, tokens]; ``advantages`` is [completions]; ``mask`` is 1
for completion tokens up to and including the first end-of-turn token and 0 after it (padding, or
what a model wrote past its turn).

Two small registries
--------------------
An objective turns the importance ratio, the advantages and the log-probs into a per-token loss
(``clipped_ratio``: PPO's clipped surrogate; ``capped_weight``: CISPO's capped, detached ratio weight).
An aggregation (``AGGREGATIONS``) turns a micro-batch's masked per-token losses into a sum plus a unit
count. A ``loss_type`` is a registered pair of the two, with the default upper clip its objective wants:

  ``cispo``   capped_weight + completion_mean, cap 5.0
  ``grpo``    clipped_ratio + completion_mean
  ``dapo``    clipped_ratio + token_mean
  ``dr_grpo`` clipped_ratio + fixed_length

A new loss type is one decorated function::

    @register_policy_loss("my_loss", aggregation="token_mean")
    def my_objective(ratio, advantages, logps, *, epsilon, epsilon_high) -> TokenLoss: ...

and is then accepted by ``--loss_type my_loss`` (a plugin file that registers it must be loaded first).

Why every aggregation is a SUM plus a unit count
------------------------------------------------
The engine splits an optimizer step into micro-batches (gradient accumulation) and ranks, and it
normalises a step by dividing the summed loss of all its pieces by the summed unit count of all its
pieces. A per-micro-batch *mean* divided by the number of accumulation steps is only the intended
average when every micro-batch holds the same number of units; a last partial batch, or ranks whose
completions differ in length, silently re-weight completions or tokens. Returning ``sum`` and
``units`` separately makes each definition exact however the step is cut:

  ``completion_mean`` mean over completions of each completion's token mean. Sum: Σ_c (Σ_t l·m / Σ_t m);
              unit: completions. A completion's tokens share one weight, so long answers do not
              dominate, but each token of a short answer weighs more (the length bias Dr. GRPO names).
              MiniMind's train_grpo.py normalises its cispo this way (TRL's cispo uses token_mean).
  ``token_mean`` Σ over every completion token of the step / number of completion tokens in the whole
              step (all micro-batches and ranks). Sum: Σ l·m; unit: tokens. Every token weighs the same.
  ``fixed_length`` Σ l·m / (completions × max_gen_len). Sum: Σ l·m / max_gen_len; unit: completions. A
              constant denominator: no length bias, and no dependence on how long the sampled
              completions happened to be.

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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

import torch

ScaleMode = Literal["group", "batch", "none"]
SCALE_MODES: tuple[str, ...] = ("group", "batch", "none")
STD_EPS = 1e-4


class TokenLoss(NamedTuple):
    """Per-token loss terms and what the clip did, all [completions, tokens], unmasked.

    ``clipped_low`` / ``clipped_high`` mark tokens whose gradient the clip (clipped_ratio) or the cap
    (capped_weight) changed; their masked token mean is the usual ``clip_ratio`` log. ``kl`` is the k3
    estimate against the reference, or None without one (an objective alone never sets it).
    """

    loss: torch.Tensor
    clipped_low: torch.Tensor
    clipped_high: torch.Tensor
    kl: torch.Tensor | None = None

    @property
    def clipped(self) -> torch.Tensor:
        return self.clipped_low | self.clipped_high


class Objective(Protocol):
    """A per-token policy objective. `ratio` is exp(logπ − sg(logπ_old)) [completions, tokens], `advantages`
    broadcasts against it (detached), `logps` is logπ. `epsilon` is the lower clip, `epsilon_high` the upper
    clip or cap (None: the caller gave none). Returns the loss and clip flags; the KL term is added after."""

    def __call__(self, ratio: torch.Tensor, advantages: torch.Tensor, logps: torch.Tensor, *, epsilon: float,
                 epsilon_high: float | None) -> TokenLoss: ...


@dataclass(frozen=True)
class Aggregation:
    """How one micro-batch's per-token losses become its SUM contribution to the step, and its unit count."""

    total: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (loss·mask, mask, max_gen_len) -> sum
    units: Callable[[torch.Tensor], int]                               # mask -> units the sum is over


@dataclass(frozen=True)
class PolicyLoss:
    """A registered loss type: its objective, its aggregation, and the upper clip it defaults to (None: the
    lower clip, symmetric)."""

    objective: Objective
    aggregation: Aggregation
    clip_high: float | None = None


AGGREGATIONS: dict[str, Aggregation] = {}
POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_aggregation(name: str, *, units: Callable[[torch.Tensor], int]):
    """Decorator: `total(masked_loss, mask, max_gen_len) -> sum` is aggregation `name`, counting `units(mask)`."""
    def register(total):
        if name in AGGREGATIONS:
            raise ValueError(f"aggregation {name!r} is already registered")
        AGGREGATIONS[name] = Aggregation(total, units)
        return total
    return register


def register_policy_loss(name: str, *, aggregation: str, clip_high: float | None = None):
    """Decorator: the decorated objective, reduced by the registered `aggregation`, is loss type `name`;
    `clip_high` is the upper clip it uses when --epsilon_high is not given (default: --epsilon)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {', '.join(AGGREGATIONS)}")

    def register(objective: Objective) -> Objective:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss_type {name!r} is already registered")
        POLICY_LOSSES[name] = PolicyLoss(objective, AGGREGATIONS[aggregation], clip_high)
        return objective
    return register


def policy_loss(loss_type: str) -> PolicyLoss:
    try:
        return POLICY_LOSSES[loss_type]
    except KeyError:
        raise ValueError(f"unknown policy loss_type {loss_type!r}; expected one of "
                         f"{', '.join(POLICY_LOSSES)}") from None


# ------------------------------------------------------------------------------------- aggregations


def count_completions(mask: torch.Tensor) -> int:
    """Every completion counts, even one with no unmasked token: it was sampled and scored, and the mean
    over completions includes it (contributing 0)."""
    return int(mask.size(0))


def count_tokens(mask: torch.Tensor) -> int:
    return int(mask.sum().item())


@register_aggregation("completion_mean", units=count_completions)
def completion_mean(masked: torch.Tensor, mask: torch.Tensor, max_gen_len: int) -> torch.Tensor:
    return (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).sum()


@register_aggregation("token_mean", units=count_tokens)
def token_mean(masked: torch.Tensor, mask: torch.Tensor, max_gen_len: int) -> torch.Tensor:
    return masked.sum()


@register_aggregation("fixed_length", units=count_completions)
def fixed_length(masked: torch.Tensor, mask: torch.Tensor, max_gen_len: int) -> torch.Tensor:
    if max_gen_len < 1:
        raise ValueError(f"a fixed-length normalisation (dr_grpo) needs max_gen_len >= 1, got {max_gen_len}")
    return masked.sum() / max_gen_len


# ---------------------------------------------------------------------------------------- objectives


@register_policy_loss("cispo", aggregation="completion_mean", clip_high=5.0)
def capped_weight(ratio: torch.Tensor, advantages: torch.Tensor, logps: torch.Tensor, *, epsilon: float,
                  epsilon_high: float | None) -> TokenLoss:
    """CISPO per token: −sg(min(ρ, ε_high))·A·logπ (MiniMind's default policy loss).

    ``epsilon_high`` is an absolute cap on the ratio here (MiniMind's default 5.0), not a margin above 1
    as in the clipped surrogate, and ``epsilon`` is unused. The weight is detached, so unlike PPO's clip
    no token ever loses its gradient: the cap only bounds how much one token can count, and the gradient
    flows through logπ alone. ``clipped_high`` marks every token whose ratio the cap lowered, whatever
    the sign of its advantage, because the cap changes those tokens' weight either way (TRL's
    ``cispo_clip_ratio`` counts only A > 0).
    """
    if epsilon_high is None:
        raise ValueError("cispo needs epsilon_high, the absolute cap on the ratio (MiniMind uses 5.0)")
    weight = torch.clamp(ratio, max=epsilon_high).detach()
    loss = -weight * advantages * logps
    with torch.no_grad():
        high = ratio > epsilon_high
    return TokenLoss(loss, torch.zeros_like(high), high)


@register_policy_loss("dr_grpo", aggregation="fixed_length")
@register_policy_loss("dapo", aggregation="token_mean")
@register_policy_loss("grpo", aggregation="completion_mean")
def clipped_ratio(ratio: torch.Tensor, advantages: torch.Tensor, logps: torch.Tensor, *, epsilon: float,
                  epsilon_high: float | None) -> TokenLoss:
    """PPO's clipped surrogate per token: −min(ρ·A, clip(ρ, 1−ε, 1+ε_high)·A).

    ``epsilon_high`` (default ``epsilon``) widens the upper bound alone, DAPO's "clip-higher". The clip
    flags follow where the min picks the clipped side, which is where the gradient vanishes: ρ < 1−ε
    with A < 0, and ρ > 1+ε_high with A > 0.
    """
    eh = epsilon if epsilon_high is None else epsilon_high
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eh) * advantages
    loss = -torch.min(unclipped, clipped)
    with torch.no_grad():
        low = (ratio < 1 - epsilon) & (advantages < 0)
        high = (ratio > 1 + eh) & (advantages > 0)
    return TokenLoss(loss, low, high)


# ------------------------------------------------------------------------------ KL and advantages


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π‖π_ref): exp(ref − π) − (ref − π) − 1.

    Unlike the plain log-ratio it is never negative for a single sample (e^x ≥ 1 + x), so a per-token
    penalty cannot reward moving away from the reference, and it is exactly 0 where the two agree.
    """
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def scale_advantages(rewards, group_size: int, mode: ScaleMode = "group") -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [n], per-group reward std [n / group_size]) from rewards ordered group by group.

    ``group``: (r − mean_g) / (std_g + 1e-4); ``batch``: (r − mean_g) / (std over all n + 1e-4);
    ``none``: r − mean_g. The std is the sample (unbiased, n−1) std, as TRL's ``torch.std`` uses
    (MiniMind's train_grpo.py uses the population std). A group whose rewards are all equal carries no
    signal about which completion was better: its advantages are set to exactly 0 (a float mean of equal
    values need not equal them) and its std is reported as exactly 0, so
    ``frac_reward_zero_std = (std == 0).float().mean()``. The std is per group in every mode, because
    what callers log is how many groups gave no learning signal.

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
        group_std = groups.std(dim=1)
    else:
        group_std = torch.zeros(groups.size(0), dtype=r.dtype, device=r.device)
    group_std = torch.where(constant, torch.zeros_like(group_std), group_std)
    centred = groups - mean
    if mode == "group":
        centred = centred / (group_std.unsqueeze(1) + STD_EPS)
    elif mode == "batch":
        batch_std = r.std() if r.numel() > 1 else r.new_zeros(())
        centred = centred / (batch_std + STD_EPS)
    centred = torch.where(constant.unsqueeze(1), torch.zeros_like(centred), centred)
    return centred.reshape(-1), group_std


# -------------------------------------------------------------------------- a loss type, end to end


def _ratio(logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor,
           ref_logps: torch.Tensor | None, beta: float) -> torch.Tensor:
    """exp(logπ − sg(logπ_old)), after checking the shapes (old_logps None: the ratio is 1 by construction)."""
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


def token_loss(loss_type: str, logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor,
               *, epsilon: float = 0.2, epsilon_high: float | None = None, ref_logps: torch.Tensor | None = None,
               beta: float = 0.0) -> TokenLoss:
    """The per-token loss of ``loss_type``: its objective, plus β·k3 KL to the reference when ``ref_logps``
    is given (the KL is reported whenever there is a reference, and added when β != 0). Reduce it with
    ``reduce_policy_loss`` and the same type."""
    objective = policy_loss(loss_type).objective
    ratio = _ratio(logps, old_logps, advantages, ref_logps, beta)
    a = advantages.detach().unsqueeze(1).to(ratio.dtype)
    terms = objective(ratio, a, logps, epsilon=epsilon, epsilon_high=epsilon_high)
    if ref_logps is None:
        return terms
    kl = k3_kl(logps, ref_logps.detach())
    return terms._replace(loss=terms.loss + beta * kl if beta != 0.0 else terms.loss, kl=kl)


def reduce_policy_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_gen_len: int) -> torch.Tensor:
    """This micro-batch's SUM contribution to the step loss under ``loss_type``'s aggregation; the engine
    divides the step's total by the step's total ``loss_units`` (see the module docstring for why a sum)."""
    aggregation = policy_loss(loss_type).aggregation
    if mask.shape != per_token.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, per_token {tuple(per_token.shape)}")
    m = mask.to(per_token.dtype)
    return aggregation.total(per_token * m, m, max_gen_len)


def loss_units(loss_type: str, mask: torch.Tensor) -> int:
    """How many units ``reduce_policy_loss`` summed over in this micro-batch: completions or tokens."""
    return policy_loss(loss_type).aggregation.units(mask)
