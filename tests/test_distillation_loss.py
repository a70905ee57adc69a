"""Knowledge-distillation loss against hand computations and torch.distributions."""
import math

import pytest
import torch
import torch.nn.functional as F

from minimind_scale.losses.distillation import distillation_loss, kd_loss_sum, weighted_cross_entropy_sum


def sample(seed=0, batch=2, seq=6, vocab=11):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, seq, vocab, generator=g)
    teacher = torch.randn(batch, seq, vocab, generator=g) * 2
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[:, :2] = -100  # the prompt
    labels[1, -1] = -100  # padding
    return student, teacher, labels


def test_identical_logits_give_zero_kl():
    student, _, labels = sample()
    assert kd_loss_sum(student, student.clone(), labels, temperature=1.5).item() == pytest.approx(0.0, abs=1e-6)


def test_all_labels_ignored_gives_zero_and_no_nan():
    student, teacher, labels = sample()
    labels[:] = -100
    student.requires_grad_()
    total, ce, kd = distillation_loss(student, teacher, labels, alpha=0.5, temperature=1.5)
    for v in (total, ce, kd):
        assert torch.isfinite(v) and v.item() == 0.0
    total.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().max() == 0


def test_kl_matches_torch_distributions_on_loss_bearing_tokens():
    student, teacher, labels = sample(seed=3)
    T = 1.5
    total = 0.0
    # Position t predicts the label at t+1; only those that are not -100 count.
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] == -100:
                continue
            p = torch.distributions.Categorical(logits=teacher[b, t] / T)
            q = torch.distributions.Categorical(logits=student[b, t] / T)
            total += torch.distributions.kl_divergence(p, q).item()
    assert kd_loss_sum(student, teacher, labels, T).item() == pytest.approx(T * T * total, rel=1e-5)


def test_combined_loss_is_alpha_ce_plus_rest_kd():
    student, teacher, labels = sample(seed=5)
    alpha, T = 0.3, 2.0
    total, ce, kd = distillation_loss(student, teacher, labels, alpha, T)
    target = F.pad(labels[:, 1:], (0, 1), value=-100)
    ce_ref = F.cross_entropy(student.reshape(-1, 11), target.reshape(-1), ignore_index=-100, reduction="sum")
    assert ce.item() == pytest.approx(ce_ref.item(), rel=1e-6)
    assert total.item() == pytest.approx(alpha * ce_ref.item() + (1 - alpha) * kd.item(), rel=1e-6)
    # alpha = 1 is plain SFT
    only_ce, _, _ = distillation_loss(student, teacher, labels, 1.0, T)
    assert only_ce.item() == pytest.approx(ce_ref.item(), rel=1e-6)


def test_token_weights_scale_the_ce_of_their_tokens():
    student, _, labels = sample(seed=7)
    weights = torch.ones(labels.shape)
    weights[0, 4] = 10.0  # the weight of the token at position 4, predicted from position 3
    base = weighted_cross_entropy_sum(student, labels)
    weighted = weighted_cross_entropy_sum(student, labels, weights)
    one = F.cross_entropy(student[0, 3:4], labels[0, 4:5]).item()
    assert weighted.item() == pytest.approx(base.item() + 9 * one, rel=1e-5)


def test_vocabulary_mismatch_is_refused():
    s, t, labels = sample()
    with pytest.raises(ValueError, match="vocabularies"):
        distillation_loss(s, t[..., :-1], labels, 0.5, 1.5)


def test_kd_is_finite_for_extreme_logits():
    student, teacher, labels = sample()
    teacher[..., 0] = 1e4
    student[..., 1] = -1e4
    assert math.isfinite(kd_loss_sum(student, teacher, labels, 1.0).item())
