"""The sampling distribution, in one place: what the engine samples from is what every log-prob is computed under.

For next-token logits z and settings (temperature T, top_k, top_p):

    pi(a | s) = softmax(z / T)[a] / Z   for a in S,   0 otherwise,

where S keeps the top_k largest logits (top_k > 0; ties with the k-th are kept), then, of those, the smallest set
of most likely tokens whose probability mass reaches top_p (top_p < 1; the most likely token is always kept), and
Z renormalises over S. Without truncation S is the whole vocabulary and pi = softmax(z / T).

The sampler draws from pi and records log pi(a_t); the trainer's forward pass recomputes log pi(a_t) with the same
function (`token_logprobs`), so the PPO ratio pi_theta / pi_old compares two distributions of the same family. A
token the current policy no longer keeps in S has log-prob -inf (ratio 0), exactly as the distribution says.

The reference model is a density, not a sampler: it is scored with softmax(z_ref / T) over the whole vocabulary
(`Sampling.untruncated`). The KL to the reference is then KL(pi || pi_ref), the divergence of what is actually
sampled from the reference model: finite whatever the supports, and with truncation it includes what truncation
itself removes (E[-log mass kept] > 0 even for the reference model sampling itself). Estimators of it that weigh
pi_ref / pi at sampled tokens (k3) need the reference's mass outside S, which `dropped_mass` gives: E_pi[pi_ref / pi]
= sum_{a in S} pi_ref(a) = 1 - that mass, not 1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from rlhfkit.errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    """How to sample: the distribution above, how many tokens at most, and how many samples per prompt."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    num_samples: int = 1  # K completions of each prompt, adjacent in the batch
    greedy: bool = False  # argmax instead of sampling (previews); no log-probs are recorded then

    def __post_init__(self):
        problems = [
            f"max_new_tokens must be at least 1, not {self.max_new_tokens}" if self.max_new_tokens < 1 else "",
            f"temperature must be > 0, not {self.temperature}" if not self.temperature > 0 else "",
            f"top_p must be in (0, 1], not {self.top_p}" if not 0 < self.top_p <= 1 else "",
            f"top_k must be >= 0 (0: off), not {self.top_k}" if self.top_k < 0 else "",
            f"num_samples must be at least 1, not {self.num_samples}" if self.num_samples < 1 else "",
            "greedy decoding gives one answer per prompt: sample to get num_samples > 1"
            if self.greedy and self.num_samples > 1 else "",
        ]
        if any(problems):
            raise ConfigError("; ".join(p for p in problems if p))

    @property
    def truncated(self) -> bool:
        return self.top_k > 0 or self.top_p < 1

    @property
    def untruncated(self) -> Sampling:
        """The same temperature over the whole vocabulary: how a reference model is scored."""
        return replace(self, top_p=1.0, top_k=0, greedy=False)


def sampling_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """z / T in float32 with the tokens outside S set to -inf: softmax of this is pi. Shape [..., V] kept."""
    z = logits.float()
    if sampling.temperature != 1.0:
        z = z / sampling.temperature
    if 0 < sampling.top_k < z.shape[-1]:
        kth = z.topk(sampling.top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_z, order = z.sort(dim=-1, descending=True)
        probs = sorted_z.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = mass_before >= sampling.top_p  # 0 for the most likely token: it is always kept
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """log pi(token) for each position: [..., V] logits and [...] tokens -> [...] float32.

    Computed as z[token] - logsumexp(z): no log-softmax copy of the whole vocabulary beyond z itself.
    """
    z = sampling_logits(logits, sampling)
    return z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


def dropped_mass(logits: torch.Tensor, ref_logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """1 - pi_ref(S) = sum_{a not in S} pi_ref(a): the reference's mass (its whole softmax at temperature T) on the
    tokens the truncation of the policy's `logits` leaves out of S. [..., V] logits -> [...]; 0 without truncation."""
    outside = torch.isneginf(sampling_logits(logits, sampling))
    z_ref = sampling_logits(ref_logits, sampling.untruncated)
    return (z_ref.masked_fill(~outside, float("-inf")).logsumexp(-1) - z_ref.logsumexp(-1)).exp()


def entropy(z: torch.Tensor) -> torch.Tensor:
    """H(pi) = -sum_a pi(a) log pi(a) from `sampling_logits` output (tokens outside S contribute 0)."""
    return torch.special.entr(z.softmax(dim=-1)).sum(-1)
