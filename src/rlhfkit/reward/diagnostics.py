"""Reward-model diagnostics on held-out rankings: how far the reward's order follows people's, beside how far
people follow each other on the same items (the ceiling a reward model learnt from them can hope for).

On items of K completions ranked by one or more annotators (rank 1 = best, equal ranks = tie):
  pairwise accuracy     share of the consensus pairs (majority per pair, rlhfkit.data.preference) whose better
                        completion the reward scores strictly higher;
  best-of-K accuracy    share of items where the reward's top completion is among the annotators' best (lowest
                        mean rank); ties on either side count fractionally. Chance: mean of |best| / K (1/K
                        without ties);
  Kendall's tau         tau-b (scipy) between the reward and each annotator's ranking of an item, averaged per
                        annotator and over all; the ceiling is the same tau between every two annotators of an item;
  length                Spearman correlation of reward and length (words) over all completions; the pairwise
                        accuracy that length alone would reach (the longer answer strictly better); and, over the
                        consensus pairs of unequal length, the share where the reward scores the longer answer
                        higher beside the share where the annotators preferred it;
  agreement             Krippendorff's alpha (ordinal; unit: a completion of an item) and the pairwise agreement
                        rate of the annotators (rlhfkit.feedback.agreement).

With truth records (ideal answers with their facts) and the fact sheet, also the fact-swap test
(rlhfkit.reward.fact_swap): the share of answers the reward prefers to the same answer with one number made wrong
(chance 0.5), beside the length correlation: what the reward sees of the content, against what it sees of the form.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau, spearmanr

from rlhfkit.data.jsonl import read_jsonl
from rlhfkit.data.preference import RankingRecord, consolidate_rankings, detect_format, load_rankings
from rlhfkit.feedback.agreement import krippendorff_alpha, pairwise_agreement, records_by_item
from rlhfkit.reward.fact_swap import FactSwap, right_preferred

DIAGNOSTICS_FILE = "diagnostics.json"
ScoreFn = Callable[[list[str], list[str]], Sequence[float]]


@dataclass
class RewardDiagnostics:
    items: int
    completions: int
    pairs: int
    pairwise_accuracy: float | None
    length_only_pairwise_accuracy: float | None  # the same for a reward that is the answer's length in words
    best_of_k_accuracy: float | None
    best_of_k_chance: float | None
    kendall_tau: float | None  # reward vs each annotator, mean over (item, annotator)
    kendall_tau_per_annotator: dict[str, float] = field(default_factory=dict)
    annotator_kendall_tau: float | None = None  # annotator vs annotator: the ceiling
    length_spearman: float | None = None
    longer_preferred_by_reward: float | None = None
    longer_preferred_by_annotators: float | None = None
    annotator_alpha: float | None = None
    annotator_pairwise_agreement: float | None = None
    train_rankings: int | None = None  # the rankings the model was trained on (JSONL rankings files only)
    train_rankings_simulated: int | None = None  # of them, those marked `"simulated": true` (rlhfkit simulate)
    fact_swap_pairs: int | None = None  # answers with a right fact and the same with a wrong one
    fact_swap_right_preferred: float | None = None  # the share where the reward prefers the right one (chance 0.5)

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """A short printable account."""
        f = lambda x, d=3: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
        per = ", ".join(f"{a} {f(t)}" for a, t in self.kendall_tau_per_annotator.items())
        swap = ([f"fact swap: the right fact preferred in {f(self.fact_swap_right_preferred)} of "
                 f"{self.fact_swap_pairs} answers with one number made wrong (chance 0.500)"]
                if self.fact_swap_pairs else [])
        trained = ([f"trained on {self.train_rankings} rankings, {self.train_rankings_simulated} of them by "
                    "simulated annotators"] if self.train_rankings else [])
        if not self.items:
            return trained + swap
        return trained + [
            f"held-out: {self.items} items, {self.completions} completions, {self.pairs} consensus pairs",
            f"pairwise accuracy {f(self.pairwise_accuracy)} (length alone: {f(self.length_only_pairwise_accuracy)}); "
            f"annotators' pairwise agreement "
            f"{f(self.annotator_pairwise_agreement)}, Krippendorff's alpha (ordinal) {f(self.annotator_alpha)}",
            f"best-of-K accuracy {f(self.best_of_k_accuracy)} (chance {f(self.best_of_k_chance)})",
            f"Kendall's tau with each annotator {f(self.kendall_tau)} ({per}); between annotators "
            f"{f(self.annotator_kendall_tau)} (the ceiling)",
            f"length: Spearman(reward, words) {f(self.length_spearman)}; the longer answer of a pair is preferred "
            f"by the reward {f(self.longer_preferred_by_reward)}, by the annotators "
            f"{f(self.longer_preferred_by_annotators)}",
        ] + swap


def _mean(values: Sequence[float]) -> float | None:
    """Mean of the defined values (NaN: undefined, such as tau against a constant); None when there are none."""
    values = [float(v) for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else None


def _tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b; NaN where either side is constant (no order to compare)."""
    return float(kendalltau(a, b).statistic) if len(set(a)) > 1 and len(set(b)) > 1 else float("nan")


