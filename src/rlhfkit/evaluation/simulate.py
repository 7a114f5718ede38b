"""Simulated annotators: rankings made by a known "gold" utility plus noise, in the rankings format.

With a gold utility one can measure what human data never shows: how often a reward model trained on the
rankings agrees with the gold preference, and how the gold utility moves as PPO pushes the learned reward and the
KL grows (over-optimisation, Gao et al. 2022). Add the gold scorer to PPO's rewards with weight 0 to log it as
reward/<name> beside kl/ref; `rlhfkit report` plots each reward against the KL.

Annotator a ranks completion i by u_i + noise * g_ai, g_ai ~ Gumbel(0, 1) drawn independently: sorting by these
is a draw from the Plackett-Luce model with weights exp(u_i / noise), so each pair follows Bradley-Terry,
P(i above j) = sigmoid((u_i - u_j) / noise). Equal noisy utilities (noise 0 and equal gold) are ties.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rlhfkit.config import SimulateConfig
from rlhfkit.data.jsonl import read_jsonl, write_jsonl
from rlhfkit.errors import DataError, OutputExistsError
from rlhfkit.reward.scorers import load_scorer


@dataclass
class Item:
    id: str
    prompt: str
    completions: list[str]


def ranks_from_utilities(utilities: np.ndarray) -> list[int]:
    """1 = highest utility; equal utilities share a rank (dense: 1, 2, 2, 3)."""
    rank_of = {u: r for r, u in enumerate(sorted(set(utilities.tolist()), reverse=True), start=1)}
    return [rank_of[u] for u in utilities.tolist()]


def simulate_rankings(items: list[Item], gold: np.ndarray | list[list[float]], annotators: int, noise: float,
                      seed: int = 0) -> list[dict]:
    """One ranking record per item and annotator (`sim-1`, `sim-2`, ...), with the gold utilities alongside."""
    rng = np.random.default_rng(seed)
    records = []
    for item, utilities in zip(items, gold):
        u = np.asarray(utilities, dtype=np.float64)
        for a in range(annotators):
            noisy = u + noise * rng.gumbel(size=len(u)) if noise > 0 else u
            records.append({"id": item.id, "prompt": item.prompt, "completions": item.completions,
                            "ranks": ranks_from_utilities(noisy), "annotator": f"sim-{a + 1}",
                            "gold": [float(x) for x in u]})
    return records


def load_items(path) -> list[Item]:
    """`{"prompt", "completions": [...], "id"?}` per line; at least two distinct completions each."""
    items = []
    for lineno, record in read_jsonl(path):
        prompt, completions = record.get("prompt"), record.get("completions")
        if not isinstance(prompt, str) or not isinstance(completions, list) or len(set(completions)) < 2 \
                or not all(isinstance(c, str) and c.strip() for c in completions):
            raise DataError(f"{path}:{lineno}: expected {{\"prompt\": str, \"completions\": [two or more distinct "
                            "non-empty strings]}")
        items.append(Item(str(record.get("id", f"item-{len(items)}")), prompt, completions))
    return items


def sample_items(cfg: SimulateConfig) -> list[Item]:
    """K sampled completions per prompt from `cfg.model`; prompts whose samples are not all distinct keep the
    distinct ones (at least two, else the prompt is dropped)."""
    from transformers import set_seed

    from rlhfkit.data.records import load_prompts
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer
    from rlhfkit.rollout import generate_responses

    set_seed(cfg.seed)
    prompts = load_prompts(cfg.prompts_file)[: cfg.limit]
    tokenizer, model = load_tokenizer(cfg.model), load_causal_lm(cfg.model)
    answers = generate_responses(model, tokenizer, [p.prompt for p in prompts], max_new_tokens=cfg.max_new_tokens,
                                 do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, num_samples=cfg.k,
                                 batch_size=cfg.batch_size, system_prompt=cfg.system_prompt)
    items = []
    for i, p in enumerate(prompts):
        distinct = list(dict.fromkeys(a for a in answers[i * cfg.k:(i + 1) * cfg.k] if a.strip()))
        if len(distinct) >= 2:
            items.append(Item(p.id or f"item-{i}", p.prompt, distinct))
    return items


def simulate(cfg: SimulateConfig) -> list[dict]:
    """Write `cfg.output_file` (rankings JSONL) and return its records."""
    if cfg.output_file.exists() and not cfg.overwrite:
        raise OutputExistsError(f"{cfg.output_file} exists; pass overwrite=true to replace it")
    items = load_items(cfg.completions_file)[: cfg.limit] if cfg.completions_file else sample_items(cfg)
    if not items:
        raise DataError("no prompt has two distinct completions to rank")
    flat_prompts = [it.prompt for it in items for _ in it.completions]
    flat_completions = [c for it in items for c in it.completions]
    flat = sum(t.weight * load_scorer(t.scorer).score(flat_prompts, flat_completions) for t in cfg.gold).tolist()
    utilities, start = [], 0
    for it in items:
        utilities.append(flat[start:start + len(it.completions)])
        start += len(it.completions)
    records = simulate_rankings(items, utilities, cfg.annotators, cfg.noise, cfg.seed)
    cfg.output_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cfg.output_file.with_name(cfg.output_file.name + ".tmp")
    write_jsonl(tmp, records)
    tmp.replace(cfg.output_file)
    return records
