"""The PPO math against hand computations: GAE, whitening, KL estimators and controllers, the clipped losses."""

import math

import pytest
import torch

from rlhfkit.online import core
from rlhfkit.rollout import truncate_after_stop


def test_gae_matches_a_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    advantages, returns = core.gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    # t=2: delta = 1 - 0.7 = 0.3;  t=1: delta = 0.7 - 0.6 = 0.1, A = 0.1 + 0.5 * 0.3;  t=0: 0.1 + 0.5 * 0.25
    torch.testing.assert_close(advantages, torch.tensor([[0.225, 0.25, 0.3]]))
    torch.testing.assert_close(returns, torch.tensor([[0.725, 0.85, 1.0]]))


def test_gae_ignores_everything_after_the_last_real_token():
    rewards = torch.tensor([[0.0, 2.0, 5.0]])
    values = torch.tensor([[1.0, 1.0, 9.0]])  # the third position is padding: its reward and value must not leak
    advantages, returns = core.gae(rewards, values, torch.tensor([[1.0, 1.0, 0.0]]), gamma=0.9, lam=1.0)
    # t=1: delta = 2 + 0.9 * 0 - 1 = 1;  t=0: delta = 0 + 0.9 * 1 - 1 = -0.1, A = -0.1 + 0.9 * 1
    torch.testing.assert_close(advantages, torch.tensor([[0.8, 1.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.8, 2.0, 0.0]]))


def test_gae_with_lambda_one_and_no_values_is_the_discounted_return():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    advantages, _ = core.gae(rewards, torch.zeros(1, 3), torch.ones(1, 3), gamma=0.5, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0]]))


def test_masked_whitening_uses_only_real_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # mean 2, unbiased variance 1 over the three real tokens
    torch.testing.assert_close(core.masked_whiten(x, mask, eps=0.0), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(core.masked_whiten(x, mask, shift_mean=False, eps=0.0), torch.tensor([[1.0, 2.0, 3.0, 0.0]]))


def test_masked_statistics_reduce_over_processes():
    """`reduce` sums partial statistics; two halves reduced together equal the whole."""
    x, mask = torch.tensor([[1.0, 2.0], [3.0, 7.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    halves = [(x[:1], mask[:1]), (x[1:], mask[1:])]
    # Simulate two processes: each sees its half, `reduce` adds the other half's partial sums.
    for i, (xi, mi) in enumerate(halves):
        other_x, other_m = halves[1 - i]
        calls = iter([torch.stack([core.masked_sum(other_x, other_m), other_m.sum()])])
        mean = core.masked_mean(xi, mi, reduce=lambda t: t + next(calls))
        assert mean.item() == pytest.approx(2.0)


def test_kl_estimators_on_a_token():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert core.kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert core.kl_estimate(logp, ref, "k3").item() == pytest.approx((0.5 - 1) + math.log(2))
    with pytest.raises(ValueError, match="k1"):
        core.kl_estimate(logp, ref, "k2x")


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_estimators_are_unbiased(estimator):
    """E_{a~pi}[k(a)] equals the exact KL(pi || pi_ref) for both estimators (enumerating every token)."""
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(50), -1)
    ref = torch.log_softmax(torch.randn(50), -1)
    exact = (logp.exp() * (logp - ref)).sum()
    expectation = (logp.exp() * core.kl_estimate(logp, ref, estimator)).sum()
    torch.testing.assert_close(expectation, exact)
    if estimator == "k3":
        assert (core.kl_estimate(logp, ref, "k3") >= 0).all()


def test_adaptive_kl_controller_follows_ziegler_et_al():
    ctl = core.AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=12.0, n_steps=256)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    ctl.update(current_kl=5.4, n_steps=256)  # error -0.1
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000) * (1 - 0.1 * 256 / 10_000))
    fixed = core.FixedKLController(0.1)
    fixed.update(100.0, 256)
    assert fixed.value == 0.1
    restored = core.AdaptiveKLController(0.5, 6.0, 10_000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_score_lands_on_the_last_real_token_and_kl_on_every_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards = core.per_token_rewards(torch.tensor([1.0, 2.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1, -0.15 + 1.0], [-0.2 + 2.0, 0.0, 0.0]]))


def test_clipped_policy_loss_takes_the_pessimistic_term():
    old = torch.zeros(1, 4)
    logprobs = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]]))
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    out = core.clipped_policy_loss(logprobs, old, advantages, torch.ones(1, 4), clip_range=0.2)
    # ratio 1.5, A=+1: -min(1.5, 1.2) = -1.2 (clipped); A=-1: -min(-1.5, -1.2) = 1.5 (unclipped)
    # ratio 0.5, A=+1: -min(0.5, 0.8) = -0.5 (unclipped); A=-1: -min(-0.5, -0.8) = 0.8 (clipped)
    assert out.loss_sum.item() == pytest.approx(-1.2 + 1.5 - 0.5 + 0.8)
    torch.testing.assert_close(out.clipped, torch.tensor([[1.0, 0.0, 0.0, 1.0]]))


