"""PPO's formulas against values worked out by hand: GAE, whitening over processes, both value clips, the
policy clip, and where the KL to the reference enters (k3 in the loss, k1 in the reward)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from minimind_scale.losses.policy import k3_kl
from minimind_scale.losses.ppo import gae, policy_terms, token_rewards, value_terms, whiten


def assert_close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=1e-6, rtol=1e-5)


MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_token_rewards_put_the_score_on_the_last_token_and_k1_on_every_token():
    plain = token_rewards(torch.tensor([1.0, 2.0]), MASK)
    assert plain.tolist() == [[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]]
    old = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -2.0, -7.0]])
    with_kl = token_rewards(torch.tensor([1.0, 2.0]), MASK, 0.1, old, ref)
    # k1 = old − ref = [0.5, 0, −1] and [0, 1, (masked)]; the reward is −0.1·k1 plus the score.
    assert_close(with_kl, [[-0.05, 0.0, 1.1], [0.0, 1.9, 0.0]])


def test_gae_matches_the_recursion_worked_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4], [0.1, 0.3, 9.0]])  # 9.0 lies past the second row's end
    adv, ret = gae(rewards, values, MASK, gamma=1.0, lam=0.95)
    # Row 0: δ2 = 1 − 0.4 = 0.6; δ1 = 0.4 − 0.2 = 0.2, A1 = 0.2 + 0.95·0.6 = 0.77;
    #        δ0 = 0.2 − 0.5, A0 = −0.3 + 0.95·0.77.
    # Row 1 ends at t=1 (its next value is 0): A1 = 2 − 0.3 = 1.7; A0 = (0.3 − 0.1) + 0.95·1.7 = 1.815.
    assert_close(adv, [[0.4315, 0.77, 0.6], [1.815, 1.7, 0.0]])
    assert_close(ret, [[0.9315, 0.97, 1.0], [1.915, 2.0, 0.0]])
    discounted, _ = gae(rewards[:1], values[:1], MASK[:1], gamma=0.9, lam=0.5)
    # δ2 = 0.6, A2 = 0.6; δ1 = 0.9·0.4 − 0.2 = 0.16, A1 = 0.16 + 0.45·0.6 = 0.43;
    # δ0 = 0.9·0.2 − 0.5, A0 = −0.32 + 0.45·0.43.
    assert_close(discounted, [[-0.1265, 0.43, 0.6]])


def test_whitening_uses_the_mean_and_variance_of_every_process():
    """This process holds [1, 2] (and a masked 50); the other [3, 4]: the batch's mean is 2.5 and its
    population variance 1.25, so this process's values become (x − 2.5)/√1.25."""
    other = iter([[7.0, 2.0], [2.5]])  # the other process's Σx, count; then Σ(x − 2.5)² = 0.25 + 2.25

    def reduce_sum(xs):
        return [a + b for a, b in zip(xs, next(other))]

    out = whiten(torch.tensor([[1.0, 2.0, 50.0]]), torch.tensor([[1, 1, 0]]), reduce_sum)
    assert_close(out, [[-1.5 / math.sqrt(1.25), -0.5 / math.sqrt(1.25), 0.0]])
    alone = whiten(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.ones(1, 4))
    assert alone.mean().item() == pytest.approx(0.0, abs=1e-6) and alone.pow(2).mean().item() == pytest.approx(1.0)


def test_value_loss_clips_moves_beyond_the_range_in_both_directions():
    old = torch.zeros(4)
    values = torch.tensor([0.5, -0.5, -0.5, 0.1])
    returns = torch.tensor([1.0, 1.0, -1.0, 1.0])
    loss, clipped = value_terms(values, old, returns, cliprange_value=0.2)
    # 0.5 is clipped to 0.2: max((0.5−1)², (0.2−1)²) = 0.64 (clipped); −0.5 → −0.2: max(2.25, 1.44) = 2.25 (not);
    # with return −1, −0.5 → −0.2: max(0.25, 0.64) = 0.64 (clipped); 0.1 lies inside: 0.81 either way.
    assert loss.tolist() == pytest.approx([0.5 * 0.64, 0.5 * 2.25, 0.5 * 0.64, 0.5 * 0.81])
    assert clipped.tolist() == [True, False, True, False]


def test_policy_clip_takes_the_pessimistic_branch():
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5])
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    terms = policy_terms(ratio.log(), torch.zeros(4), advantages, cliprange=0.2)
    assert terms.loss.tolist() == pytest.approx([-1.2, 1.5, -0.5, 0.8])
    assert terms.clipped.tolist() == [True, False, False, True]
    assert terms.approx_kl.tolist() == pytest.approx([0.5 * math.log(1.5) ** 2] * 2 + [0.5 * math.log(0.5) ** 2] * 2)


def tiny_policy_and_critic():
    from minimind_scale.models.build import load_tokenizer
    from minimind_scale.stages.ppo import PPOConfig, build_policy_and_critic

    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    cfg = PPOConfig(model="tiny", reward_funcs=["accuracy"], data_path=["unused.jsonl"])
    return build_policy_and_critic(cfg, tokenizer), cfg


def test_kl_enters_the_loss_as_k3_or_not_at_all_when_it_is_in_the_reward():
    from minimind_scale.rl.sampling import completion_logprobs
    from minimind_scale.stages.ppo import loss

    model, cfg = tiny_policy_and_critic()
    torch.manual_seed(1)
    ids = torch.randint(10, 400, (2, 9))
    mask = torch.ones_like(ids)
    completion_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": mask, "completion_mask": completion_mask, "prompt_len": 5,
             "ppo_epoch": 0, "advantages": torch.randn(2, 4), "returns": torch.randn(2, 4),
             "old_values": torch.randn(2, 4) * 0.1, "ref_logps": torch.randn(2, 4) - 6.0}
    with torch.no_grad():
        logps = completion_logprobs(model.actor, ids, mask, 5, cfg.temperature)
    batch["old_logps"] = logps
    k3 = (k3_kl(logps, batch["ref_logps"]) * completion_mask).sum()

    def loss_with(**changes):
        return loss(model, batch, cfg.model_copy(update=changes), SimpleNamespace()).loss_sum.item()

    without = loss_with(kl_coef=0.0)
    assert loss_with(kl_coef=0.1) - without == pytest.approx(0.1 * k3.item(), rel=1e-4)
    assert loss_with(kl_coef=0.1, kl_in_reward=True) == pytest.approx(without, rel=1e-6)
