"""Rollout: prompts in, sampled responses out, with masks; and the forward pass that scores a rollout's tokens.

Prompts are left-padded so that every response starts in the same column; responses are right-padded. Position
ids always come from the attention mask, so a padded row sees the same positions as it would alone. A response
ends at its first stop token (kept, so the policy learns to stop); everything after it is padding, masked out
of every loss and statistic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from rlhfkit.data.chat import render_prompt


@dataclass
class SamplingSettings:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filtering


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_length: int,
                   system_prompt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-formatted prompts, left-padded; a prompt longer than `max_length` keeps its end (the question)."""
    texts = [render_prompt(tokenizer, p, system_prompt) for p in prompts]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][-max_length:] for t in texts]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, width - len(row):] = torch.tensor(row)
        attention_mask[i, width - len(row):] = 1
    return input_ids, attention_mask


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model) -> list[int]:
    """The tokenizer's EOS and any end-of-turn tokens the model's generation config adds."""
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


@dataclass
class Rollout:
    query_ids: torch.Tensor  # [B, P] left-padded
    query_mask: torch.Tensor
    response_ids: torch.Tensor  # [B, R] right-padded, pad after the stop token
    response_mask: torch.Tensor  # [B, R] 1 up to and including the stop token
    ended: torch.Tensor  # [B] bool: the response stopped by itself (else it ran into max_new_tokens)

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    def inputs(self) -> dict[str, torch.Tensor]:
        """Prompt + response as one batch, with position ids from the mask."""
        return sequence_inputs(self.query_ids, self.query_mask, self.response_ids, self.response_mask)

    def select(self, index: torch.Tensor) -> Rollout:
        return Rollout(*(t[index] for t in (self.query_ids, self.query_mask, self.response_ids, self.response_mask, self.ended)))


def sequence_inputs(query_ids, query_mask, response_ids, response_mask) -> dict[str, torch.Tensor]:
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    return {
        "input_ids": torch.cat([query_ids, response_ids], dim=1),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
    }


@torch.no_grad()
def sample_responses(model, query_ids: torch.Tensor, query_mask: torch.Tensor, settings: SamplingSettings,
                     stop_ids: Sequence[int], pad_id: int) -> Rollout:
    """Sample one response per prompt with the KV cache; stop at a stop token or after max_new_tokens.

    Every sampling knob that would change the distribution is set explicitly, so that a model's own generation
    config (a repetition penalty, say) cannot make the sampled distribution differ from the one PPO scores.
    """
    out = model.generate(
        input_ids=query_ids,
        attention_mask=query_mask,
        do_sample=True,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        min_p=None,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        bad_words_ids=None,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        min_length=0,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_id,
        use_cache=True,
    )
    response, mask, ended = truncate_after_stop(out[:, query_ids.shape[1]:], stop_ids, pad_id)
    width = max(int(mask.sum(-1).max()), 1)  # drop columns that are padding in every row
    return Rollout(query_ids, query_mask, response[:, :width].contiguous(), mask[:, :width].contiguous(), ended)