def diagnose(records: list[RankingRecord], score: ScoreFn) -> RewardDiagnostics:
    """The diagnostics of the module docstring; `score(prompts, responses)` is the reward (one float each)."""
    groups = list(records_by_item(records).values())
    keys = [(g[0].prompt, text) for g in groups for text in g[0].completions]
    reward_of = dict(zip(keys, (float(v) for v in score([p for p, _ in keys], [t for _, t in keys]))))

    taus, ceiling, per_annotator = [], [], defaultdict(list)
    best_hits, best_chance, units = [], [], []
    for group in groups:
        texts = list(group[0].completions)
        reward = [reward_of[group[0].prompt, t] for t in texts]
        ranks = {a.annotator: [dict(zip(a.completions, a.ranks))[t] for t in texts] for a in group}
        for annotator, rank in ranks.items():
            tau = _tau(reward, [-x for x in rank])  # rank 1 is best: negated, both say "higher is better"
            taus.append(tau)
            per_annotator[annotator].append(tau)
        ceiling += [_tau(ranks[a], ranks[b]) for a, b in combinations(ranks, 2)]
        mean_rank = np.mean(list(ranks.values()), axis=0)
        best = {t for t, m in zip(texts, mean_rank) if m == mean_rank.min()}
        top = [t for t, r in zip(texts, reward) if r == max(reward)]
        best_hits.append(sum(t in best for t in top) / len(top))
        best_chance.append(len(best) / len(texts))
        units += [[rank[i] for rank in ranks.values()] for i in range(len(texts))]

    correct, by_length, longer_by_reward, longer_by_people = [], [], [], []
    for item in consolidate_rankings(records):
        for better, worse in item.pairs:
            b, w = item.completions[better], item.completions[worse]
            rb, rw = reward_of[item.prompt, b], reward_of[item.prompt, w]
            correct.append(rb > rw)
            by_length.append(len(b.split()) > len(w.split()))
            if len(b.split()) != len(w.split()):
                longer_by_people.append(by_length[-1])
                longer_by_reward.append((rb if by_length[-1] else rw) > (rw if by_length[-1] else rb))
    rewards, lengths = list(reward_of.values()), [len(t.split()) for _, t in reward_of]
    varied = len(set(rewards)) > 1 and len(set(lengths)) > 1
    return RewardDiagnostics(
        items=len(groups), completions=len(reward_of), pairs=len(correct),
        pairwise_accuracy=_mean(correct), length_only_pairwise_accuracy=_mean(by_length), best_of_k_accuracy=_mean(best_hits), best_of_k_chance=_mean(best_chance),
        kendall_tau=_mean(taus), kendall_tau_per_annotator={a: _mean(t) for a, t in sorted(per_annotator.items())},
        annotator_kendall_tau=_mean(ceiling),
        length_spearman=float(spearmanr(rewards, lengths).statistic) if varied else None,
        longer_preferred_by_reward=_mean(longer_by_reward), longer_preferred_by_annotators=_mean(longer_by_people),
        annotator_alpha=krippendorff_alpha(units, "ordinal"), annotator_pairwise_agreement=pairwise_agreement(records),
    )


def diagnose_file(path: str | Path, score: ScoreFn) -> RewardDiagnostics | None:
    """`diagnose` on a rankings file; None for a pairs file (pairs have no rankings to compare with)."""
    return diagnose(load_rankings(path), score) if detect_format(path) == "rankings" else None


def write_diagnostics(diagnostics: RewardDiagnostics, output_dir: str | Path) -> Path:
    """`output_dir/diagnostics.json`, written whole (temporary file, then renamed)."""
    path = Path(output_dir) / DIAGNOSTICS_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(diagnostics.as_dict(), indent=2), encoding="utf-8")
    tmp.replace(path)
    return path


def ranking_counts(paths) -> tuple[int, int] | None:
    """(rankings, of them simulated) over the JSONL rankings files among `paths`; None when none is one."""
    files = [Path(p) for p in (paths if isinstance(paths, list) else [paths])]
    files = [f for f in files if f.is_file() and detect_format(f) == "rankings"]
    if not files:
        return None
    records = [r for f in files for _, r in read_jsonl(f)]
    return len(records), sum(r.get("simulated") is True for r in records)


def diagnose_reward_model(model, eval_file: str | Path | None, batch_size: int, output_dir: str | Path,
                          swaps: Sequence[FactSwap] = (), trained_on: tuple[int, int] | None = None
                          ) -> RewardDiagnostics | None:
    """After training: the diagnostics of a `RewardModel` on held-out rankings and on fact swaps (either may be
    absent), with how many of its training rankings were simulated, written to output_dir."""
    score = lambda prompts, texts: model.raw_scores(prompts, texts, batch_size).tolist()  # noqa: E731
    diagnostics = diagnose_file(eval_file, score) if eval_file else None
    if diagnostics is None and (swaps or trained_on):
        diagnostics = RewardDiagnostics(0, 0, 0, None, None, None, None, None)
    if swaps:
        diagnostics.fact_swap_pairs, diagnostics.fact_swap_right_preferred = len(swaps), right_preferred(swaps, score)
    if trained_on:
        diagnostics.train_rankings, diagnostics.train_rankings_simulated = trained_on
    if diagnostics is not None:
        write_diagnostics(diagnostics, output_dir)
    return diagnostics