def test_clipped_policy_loss_gradient_vanishes_where_clipped():
    logprobs = torch.log(torch.tensor([[1.5, 1.5]])).requires_grad_()
    out = core.clipped_policy_loss(logprobs, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), 0.2)
    out.loss_sum.backward()
    # d/dlogp of -A * ratio = -A * ratio; the clipped term is constant in logp
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 1.5]]))


def test_clipped_value_loss():
    values = torch.tensor([[1.0, 0.0, 0.9]])
    old = torch.tensor([[0.5, 0.5, 0.5]])
    returns = torch.tensor([[0.0, 1.0, 1.0]])
    per_token, clipped = core.clipped_value_loss(values, old, returns, torch.ones(1, 3), clip_range=0.2)
    # 1st: max((1-0)^2, (0.7-0)^2) = 1;  2nd: max(1, (0.3-1)^2) = 1;  3rd: max(0.01, (0.7-1)^2) = 0.09
    assert per_token.sum().item() == pytest.approx(0.5 * (1 + 1 + 0.09))
    torch.testing.assert_close(clipped, torch.tensor([[0.0, 0.0, 1.0]]))


def test_masked_positions_do_not_count_in_the_losses():
    mask = torch.tensor([[1.0, 0.0]])
    pg = core.clipped_policy_loss(torch.tensor([[0.1, 5.0]]), torch.zeros(1, 2), torch.tensor([[1.0, 100.0]]), mask, 0.2)
    assert pg.loss_sum.item() == pytest.approx(-math.exp(0.1))
    vf, _ = core.clipped_value_loss(torch.tensor([[1.0, 50.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), mask, 100.0)
    assert vf.sum().item() == pytest.approx(0.5)


def test_running_moments_match_the_whole_sample():
    torch.manual_seed(0)
    x = torch.randn(100) * 3 + 2
    moments = core.RunningMoments()
    for chunk in x.split(7):
        moments.update(chunk)
    assert moments.mean == pytest.approx(x.mean().item(), rel=1e-5)
    assert moments.std == pytest.approx(x.std(unbiased=False).item(), rel=1e-5)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert core.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert core.explained_variance(torch.full((1, 4), 2.5), returns, mask) == pytest.approx(0.0)


def test_responses_are_cut_after_the_first_stop_token():
    tokens = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    cut, mask, ended = truncate_after_stop(tokens, stop_ids=[2], pad_id=0)
    assert cut.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


# --- critic-free advantages ---------------------------------------------------------------------------------------


def test_rloo_advantages_subtract_the_mean_of_the_other_samples():
    rewards = torch.tensor([1.0, 2.0, 6.0, 3.0, 3.0])  # prompt 0: three samples; prompt 1: two, equal
    group = torch.tensor([0, 0, 0, 1, 1])
    expected = [1 - (2 + 6) / 2, 2 - (1 + 6) / 2, 6 - (1 + 2) / 2, 0.0, 0.0]
    assert core.rloo_advantages(rewards, group).tolist() == pytest.approx(expected)


def test_grpo_advantages_normalise_within_each_prompts_samples():
    rewards = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    mean, std = 3.0, math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2)  # Bessel: / (K - 1)
    grpo = core.group_advantages(rewards, group, eps=1e-4)
    assert grpo[:3].tolist() == pytest.approx([(r - mean) / (std + 1e-4) for r in (1, 2, 6)])
    assert grpo[3:].tolist() == [0.0, 0.0, 0.0]  # all equal: nothing to learn, and no division by zero
    assert core.group_advantages(rewards, group, scale=False).tolist() == pytest.approx([-2, -1, 3, 0, 0, 0])


def test_loss_aggregations_weigh_tokens_as_defined():
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])  # responses of 4 and 1 tokens
    token = core.token_weights(mask, "token_mean")
    assert token.sum().item() == pytest.approx(1.0) and token[0, 0].item() == pytest.approx(1 / 5)
    sequence = core.token_weights(mask, "sequence_mean")
    assert sequence[0].tolist() == pytest.approx([1 / 8] * 4) and sequence[1].tolist() == pytest.approx([1 / 2, 0, 0, 0])
    constant = core.token_weights(mask, "constant", max_tokens=10)
    assert constant[0, 0].item() == pytest.approx(1 / 20) and constant[1, 1].item() == 0.0
