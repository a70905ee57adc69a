"""Policy-gradient losses against values computed here with plain Python loops and math."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from minimind_scale.losses.policy import k3_kl, loss_units, reduce_policy_loss, scale_advantages, token_loss


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


# ------------------------------------------------------------------------------------------- k3 KL

def test_k3_is_zero_at_equality_and_matches_hand_values():
    x = t([[-0.3, -2.0, -7.25]])
    assert torch.equal(k3_kl(x, x), torch.zeros_like(x))
    logps = t([[-1.0, -1.0]])
    ref = t([[-1.5, -0.5]])
    # d = ref - π = -0.5 and +0.5:  e^d - d - 1
    expected = [math.exp(-0.5) + 0.5 - 1, math.exp(0.5) - 0.5 - 1]
    assert k3_kl(logps, ref).tolist()[0] == pytest.approx(expected, rel=1e-12)
    assert expected[0] == pytest.approx(0.1065306597, abs=1e-9)
    assert (k3_kl(logps, ref) > 0).all()


# ------------------------------------------------------------------------------ advantage scaling

REWARDS = [1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 0.0, 1.0, 0.0, 1.0]


def group_means(rewards, g):
    return [statistics.fmean(rewards[i:i + g]) for i in range(0, len(rewards), g)]


def test_group_scaling_uses_the_sample_std_and_zeroes_constant_groups():
    adv, std = scale_advantages(REWARDS, 4, "group")
    expected, stds = [], []
    for k in range(3):
        grp = REWARDS[4 * k:4 * k + 4]
        s = statistics.stdev(grp)  # n - 1
        stds.append(s)
        expected += [(r - statistics.fmean(grp)) / (s + 1e-4) for r in grp]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    assert std.tolist() == pytest.approx(stds, abs=1e-6)
    assert stds[0] == pytest.approx(math.sqrt(5 / 3))
    assert adv[4:8].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert std[1].item() == 0.0
    assert (std == 0).float().mean().item() == pytest.approx(1 / 3)


def test_batch_scaling_divides_by_the_std_of_the_whole_batch():
    adv, std = scale_advantages(REWARDS, 4, "batch")
    s = statistics.stdev(REWARDS)
    means = group_means(REWARDS, 4)
    expected = [(r - means[i // 4]) / (s + 1e-4) for i, r in enumerate(REWARDS)]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    # the std it reports stays per group
    assert std.tolist() == pytest.approx([statistics.stdev(REWARDS[i:i + 4]) for i in (0, 4, 8)], abs=1e-6)


def test_none_scaling_only_centres():
    adv, _ = scale_advantages(torch.tensor(REWARDS), 4, "none")
    means = group_means(REWARDS, 4)
    assert adv.tolist() == pytest.approx([r - means[i // 4] for i, r in enumerate(REWARDS)], abs=1e-6)


@pytest.mark.parametrize("mode", ["group", "batch", "none"])
def test_equal_rewards_give_exactly_zero_even_when_the_float_mean_is_inexact(mode):
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.3, 0.7, 0.2], dtype=torch.float64)
    # in float64 the mean of three 0.1s is not exactly 0.1, so r - mean and the std are not exactly 0
    assert (rewards[:3] - rewards[:3].mean()).abs().max() > 0
    adv, std = scale_advantages(rewards, 3, mode)
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    assert std[0].item() == 0.0
    assert adv[3:].abs().min().item() > 0


def test_scaling_refuses_ragged_groups_and_unknown_modes():
    with pytest.raises(ValueError, match="groups of 4"):
        scale_advantages([1.0, 2.0, 3.0], 4)
    with pytest.raises(ValueError, match="unknown advantage scaling"):
        scale_advantages([1.0, 2.0], 2, "rank")


# --------------------------------------------------------------------------- per-token objectives

def test_grpo_clip_matches_the_surrogate_and_its_clip_flags():
    eps, eps_high = 0.2, 0.28
    ratios = [[1.5, 0.5, 1.1, 1.25], [1.5, 0.5, 0.9, 1.3]]
    advs = [2.0, -1.0]
    old = t([[-1.0, -2.0, -0.5, -3.0], [-1.2, -0.7, -2.2, -0.1]])
    logps = (old + torch.log(t(ratios))).requires_grad_(True)
    out = token_loss("grpo", logps, old, t(advs), epsilon=eps, epsilon_high=eps_high)
    expected, low, high, grad = [], [], [], []
    for c in range(2):
        a = advs[c]
        for r in ratios[c]:
            clipped = min(max(r, 1 - eps), 1 + eps_high)
            expected.append(-min(r * a, clipped * a))
            low.append(r < 1 - eps and a < 0)
            high.append(r > 1 + eps_high and a > 0)
            # the min takes the clipped (constant) side exactly where the flag is set
            grad.append(0.0 if (low[-1] or high[-1]) else -a * r)
    assert out.loss.flatten().tolist() == pytest.approx(expected, rel=1e-9)
    assert out.clipped_low.flatten().tolist() == low
    assert out.clipped_high.flatten().tolist() == high
    assert high == [True, False, False, False, False, False, False, False]
    assert low == [False, False, False, False, False, True, False, False]
    out.loss.sum().backward()
    assert logps.grad.flatten().tolist() == pytest.approx(grad, rel=1e-9)
    mask = t([[1, 1, 1, 1], [1, 1, 0, 0]])
    # clipped tokens among the six completion tokens: (0,0) and (1,1), as the grpo stage logs clip_ratio
    assert ((out.clipped.double() * mask).sum() / mask.sum()).item() == pytest.approx(2 / 6)


def test_grpo_adds_beta_times_k3_kl():
    old = t([[-1.0, -2.0]])
    logps = t([[-0.9, -2.3]])
    ref = t([[-1.4, -1.8]])
    beta, a = 0.1, 0.5
    out = token_loss("grpo", logps, old, t([a]), epsilon=0.2, ref_logps=ref, beta=beta)
    expected = []
    for p, o, q in zip([-0.9, -2.3], [-1.0, -2.0], [-1.4, -1.8]):
        r = math.exp(p - o)
        d = q - p
        expected.append(-min(r * a, min(max(r, 0.8), 1.2) * a) + beta * (math.exp(d) - d - 1))
    assert out.loss.flatten().tolist() == pytest.approx(expected, rel=1e-9)
    assert out.kl is not None


def test_dapo_and_dr_grpo_share_the_grpo_token_term():
    old = t([[-1.0, -2.0, -0.3]])
    logps = t([[-0.5, -2.4, -0.3]])
    a = t([-0.7])
    ref = token_loss("grpo", logps, old, a, epsilon=0.2, epsilon_high=0.3).loss
    for kind in ("dapo", "dr_grpo"):
        assert torch.equal(token_loss(kind, logps, old, a, epsilon=0.2, epsilon_high=0.3).loss, ref)


def test_cispo_clamps_the_weight_and_the_gradient_flows_only_through_logp():
    eps_high, beta = 5.0, 0.04
    ratios = [6.0, 2.0, 0.1]
    old_v = [-3.0, -1.0, -0.2]
    ref_v = [-1.1, -0.5, -0.9]
    a = -1.5
    old = t([old_v])
    logps = (old + torch.log(t([ratios]))).detach().requires_grad_(True)
    out = token_loss("cispo", logps, old, t([a]), epsilon_high=eps_high, ref_logps=t([ref_v]), beta=beta)
    expected, grad = [], []
    for r, o, q in zip(ratios, old_v, ref_v):
        p = o + math.log(r)
        w = min(r, eps_high)
        d = q - p
        expected.append(-w * a * p + beta * (math.exp(d) - d - 1))
        # d/dπ of -w·A·π is -w·A (w is a constant); d/dπ of k3 is 1 - e^(ref - π)
        grad.append(-w * a + beta * (1 - math.exp(d)))
    assert out.loss.flatten().tolist() == pytest.approx(expected, rel=1e-9)
    out.loss.sum().backward()
    assert logps.grad.flatten().tolist() == pytest.approx(grad, rel=1e-9)
    # the clamped token still has a gradient (unlike PPO's clip), scaled by 5 instead of 6
    assert logps.grad[0, 0].item() == pytest.approx(-5.0 * a + beta * (1 - math.exp(ref_v[0] - old_v[0] - math.log(6))))
    assert out.clipped_high.flatten().tolist() == [True, False, False]
    assert not out.clipped_low.any()


def test_cispo_needs_its_cap_and_kl_needs_a_reference():
    x = t([[-1.0]])
    with pytest.raises(ValueError, match="epsilon_high"):
        token_loss("cispo", x, x, t([1.0]))
    with pytest.raises(ValueError, match="ref_logps"):
        token_loss("grpo", x, x, t([1.0]), beta=0.1)
    with pytest.raises(ValueError, match="unknown policy loss_type"):
        token_loss("ppo", x, x, t([1.0]))


def test_single_iteration_ratio_is_one_loss_near_zero_gradient_not():
    adv, _ = scale_advantages([1.0, 0.0, 0.5, 0.25], 4)
    logps = t([[-1.0, -2.0], [-0.5, -0.1], [-3.0, -1.0], [-0.2, -0.4]]).requires_grad_(True)
    mask = t([[1, 1], [1, 0], [1, 1], [1, 1]])
    out = token_loss("grpo", logps, None, adv.double())
    assert not out.clipped.any()
    s = reduce_policy_loss(out.loss, mask, "grpo", max_gen_len=2)
    n = loss_units("grpo", mask)
    loss = s / n
    assert abs(loss.item()) < 1e-6
    loss.backward()
    lengths = [2, 1, 2, 2]
    a = adv.tolist()
    expected = [[-a[c] / lengths[c] / n * m for m in row] for c, row in enumerate(mask.tolist())]
    assert logps.grad.tolist() == [pytest.approx(row, abs=1e-12) for row in expected]
    assert logps.grad.abs().sum().item() > 0.1


# ------------------------------------------------------------------------------------- reductions

# Three completions of 3, 1 and 2 tokens; the 9s sit after the end of turn and must not count.
PER_TOKEN = [[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [5.0, 6.0, 9.0, 9.0]]
MASK = [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]]
MAX_GEN = 8  # longer than the tensors are wide: dr_grpo divides by the limit, not the padding


def definition(kind, rows, masks):
    """Each loss type's step loss written out directly (what the sum/units pair must reproduce)."""
    seq = [[v for v, m in zip(r, mk) if m] for r, mk in zip(rows, masks)]
    if kind in ("grpo", "cispo"):
        return sum(sum(s) / len(s) for s in seq) / len(seq)
    if kind == "dapo":
        return sum(sum(s) for s in seq) / sum(len(s) for s in seq)
    return sum(sum(s) for s in seq) / (len(seq) * MAX_GEN)


