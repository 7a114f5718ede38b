"""Every trainer's loss, each a short function that reads like its equation (the advantage estimators and KL
controllers they feed on are in rlhfkit.online.core). The trainers do the forwards, weigh and sum; these are the math.

- SFT: cross-entropy of the response tokens, -sum_t log pi(y_t | x, y_<t).
- Reward model (Bradley-Terry, as InstructGPT): P(y_w > y_l) = sigma(r_w - r_l); loss -log sigma(r_w - r_l - m), or
  with a soft label q (a vote share) -q log sigma(d) - (1 - q) log sigma(-d); a tie -1/2 [log sigma(d) + log sigma(-d)].
- DPO (Rafailov et al. 2023), cDPO (Mitchell 2023) and IPO (Azar et al. 2023), over
  h = [log pi_theta(y_w|x) - log pi_ref(y_w|x)] - [log pi_theta(y_l|x) - log pi_ref(y_l|x)]
  (see rlhfkit.dpo for what each means).
- PPO (Schulman et al. 2017): ratio r_t = pi(a_t|s_t) / pi_old(a_t|s_t); L^CLIP = -E[min(r_t A_t, clip(r_t) A_t)];
  the clipped value loss 0.5 max((V - R)^2, (V_clip - R)^2).
- k3 (Schulman 2020, "Approximating KL divergence"): (rho - 1) - log rho at tokens sampled from pi, rho = q / pi;
  GRPO's per-token KL term to the reference, with the reference's mass outside a truncated support added back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhfkit.data.chat import IGNORE_INDEX

# --- supervised fine-tuning -------------------------------------------------------------------------------------


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-sum_t log pi(y_t | y_<t) over the labelled tokens (labels IGNORE_INDEX elsewhere), and how many there are.

    `logits` [B, T, V] predict the next token: position t's logits are scored against labels[t + 1]."""
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, (targets != IGNORE_INDEX).sum()


# --- reward model -----------------------------------------------------------------------------------------------


def bradley_terry_loss(d: torch.Tensor, q: torch.Tensor, ties: torch.Tensor | None = None) -> torch.Tensor:
    """Summed -q log sigma(d) - (1 - q) log sigma(-d) over pairs with d = r_w - r_l - margin and q = P(y_w preferred)
    (1 for a hard label), plus -1/2 [log sigma(t) + log sigma(-t)] over ties with t = r_a - r_b."""
    loss = -(q * F.logsigmoid(d) + (1 - q) * F.logsigmoid(-d)).sum()
    if ties is not None and ties.numel():
        loss = loss - 0.5 * (F.logsigmoid(ties) + F.logsigmoid(-ties)).sum()
    return loss


# --- direct preference optimisation -----------------------------------------------------------------------------


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                    reference_rejected: torch.Tensor, beta: float, loss: str = "sigmoid",
                    label_smoothing: float = 0.0, target: torch.Tensor | None = None,
                    lengths: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO / cDPO / IPO per-pair losses, and the implicit rewards beta [log pi_theta(y|x) - log pi_ref(y|x)] of y_w
    and y_l.

    Arguments are [N] sequence log-probs: log pi_theta(y_w|x), log pi_theta(y_l|x), log pi_ref(y_w|x),
    log pi_ref(y_l|x). `target`: q = P(y_w preferred) per pair, 1 where None. `lengths`: (|y_w|, |y_l|) in tokens,
    for IPO's per-token log-ratios; None: summed.
    """
    chosen_logratio = policy_chosen - reference_chosen  # log pi_theta(y_w|x) - log pi_ref(y_w|x)
    rejected_logratio = policy_rejected - reference_rejected  # log pi_theta(y_l|x) - log pi_ref(y_l|x)
    h = chosen_logratio - rejected_logratio
    q = torch.ones_like(h) if target is None else target.to(h.dtype)
    q = (1 - label_smoothing) * q + label_smoothing * (1 - q)  # cDPO: the label is flipped with probability eps
    if loss == "sigmoid":  # -q log sigma(beta h) - (1 - q) log sigma(-beta h)
        losses = -q * F.logsigmoid(beta * h) - (1 - q) * F.logsigmoid(-beta * h)
    elif loss == "ipo":  # q (h - 1/(2 beta))^2 + (1 - q) (h + 1/(2 beta))^2
        if lengths is not None:  # h = log-ratio(y_w) / |y_w| - log-ratio(y_l) / |y_l|
            h = chosen_logratio / lengths[0].clamp(min=1) - rejected_logratio / lengths[1].clamp(min=1)
        margin = 1 / (2 * beta)
        losses = q * (h - margin) ** 2 + (1 - q) * (h + margin) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r}; use 'sigmoid' or 'ipo'")
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


# --- online policy optimisation ---------------------------------------------------------------------------------


@dataclass
class PolicyLoss:
    per_token: torch.Tensor  # [B, T] -min(r_t A_t, clip(r_t) A_t), 0 where masked (the caller weighs and sums)
    clipped: torch.Tensor  # per token: 1 where the clipped term was the one taken
    log_ratio: torch.Tensor

    @property
    def loss_sum(self) -> torch.Tensor:
        return self.per_token.sum()


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip_range: float) -> PolicyLoss:
    """-min(r_t A_t, clip(r_t, 1-eps, 1+eps) A_t), i.e. the max of the two negated terms, per token."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return PolicyLoss(torch.maximum(unclipped, clipped) * mask, (clipped > unclipped).float(), log_ratio)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, -eps, eps), per token; and which clipped."""
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped_loss, clipped_loss) * mask, (clipped_loss > unclipped_loss).float()


def k3(log_rho: torch.Tensor, dropped: torch.Tensor | float = 0.0) -> torch.Tensor:
    """k3 = (rho - 1) - log rho + (1 - q(S)) per token, from log rho = log q - log pi at tokens sampled from pi: an
    estimate of KL(pi || q), never negative. `dropped` = 1 - q(S) is q's mass outside the support S that pi samples
    from (0 untruncated), without which k3 falls short of the KL by that much (rlhfkit.online.core)."""
    return torch.expm1(log_rho) - log_rho + dropped


def k3_kl_term(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
               ref_dropped: torch.Tensor | float = 0.0) -> torch.Tensor:
    """GRPO's per-token KL term k3(pi_theta || pi_ref) (the caller weighs it by beta), 0 where masked. A sampled token
    the updated policy no longer keeps (top-k/top-p: log pi_theta = -inf) has an infinite k3 with no gradient: it is
    left out, as the ratio loss takes it as ratio 0."""
    outside = torch.isneginf(logprobs.detach()) & (mask > 0)
    return k3(ref_logprobs - logprobs.masked_fill(outside, 0.0), ref_dropped) * mask * ~outside
