"""A batch of rollouts: prompts left-padded so every response starts in the same column, responses right-padded.

Position ids always come from the attention mask, so a padded row sees the same positions as it would alone. A
response ends at its first stop token (kept, so the policy learns to stop); everything after it is padding,
masked out of every loss and statistic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from transformers import PreTrainedTokenizerBase

from rlhfkit.data.chat import render_prompt


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_length: int | None = None,
                   system_prompt: str | None = None, grounding=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-formatted prompts, left-padded; a prompt longer than `max_length` keeps its end (the question). With a
    `grounding` (rlhfkit.retrieval.Grounding) each prompt carries its retrieved passages, cut to fit `max_length`."""
    texts = [render_prompt(tokenizer, p, system_prompt, grounding, max_length) for p in prompts]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if max_length is not None:
        ids = [row[-max_length:] for row in ids]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row):] = 1
    return input_ids, attention_mask


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model) -> list[int]:
    """The tokenizer's EOS and the end-of-turn tokens the model declares (`generation_config.eos_token_id`).

    This is the only thing the engine reads from a model's generation config: which tokens end a turn."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def truncate_after_stop(tokens: torch.Tensor, stop_ids: Sequence[int], pad_id: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each row after its first stop token: (tokens with pad after it, mask, whether a stop token was found)."""
    is_stop = torch.isin(tokens, torch.tensor(list(stop_ids), device=tokens.device))
    ended = is_stop.any(-1)
    width = tokens.shape[1]
    first_stop = torch.where(ended, is_stop.float().argmax(-1), torch.full_like(ended, width, dtype=torch.long))
    columns = torch.arange(width, device=tokens.device)
    mask = (columns[None, :] <= first_stop[:, None]).long()
    return tokens.masked_fill(mask == 0, pad_id), mask, ended


def sequence_inputs(query_ids, query_mask, response_ids, response_mask) -> dict[str, torch.Tensor]:
    """Prompt + response as one batch for a forward pass, with position ids from the mask."""
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    return {
        "input_ids": torch.cat([query_ids, response_ids], dim=1),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
    }


@dataclass
class Rollout:
    """Sampled responses and what the sampler recorded of them. Per-token tensors are [B, R], zero where masked."""

    query_ids: torch.Tensor  # [B, P] left-padded
    query_mask: torch.Tensor
    response_ids: torch.Tensor  # [B, R] right-padded, pad after the stop token
    response_mask: torch.Tensor  # [B, R] 1 up to and including the stop token
    ended: torch.Tensor  # [B] bool: the response stopped by itself (else it ran into max_new_tokens)
    group: torch.Tensor  # [B] index of the prompt each row answers (K adjacent rows share one with num_samples K)
    logprobs: torch.Tensor | None = None  # [B, R] log pi(a_t) under the distribution sampled from
    entropy: torch.Tensor | None = None  # [B, R] H(pi(. | s_t)) of that distribution
    values: torch.Tensor | None = None  # [B, R] V(s_t) from the policy's value head, when it has one

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    def inputs(self) -> dict[str, torch.Tensor]:
        """Prompt + response as one batch, with position ids from the mask."""
        return sequence_inputs(self.query_ids, self.query_mask, self.response_ids, self.response_mask)

    def tokens(self) -> dict[str, torch.Tensor]:
        """What a forward over the responses takes (`PolicyModel`, `ValueModel`, `forward_responses`)."""
        return {"query_ids": self.query_ids, "query_mask": self.query_mask, "response_ids": self.response_ids,
                "response_mask": self.response_mask}

    def select(self, index: torch.Tensor) -> Rollout:
        """The rows in `index` (a view of the batch for a minibatch)."""
        return Rollout(**{f.name: None if (v := getattr(self, f.name)) is None else v[index] for f in fields(self)})
