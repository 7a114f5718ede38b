"""The online trainer's math beside its losses (rlhfkit.losses): masked statistics, KL estimators and controllers,
GAE and the critic-free advantages.

Shapes: `[B, T]` tensors over response tokens, with `mask` 1 on real tokens (up to and including the stop
token) and 0 after. Symbols follow the papers:

- Schulman et al. 2017 (PPO): ratio r_t = pi(a_t|s_t) / pi_old(a_t|s_t); L^CLIP = E[min(r_t A_t, clip(r_t) A_t)].
- Schulman et al. 2016 (GAE): delta_t = r_t + gamma V(s_{t+1}) - V(s_t); A_t = sum_l (gamma lambda)^l delta_{t+l}.
- Ziegler et al. 2019: per-token reward -beta * KL_t, plus the score on the last token; adaptive beta.
- Schulman 2020, "Approximating KL divergence": estimators k1 = -log rho and k3 = (rho - 1) - log rho, with
  rho = pi_ref / pi evaluated at tokens sampled from pi (k3: never negative, lower variance). k3 is unbiased
  because E_pi[rho] = 1, which holds only where pi's support is the whole vocabulary: with top-p/top-k, pi is the
  truncated distribution, E_pi[rho] = pi_ref(S) for its kept set S, and k3 falls short of the KL by 1 - pi_ref(S);
  here that mass is added back, k3 = (rho - pi_ref(S)) - log rho (still >= 0, unbiased again).
- Ahmadian et al. 2024 (RLOO): K samples per prompt; A_i = R_i - 1/(K-1) sum_{j != i} R_j, the prompt's other
  samples as the baseline, with R_i = score_i - beta * KL_i for the whole response.
- Shao et al. 2024 (GRPO): A_i = (r_i - mean(r)) / (std(r) + eps) over the prompt's K samples, and
  beta * k3(pi || pi_ref) per token as a loss term; Liu et al. 2025 (Dr. GRPO): no division by std(r), and each
  response's token losses summed and divided by a constant (max_new_tokens) instead of its own length.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# the clipped losses are with every trainer's loss in rlhfkit.losses; core.clipped_*_loss still name them
from rlhfkit.losses import PolicyLoss, clipped_policy_loss, clipped_value_loss, k3  # noqa: F401

# --- masked statistics ----------------------------------------------------------------------------------------

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over processes (identity in one process)


def _no_reduce(x: torch.Tensor) -> torch.Tensor:
    return x


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce = _no_reduce) -> torch.Tensor:
    """Mean of `x` over positions where mask is 1 (over all processes when `reduce` sums across them)."""
    totals = reduce(torch.stack([masked_sum(x, mask), mask.sum().to(x.dtype)]))
    return totals[0] / totals[1].clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce = _no_reduce, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask, reduce)
    totals = reduce(torch.stack([masked_sum((x - mean) ** 2, mask), mask.sum().to(x.dtype)]))
    n = totals[1]
    correction = n / (n - 1) if unbiased and n > 1 else 1.0
    return totals[0] / n.clamp(min=1) * correction


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce = _no_reduce, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions; masked-out positions are set to 0.

    With `shift_mean=False` the mean is added back (used for rewards, whose sign carries meaning).
    """
    mean, var = masked_mean(x, mask, reduce), masked_var(x, mask, reduce)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# --- KL to the reference model --------------------------------------------------------------------------------


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str,
                ref_dropped: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) at tokens sampled from pi.

    log rho = log pi_ref - log pi.  k1 = -log rho (unbiased, can be negative per token);
    k3 = (rho - pi_ref(S)) - log rho = (rho - 1) - log rho + (1 - pi_ref(S)) (unbiased, >= 0, lower variance), with
    `ref_dropped` = 1 - pi_ref(S), the reference's mass outside the support S that pi samples from (0 untruncated;
    rlhfkit.rollout.dropped_mass).
    """
    log_rho = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_rho
    if estimator == "k3":
        return k3(log_rho, ref_dropped)
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1' or 'k3'")


class FixedKLController:
    """beta stays what it was set to."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController:
    """Ziegler et al. 2019: beta <- beta * (1 + K_beta * e_t * n / horizon), e_t = clip(KL / target - 1, -0.2, 0.2).

    Pushes the KL per sequence towards `target`: beta grows while the policy drifts further, shrinks otherwise.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


# --- rewards, advantages ----------------------------------------------------------------------------------------


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = -beta * KL_t on every response token, plus the sequence's score on its last real token."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns (A_t + V_t). Beyond the last real token V = 0 and r = 0.

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lambda * A_{t+1}, computed backwards.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


# --- critic-free advantages: K samples per prompt --------------------------------------------------------------


def _group_sums(x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    return torch.zeros(int(group.max()) + 1, dtype=x.dtype, device=x.device).index_add(0, group, x)


def rloo_advantages(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """A_i = R_i - 1/(K-1) sum_{j != i} R_j over the samples j of i's prompt (`group` [B] numbers the prompts)."""
    counts = torch.bincount(group).to(rewards.dtype)
    return rewards - (_group_sums(rewards, group)[group] - rewards) / (counts[group] - 1)


def group_advantages(rewards: torch.Tensor, group: torch.Tensor, scale: bool = True, eps: float = 1e-4
                     ) -> torch.Tensor:
    """A_i = (r_i - mean(r)) / (std(r) + eps) over the samples of i's prompt (std with Bessel's correction); with
    `scale` False (Dr. GRPO), r_i - mean(r). A prompt whose samples all score the same gives them A = 0."""
    counts = torch.bincount(group).to(rewards.dtype)
    centered = rewards - (_group_sums(rewards, group) / counts)[group]
    if not scale:
        return centered
    std = (_group_sums(centered**2, group) / (counts - 1)).sqrt()
    return centered / (std[group] + eps)


def token_weights(mask: torch.Tensor, aggregation: str, reduce: Reduce = _no_reduce, max_tokens: int = 1
                  ) -> torch.Tensor:
    """w_t such that a minibatch's loss is sum_t w_t * l_t over the tokens of every process:

    token_mean: 1 / N_tokens; sequence_mean: 1 / (|o_i| * N_responses); constant: 1 / (max_tokens * N_responses).
    """
    if aggregation == "token_mean":
        return mask / reduce(mask.sum()).clamp(min=1)
    responses = reduce(mask.new_tensor(float(len(mask))))
    if aggregation == "sequence_mean":
        return mask / mask.sum(-1, keepdim=True).clamp(min=1) / responses
    if aggregation == "constant":
        return mask / (max_tokens * responses)
    raise ValueError(f"unknown loss aggregation {aggregation!r}")


class RunningMoments:
    """Running mean and std of scores over all batches seen (Chan et al.'s parallel update), for normalisation."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: torch.Tensor) -> None:
        n = x.numel()
        if n == 0:
            return
        batch_mean, batch_var = x.float().mean().item(), x.float().var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(self.var) if self.var > 0 else 1.0

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


# --- the losses' statistics (the losses themselves: rlhfkit.losses) -------------------------------------------


def approx_kl(log_ratio: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(pi_old || pi) per token from log(pi / pi_old) at tokens sampled from pi_old."""
    return k3(log_ratio)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, reduce: Reduce = _no_reduce
                       ) -> float:
    """1 - Var[R - V] / Var[R]: 1 is a perfect critic, 0 no better than a constant, negative worse."""
    var_returns = masked_var(returns, mask, reduce).item()
    if var_returns == 0:
        return float("nan")
    return 1 - masked_var(returns - values, mask, reduce).item() / var_returns