@pytest.mark.parametrize("kind, total, units, value", [
    ("grpo", 2 + 4 + 5.5, 3, 11.5 / 3),
    ("cispo", 2 + 4 + 5.5, 3, 11.5 / 3),
    ("dapo", 21.0, 6, 3.5),
    ("dr_grpo", 21 / 8, 3, 0.875),
])
def test_each_normalisation_on_ragged_completions(kind, total, units, value):
    s = reduce_policy_loss(t(PER_TOKEN), torch.tensor(MASK), kind, max_gen_len=MAX_GEN)
    assert s.item() == pytest.approx(total)
    assert loss_units(kind, torch.tensor(MASK)) == units
    assert s.item() / units == pytest.approx(value)
    assert value == pytest.approx(definition(kind, PER_TOKEN, MASK))


def test_the_three_normalisations_really_differ_here():
    values = {k: definition(k, PER_TOKEN, MASK) for k in ("grpo", "dapo", "dr_grpo")}
    assert len({round(v, 9) for v in values.values()}) == 3


@pytest.mark.parametrize("kind", ["grpo", "dapo", "dr_grpo", "cispo"])
def test_sums_and_units_reproduce_the_definition_however_the_step_is_split(kind):
    rows = PER_TOKEN + [[0.5, 1.5, 2.5, 3.5], [7.0, 9.0, 9.0, 9.0]]
    masks = MASK + [[1, 1, 1, 1], [1, 0, 0, 0]]
    for cuts in ([(0, 5)], [(0, 1), (1, 5)], [(0, 2), (2, 3), (3, 5)]):
        total = sum(reduce_policy_loss(t(rows[a:b]), torch.tensor(masks[a:b]), kind, MAX_GEN).item() for a, b in cuts)
        units = sum(loss_units(kind, torch.tensor(masks[a:b])) for a, b in cuts)
        assert total / units == pytest.approx(definition(kind, rows, masks), rel=1e-12)


