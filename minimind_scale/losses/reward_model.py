"""Bradley-Terry reward-model loss and its metrics, as plain functions on the model's scalar scores.

The loss and the metrics are per pair so that a stage can return their SUMS with ``pairs`` as the unit
and the engine's step normalisation gives the mean over every pair of the step, however the step is split.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _scores(x: torch.Tensor, name: str) -> torch.Tensor:
    # A sequence-classification head gives [pairs, 1]; accept it as [pairs].
    if x.dim() == 2 and x.size(-1) == 1:
        x = x.squeeze(-1)
    if x.dim() != 1:
        raise ValueError(f"{name} must be [pairs] (or [pairs, 1]), got shape {tuple(x.shape)}")
    return x


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float | None = None,
                       center_rewards_coefficient: float | None = 0.0) -> torch.Tensor:
    """Per-pair losses [pairs]: −log σ(r_c − r_r − margin) + coef·(r_c + r_r)².

    ``margin`` (per pair, or one number) asks the chosen score to win by at least that much, for data
    that says how strongly one answer is preferred. The centering term is the one TRL's reward trainer
    adds, coefficient × mean over pairs of (r_c + r_r)², so the mean of these per-pair losses equals
    its loss: it pulls the scores towards zero mean, which the pairwise term alone leaves free (adding a
    constant to every score changes nothing), so that scores stay comparable across runs and usable as
    RL rewards. None is taken as 0, TRL's default of not centering.
    """
    rc = _scores(r_chosen, "r_chosen")
    rr = _scores(r_rejected, "r_rejected")
    if rc.shape != rr.shape:
        raise ValueError(f"r_chosen {tuple(rc.shape)} and r_rejected {tuple(rr.shape)} differ")
    diff = rc - rr
    if margin is not None:
        m = torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
        if m.dim() == 2 and m.size(-1) == 1:
            m = m.squeeze(-1)
        diff = diff - m
    losses = -F.logsigmoid(diff)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (rc + rr) ** 2
    return losses


def pair_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reward-model metrics of each pair, [pairs] each and detached: `accuracy` 1 where the chosen answer
    scores strictly higher (a tie counts as wrong, as in TRL's logs), `margin` r_chosen − r_rejected, and each
    side's score. A stage returns their sums, so that the engine (and `eval`) report means over all pairs."""
    rc, rr = _scores(r_chosen, "r_chosen").detach(), _scores(r_rejected, "r_rejected").detach()
    return {"accuracy": (rc > rr).float(), "margin": rc - rr, "reward_chosen": rc, "reward_rejected": rr}
