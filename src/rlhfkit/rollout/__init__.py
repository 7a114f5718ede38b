"""The rollout engine: the one sampler every stage uses (see `engine`), the sampling distribution every log-prob
is computed under (see `distribution`), and the rollout batch (see `batch`)."""

from rlhfkit.rollout.batch import Rollout, encode_prompts, sequence_inputs, stop_token_ids, truncate_after_stop
from rlhfkit.rollout.distribution import Sampling, dropped_mass, entropy, sampling_logits, token_logprobs
from rlhfkit.rollout.engine import folded_lora, generate_responses, sample

__all__ = [
    "Rollout", "Sampling", "dropped_mass", "encode_prompts", "entropy", "folded_lora", "generate_responses", "sample",
    "sampling_logits", "sequence_inputs", "stop_token_ids", "token_logprobs", "truncate_after_stop",
]
