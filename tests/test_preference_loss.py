"""DPO / IPO / hinge losses against fixed values and formulas computed independently here."""
import math

import pytest
import torch

from minimind_scale.losses.preference import dpo_loss, sequence_logprobs

# The issue's example: three pairs of (policy, reference) sequence log-probabilities.
PC = torch.tensor([-0.5, -10.0, -1.0])
PR = torch.tensor([-0.1, -30.0, -21.0])
RC = torch.tensor([-0.5, -10.1, -0.1])
RR = torch.tensor([-0.1, -20.1, -0.1])


def margins():
    return [(pc - pr) - (rc - rr) for pc, pr, rc, rr in zip(PC.tolist(), PR.tolist(), RC.tolist(), RR.tolist())]


def test_sigmoid_matches_the_issue_values():
    losses, rc, rr = dpo_loss(PC, PR, RC, RR, beta=0.1)
    assert losses.tolist() == pytest.approx([0.69315, 0.31326, 0.12693], abs=1e-5)
    assert rc.tolist() == pytest.approx([0.0, 0.01, -0.09], abs=1e-6)
    assert rr.tolist() == pytest.approx([0.0, -0.99, -2.09], abs=1e-6)


def test_equal_policy_and_reference_gives_ln2():
    x = torch.tensor([-3.0, -7.5])
    y = torch.tensor([-4.0, -1.25])
    for beta in (0.1, 0.15, 1.0):
        losses, rc, rr = dpo_loss(x, y, x, y, beta=beta)
        assert losses.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-7)
        assert rc.abs().max() == 0 and rr.abs().max() == 0


def test_ipo_and_hinge_match_their_formulas():
    beta = 0.1
    ipo, _, _ = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="ipo")
    hinge, _, _ = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="hinge")
    assert ipo.tolist() == pytest.approx([(h - 1 / (2 * beta)) ** 2 for h in margins()], rel=1e-6)
    assert hinge.tolist() == pytest.approx([max(0.0, 1 - beta * h) for h in margins()], abs=1e-6)
    # hand values: h = 0, 10, 20 -> IPO (h - 5)^2 = 25, 25, 225; hinge 1, 0, 0
    assert ipo.tolist() == pytest.approx([25.0, 25.0, 225.0], rel=1e-5)
    assert hinge.tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-5)


def test_label_smoothing_is_conservative_dpo():
    beta, eps = 0.1, 0.2
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=beta, label_smoothing=eps)

    def log_sigmoid(z):
        return -math.log1p(math.exp(-z))

    expected = [-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h) for h in margins()]
    assert losses.tolist() == pytest.approx(expected, rel=1e-5)


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="kto")


def test_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    losses, _, _ = dpo_loss(pc, pr, RC, RR, beta=0.1)
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_sequence_logprobs_sums_the_assistant_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    labels = ids.clone()
    labels[0, :3] = -100  # prompt of row 0
    labels[1, :] = -100
    labels[1, 2] = ids[1, 2]
    logp = torch.log_softmax(logits, -1)
    # Token t is predicted at position t-1.
    expected0 = sum(logp[0, t - 1, ids[0, t]].item() for t in (3, 4))
    expected1 = logp[1, 1, ids[1, 2]].item()
    assert sequence_logprobs(logits, labels).tolist() == pytest.approx([expected0, expected1], abs=1e-6)
