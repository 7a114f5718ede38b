"""Shared prompts: every distinct prompt of a batch is encoded once, and the prefix all prompts start with (a chat
template's system prompt) once for the whole batch; the cached keys and values are repeated for the rows that
share them, and only the rest is computed per row.

The result is the same function of the same tokens (each token attends to the same keys at the same positions),
computed with fewer FLOPs, forwards and backwards alike: gradients flow through the repeated keys and values
into the shared computation. With the bundled model's chat template the system prompt is about a third of a
short exchange; with K samples per prompt, (K - 1) / K of the prompt tokens are not recomputed.

Layout: a left-padded prompt [pad | prefix | own] is laid out as [prefix | pad | own]; position ids come from the
mask, so the reordering changes nothing a token sees.

Each forward is a pass over all the weights (and one more in the backward), whatever its rows: on a CPU, where a
short forward is bound by reading the weights, passes cost as much as FLOPs. So a batch whose prompts are all
distinct (PPO: one sample per prompt) takes two forwards, the prefix then each row's own prompt tokens and response
together; only repeated prompts (K samples) get a forward of their own.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

MIN_SHARED_PREFIX = 4  # below this, one plain forward is as cheap as three partial ones


@dataclass
class PromptPlan:
    prefix: torch.Tensor  # [L] the tokens every prompt starts with (L may be 0)
    own_ids: torch.Tensor  # [G, P'] each distinct prompt after the prefix, left-padded
    own_mask: torch.Tensor  # [G, P']
    rows: torch.Tensor  # [B] which distinct prompt each row of the batch answers

    @classmethod
    def of(cls, query_ids: torch.Tensor, query_mask: torch.Tensor) -> PromptPlan:
        """The plan for a left-padded batch: rows whose prompt tokens are equal share one distinct prompt. Every
        distinct prompt keeps at least one token of its own (its last one's output predicts the first response
        token)."""
        _, group = torch.unique(torch.cat([query_ids * query_mask, query_mask], dim=1), dim=0, return_inverse=True)
        rows = torch.arange(len(group), device=group.device)
        first = torch.full((int(group.max()) + 1,), len(group), device=group.device)
        first = first.scatter_reduce(0, group, rows, reduce="amin")  # the first row of each distinct prompt
        ids, mask = query_ids[first], query_mask[first]
        prompts = [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())]
        shared = min(len(p) for p in prompts) - 1
        for i, token in enumerate(prompts[0][:shared]):
            if any(p[i] != token for p in prompts[1:]):
                shared = i
                break
        lengths = mask.sum(-1) - shared
        width = int(lengths.max())
        columns = torch.arange(width, device=ids.device)
        own_mask = (columns[None, :] >= width - lengths[:, None]).long()
        own_ids = ids[:, -width:].masked_fill(own_mask == 0, 0)  # any token id: masked
        return cls(ids[0, ids.shape[1] - mask[0].sum() + torch.arange(shared, device=ids.device)],
                   own_ids, own_mask, group)

    @property
    def worthwhile(self) -> bool:
        return len(self.prefix) >= MIN_SHARED_PREFIX or self.repeats

    def prompt_positions(self) -> torch.Tensor:
        """Position ids of the distinct prompts' own tokens, [G, P']."""
        return len(self.prefix) + (self.own_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def repeats(self) -> bool:
        """Whether some prompt is answered by several rows (K samples per prompt)."""
        return len(self.own_ids) < len(self.rows)

    def encode(self, model, cache, **kwargs):
        """Run the prefix (once) and the distinct prompts' own tokens through `model` into `cache`, which then holds
        G rows; returns the second forward's output, with vocabulary logits at each prompt's last token only, and
        the attention mask of the cached columns."""
        shared, width = len(self.prefix), self.own_ids.shape[1]
        encode_prefix(model, self.prefix, cache, len(self.own_ids), **kwargs)
        mask = torch.cat([self.own_mask.new_ones((len(self.own_ids), shared)), self.own_mask], dim=1)
        return model(input_ids=self.own_ids, attention_mask=mask, position_ids=self.prompt_positions(), cache=cache,
                     use_cache=True, **_keep(model, 1, width), **kwargs), mask


def encode_prefix(model, prefix: torch.Tensor, cache, rows: int, **kwargs) -> None:
    """Run `prefix` ([L] tokens at positions 0..L-1, which every row starts with) through `model` once into `cache`,
    then repeat its keys and values for `rows` rows (gradients flow back through the repeat)."""
    if len(prefix):
        model(input_ids=prefix[None], position_ids=torch.arange(len(prefix), device=prefix.device)[None],
              attention_mask=torch.ones_like(prefix)[None], cache=cache, use_cache=True,
              **_keep(model, 1, len(prefix)), **kwargs)
        cache.reorder_cache(torch.zeros(rows, dtype=torch.long, device=prefix.device))


def caches(model) -> bool:
    """Whether a forward of `model` fills the cache it is given: gradient checkpointing turns the cache off in
    training, and a prefix computed apart would then be lost, so callers compute every row whole instead."""
    return not (model.training and getattr(model, "is_gradient_checkpointing", False))


Select = Callable[[object], tuple[torch.Tensor | None, ...]]


def forward_responses(model, query_ids, query_mask, response_ids, response_mask, select: Select,
                      **kwargs) -> tuple[torch.Tensor | None, ...]:
    """`model`'s outputs at the positions that predict each response token, [B, R, ...] for each tensor `select`
    picks from an output (per position, e.g. `lambda out: (out.logits,)`): the last prompt token's output, then
    those of the response tokens but the last. Shared prompts and prefixes are computed once (see the module
    docstring); `kwargs` go to every forward (e.g. output_hidden_states=True)."""
    width = response_ids.shape[1]
    plan = PromptPlan.of(query_ids, query_mask)
    if not plan.worthwhile or not caches(model):
        mask = torch.cat([query_mask, response_mask], dim=1)
        out = model(input_ids=torch.cat([query_ids, response_ids], dim=1), attention_mask=mask,
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False,
                    **_keep(model, width + 1, mask.shape[1]), **kwargs)
        return tuple(None if t is None else t[:, -(width + 1):-1] for t in select(out))
    cache = DynamicCache(config=model.config)
    if not plan.repeats:
        # every row its own prompt: after the prefix, each row's prompt and response in one forward (encoding the
        # prompts apart would cost one more pass over the weights, forwards and backwards, and save nothing)
        encode_prefix(model, plan.prefix, cache, len(plan.rows), **kwargs)
        own_ids, own_mask = plan.own_ids[plan.rows], plan.own_mask[plan.rows]
        mask = torch.cat([own_mask.new_ones((len(plan.rows), len(plan.prefix))), own_mask, response_mask], dim=1)
        prompt_positions = plan.prompt_positions()[plan.rows]
        positions = torch.cat([prompt_positions, prompt_positions[:, -1:] + response_mask.cumsum(-1)], dim=1)
        out = model(input_ids=torch.cat([own_ids, response_ids], dim=1), attention_mask=mask, position_ids=positions,
                    cache=cache, use_cache=True, **_keep(model, width + 1, own_ids.shape[1] + width), **kwargs)
        return tuple(None if t is None else t[:, -(width + 1):-1] for t in select(out))
    prompt_out, prompt_mask = plan.encode(model, cache, **kwargs)
    cache.reorder_cache(plan.rows)
    last = plan.prompt_positions()[:, -1][plan.rows]
    mask = torch.cat([prompt_mask[plan.rows], response_mask], dim=1)
    out = model(input_ids=response_ids, attention_mask=mask, position_ids=last[:, None] + response_mask.cumsum(-1),
                cache=cache, use_cache=True, **_keep(model, width, width), **kwargs)
    return tuple(None if a is None else torch.cat([a[:, -1:][plan.rows], b[:, :width - 1]], dim=1)
                 for a, b in zip(select(prompt_out), select(out)))


def _keep(model, n: int, length: int) -> dict:
    """For models with an LM head, only the last `n` of `length` positions get vocabulary logits."""
    return keep_logits(model, length - n, length, length)


def keep_logits(model, start: int, stop: int, length: int) -> dict:
    """The forward's keyword that gives vocabulary logits only at positions start..stop-1 of `length`, for models
    whose forward takes `logits_to_keep`; {} for others (all positions then get logits). As indices, not a count:
    the slice a count makes is strided, and a strided [B, n, H] through the LM head becomes a batched matmul
    against B expanded copies of the vocabulary matrix (on a CPU, 10x the time of one matmul)."""
    base = getattr(model, "module", model)  # DDP and other wrappers pass keywords through
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    if "logits_to_keep" not in inspect.signature(type(base).forward).parameters:
        return {}
    device = next(model.parameters()).device
    n = stop - start
    return {"logits_to_keep": n if (start, stop) == (0, length) else torch.arange(start, stop, device=device)}
