"""Bradley-Terry loss and reward-model metrics against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from minimind_scale.losses.reward_model import bradley_terry_loss, pair_metrics

RC = [2.0, 0.0, -1.0]
RR = [1.0, 0.0, 1.0]


def neg_log_sigmoid(z):
    return math.log1p(math.exp(-z))


def test_plain_bradley_terry():
    losses = bradley_terry_loss(torch.tensor(RC), torch.tensor(RR))
    assert losses.tolist() == pytest.approx([neg_log_sigmoid(c - r) for c, r in zip(RC, RR)], rel=1e-6)
    # hand values: log(1 + e^-1), log 2, log(1 + e^2)
    assert losses.tolist() == pytest.approx([0.3132617, 0.6931472, 2.1269280], abs=1e-6)


def test_margin_per_pair_and_scalar():
    margin = [0.5, 1.0, 0.0]
    losses = bradley_terry_loss(torch.tensor(RC), torch.tensor(RR), margin=torch.tensor(margin))
    expected = [neg_log_sigmoid(c - r - m) for c, r, m in zip(RC, RR, margin)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert expected[1] == pytest.approx(math.log1p(math.e))
    scalar = bradley_terry_loss(torch.tensor(RC), torch.tensor(RR), margin=1.0)
    assert scalar.tolist() == pytest.approx([neg_log_sigmoid(c - r - 1.0) for c, r in zip(RC, RR)], rel=1e-6)


def test_centering_adds_coef_times_squared_sum_and_its_mean_is_the_batch_definition():
    coef = 0.01
    rc = [2.0, 0.5, -1.0]
    rr = [1.0, 0.5, 3.0]
    losses = bradley_terry_loss(torch.tensor(rc), torch.tensor(rr), center_rewards_coefficient=coef)
    expected = [neg_log_sigmoid(c - r) + coef * (c + r) ** 2 for c, r in zip(rc, rr)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    # mean of per-pair terms = mean(-log σ) + coef · mean((r_c + r_r)²)
    pairwise = sum(neg_log_sigmoid(c - r) for c, r in zip(rc, rr)) / 3
    batch = pairwise + coef * sum((c + r) ** 2 for c, r in zip(rc, rr)) / 3
    assert losses.mean().item() == pytest.approx(batch, rel=1e-6)
    # None means no centering
    assert torch.equal(bradley_terry_loss(torch.tensor(rc), torch.tensor(rr), center_rewards_coefficient=None),
                       bradley_terry_loss(torch.tensor(rc), torch.tensor(rr)))


def test_gradient_pushes_chosen_up_and_rejected_down():
    rc = torch.tensor([0.3], requires_grad=True)
    rr = torch.tensor([0.1], requires_grad=True)
    bradley_terry_loss(rc, rr).sum().backward()
    s = 1 / (1 + math.exp(-(0.3 - 0.1)))
    assert rc.grad.item() == pytest.approx(-(1 - s), rel=1e-6)
    assert rr.grad.item() == pytest.approx(1 - s, rel=1e-6)


def test_classification_head_shape_is_accepted():
    losses = bradley_terry_loss(torch.tensor(RC).unsqueeze(1), torch.tensor(RR).unsqueeze(1))
    assert losses.shape == (3,)
    with pytest.raises(ValueError, match="differ"):
        bradley_terry_loss(torch.tensor(RC), torch.tensor(RR[:2]))


def test_metrics():
    rc, rr = torch.tensor(RC), torch.tensor(RR)
    # 2 > 1 yes, 0 > 0 no (a tie), -1 > 1 no
    m = {name: per_pair.mean().item() for name, per_pair in pair_metrics(rc, rr).items()}
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["margin"] == pytest.approx((1 + 0 - 2) / 3)
    assert m["reward_chosen"] == pytest.approx(1 / 3)
    assert m["reward_rejected"] == pytest.approx(2 / 3)
    assert pair_metrics(rc.unsqueeze(1), rr.unsqueeze(1))["accuracy"].tolist() == [1.0, 0.0, 0.0]  # [pairs, 1] too
