"""Simulated annotators: rankings made by a known "gold" utility plus noise, in the rankings format.

With a gold utility one can measure what human data never shows: how often a reward model trained on the
rankings agrees with the gold preference, and how the gold utility moves as PPO pushes the learned reward and the
KL grows (over-optimisation, Gao et al. 2022). Add the gold scorer to PPO's rewards with weight 0 to log it as
reward/<name> beside kl/ref; `rlhfkit report` plots each reward against the KL.

Annotator a ranks completion i by u_i + noise * g_ai, g_ai ~ Gumbel(0, 1) drawn independently: sorting by these
is a draw from the Plackett-Luce model with weights exp(u_i / noise), so each pair follows Bradley-Terry,
P(i above j) = sigmoid((u_i - u_j) / noise). Equal noisy utilities (noise 0 and equal gold) are ties.

The noise can be set from people's measured agreement instead (`match_agreement`: a rankings file): two
annotators order a pair with gap d the same way with probability p^2 + (1 - p)^2, p = sigmoid(d / noise), and the
noise is the one whose expected pairwise agreement over the items to rank equals that of the people who ranked
the file (rlhfkit.feedback.agreement.pairwise_agreement).

Every ranking written carries `"simulated": true` and an annotator named `sim-N`, so that simulated data is
told apart from people's wherever it goes; `items_file` keeps the sampled completions as the feedback app
imports them (`rlhfkit feedback import`), so that people can rank the same answers instead.
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
                            "gold": [float(x) for x in u], "simulated": True})
    return records


def _pair_gaps(gold: list[list[float]]) -> np.ndarray:
    """|u_i - u_j| over every pair of completions of every item."""
    return np.array([abs(u[i] - u[j]) for u in gold for i in range(len(u)) for j in range(i + 1, len(u))])


def expected_agreement(gold: list[list[float]], noise: float) -> float:
    """The pairwise agreement two simulated annotators reach on average over the items' pairs (module docstring);
    with noise 0 they agree on every pair (equal gold: both tie)."""
    gaps = _pair_gaps(gold)
    if noise == 0:
        return 1.0
    p = 1 / (1 + np.exp(-gaps / noise))
    return float(np.mean(p ** 2 + (1 - p) ** 2))


def calibrate_noise(gold: list[list[float]], agreement: float) -> float:
    """The noise whose expected agreement on these items is `agreement` (bisection on log noise: agreement falls
    from its value at noise -> 0 towards 1/2 as the noise grows)."""
    gaps = _pair_gaps(gold)
    ceiling = float(np.mean(np.where(gaps > 0, 1.0, 0.5)))  # noise -> 0+: equal gold is a coin flip
    if not 0.5 < agreement < ceiling:
        raise DataError(f"cannot match an agreement of {agreement:.3f}: annotators with noise agree between 0.5 and "
                        f"{ceiling:.3f} on these items ({np.mean(gaps == 0):.0%} of pairs have equal gold utility); "
                        "add a term that tells more completions apart to the gold utility, or set the noise")
    low, high = -12.0, 12.0  # log noise
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if expected_agreement(gold, float(np.exp(mid))) > agreement else (low, mid)
    return float(np.exp((low + high) / 2))


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
    from rlhfkit.retrieval.grounding import Grounding
    from rlhfkit.rollout import generate_responses

    set_seed(cfg.seed)
    prompts = load_prompts(cfg.prompts_file)[: cfg.limit]
    tokenizer, model = load_tokenizer(cfg.model), load_causal_lm(cfg.model)
    answers = generate_responses(model, tokenizer, [p.prompt for p in prompts], max_new_tokens=cfg.max_new_tokens,
                                 do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, num_samples=cfg.k,
                                 batch_size=cfg.batch_size, system_prompt=cfg.system_prompt,
                                 max_prompt_length=cfg.max_prompt_length,
                                 grounding=Grounding.from_settings(cfg.retrieval))
    items = []
    for i, p in enumerate(prompts):
        distinct = list(dict.fromkeys(a for a in answers[i * cfg.k:(i + 1) * cfg.k] if a.strip()))
        if len(distinct) >= 2:
            items.append(Item(p.id or f"item-{i}", p.prompt, distinct))
    return items


def gold_utilities(cfg: SimulateConfig, items: list[Item]) -> list[list[float]]:
    """Per item, the gold utility of each completion (the weighted sum of `cfg.gold`)."""
    flat_prompts = [it.prompt for it in items for _ in it.completions]
    flat_completions = [c for it in items for c in it.completions]
    flat = sum(t.weight * load_scorer(t.scorer).score(flat_prompts, flat_completions) for t in cfg.gold).tolist()
    utilities, start = [], 0
    for it in items:
        utilities.append(flat[start:start + len(it.completions)])
        start += len(it.completions)
    return utilities


def simulation_noise(cfg: SimulateConfig, gold: list[list[float]]) -> float:
    """`cfg.noise`, or the noise that matches the agreement of the people who ranked `cfg.match_agreement`."""
    if cfg.match_agreement is None:
        return cfg.noise
    from rlhfkit.data.preference import load_rankings
    from rlhfkit.feedback.agreement import pairwise_agreement

    agreement = pairwise_agreement(load_rankings(cfg.match_agreement))
    if agreement is None:
        raise DataError(f"{cfg.match_agreement}: no item was ranked by two annotators, so it has no agreement to match")
    return calibrate_noise(gold, agreement)


def _write_whole(path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write_jsonl(tmp, records)
    tmp.replace(path)


def simulate(cfg: SimulateConfig) -> tuple[list[dict], float]:
    """Write `cfg.output_file` (rankings JSONL) and `cfg.items_file` if set; return the rankings and the noise."""
    for path in (cfg.output_file, cfg.items_file):
        if path is not None and path.exists() and not cfg.overwrite:
            raise OutputExistsError(f"{path} exists; pass overwrite=true to replace it")
    items = load_items(cfg.completions_file)[: cfg.limit] if cfg.completions_file else sample_items(cfg)
    if not items:
        raise DataError("no prompt has two distinct completions to rank")
    gold = gold_utilities(cfg, items)
    noise = simulation_noise(cfg, gold)
    records = simulate_rankings(items, gold, cfg.annotators, noise, cfg.seed)
    if cfg.items_file is not None:
        _write_whole(cfg.items_file, [{"id": it.id, "prompt": it.prompt, "completions": it.completions,
                                       "model": str(cfg.model or cfg.completions_file)} for it in items])
    _write_whole(cfg.output_file, records)
    return records, noise