def test_dapo_split_over_micro_batches_gives_the_step_token_mean():
    cuts = ((0, 1), (1, 3))
    parts = [reduce_policy_loss(t(PER_TOKEN[a:b]), torch.tensor(MASK[a:b]), "dapo", MAX_GEN) for a, b in cuts]
    step_tokens = sum(loss_units("dapo", torch.tensor(MASK[a:b])) for a, b in cuts)
    assert step_tokens == 6
    assert sum(p.item() for p in parts) / step_tokens == pytest.approx(3.5)


def test_a_completion_without_tokens_counts_as_a_unit_with_zero_loss():
    rows = [[1.0, 3.0], [8.0, 8.0]]
    masks = torch.tensor([[1, 1], [0, 0]])
    s = reduce_policy_loss(t(rows), masks, "grpo", max_gen_len=2)
    assert s.item() == pytest.approx(2.0)
    assert loss_units("grpo", masks) == 2
    assert loss_units("dapo", masks) == 2


def test_reduction_refuses_mismatched_shapes_and_unknown_types():
    with pytest.raises(ValueError, match="mask has shape"):
        reduce_policy_loss(t(PER_TOKEN), torch.tensor(MASK)[:, :2], "grpo", MAX_GEN)
    with pytest.raises(ValueError, match="unknown policy loss_type"):
        reduce_policy_loss(t(PER_TOKEN), torch.tensor(MASK), "bnpo", MAX_GEN)
    with pytest.raises(ValueError, match="unknown policy loss_type"):
        loss_units("bnpo", torch.tensor(MASK))
