"""Inter-annotator agreement: Krippendorff's alpha, the pairwise agreement rate, and each annotator's agreement
with the consensus (the majority rule of rlhfkit.data.preference.consolidate_rankings).

Krippendorff's alpha (Krippendorff, "Computing Krippendorff's Alpha-Reliability", 2011):

    alpha = 1 - D_o / D_e

over the *pairable* values: the values of units (items) that at least two coders coded. From them the
coincidence matrix counts, for every unit u with m_u values, each ordered pair of values (c, k) taken from two
different coders with weight 1 / (m_u - 1):

    o_ck = sum_u  #{(c, k) pairs in u} / (m_u - 1),     n_c = sum_k o_ck,     n = sum_c n_c

    D_o = 1/n            * sum_c sum_k o_ck     * delta^2(c, k)      (observed disagreement)
    D_e = 1/(n (n - 1))  * sum_c sum_k n_c n_k  * delta^2(c, k)      (disagreement expected by chance)

with the metric's difference function
    nominal:  delta^2(c, k) = 0 if c == k else 1
    ordinal:  delta^2(c, k) = (sum_{g=c..k} n_g  -  (n_c + n_k) / 2)^2    (values sorted, c <= k)
    interval: delta^2(c, k) = (c - k)^2
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Sequence
from itertools import combinations
from typing import Literal

from rlhfkit.data.preference import RankingRecord, consolidate_rankings

Metric = Literal["nominal", "ordinal", "interval"]


def krippendorff_alpha(units: Iterable[Sequence[Hashable]], metric: Metric = "nominal") -> float | None:
    """Alpha for `units`: per unit, the values its coders gave (missing values left out).

    None when it is undefined: fewer than two pairable values, or a single value used throughout (D_e = 0).
    """
    coincidences: Counter = Counter()  # o_ck
    for values in units:
        m = len(values)
        if m < 2:
            continue  # a value nobody else coded cannot agree or disagree
        for a, b in ((values[i], values[j]) for i in range(m) for j in range(m) if i != j):
            coincidences[a, b] += 1 / (m - 1)
    n_c: Counter = Counter()
    for (c, _), o in coincidences.items():
        n_c[c] += o
    n = sum(n_c.values())
    if n < 2:
        return None
    values = sorted(n_c)
    delta2 = _difference(metric, values, n_c)
    observed = sum(o * delta2[c, k] for (c, k), o in coincidences.items()) / n
    expected = sum(n_c[c] * n_c[k] * delta2[c, k] for c in values for k in values) / (n * (n - 1))
    return None if expected == 0 else 1 - observed / expected


def _difference(metric: Metric, values: list, n_c: Counter) -> dict[tuple, float]:
    delta2 = {}
    for i, c in enumerate(values):
        for j, k in enumerate(values):
            if metric == "nominal":
                d = 0.0 if c == k else 1.0
            elif metric == "interval":
                d = float(c - k) ** 2
            else:  # ordinal: how many values lie between c and k (half of each end), squared
                lo, hi = min(i, j), max(i, j)
                d = (sum(n_c[values[g]] for g in range(lo, hi + 1)) - (n_c[c] + n_c[k]) / 2) ** 2
            delta2[c, k] = d
    return delta2


def _order(rank_of: dict[str, int], x: str, y: str) -> int:
    """+1 if completion x is ranked above y, -1 if below, 0 for a tie."""
    return (rank_of[x] < rank_of[y]) - (rank_of[x] > rank_of[y])


def records_by_item(records: Iterable[RankingRecord]) -> dict[Hashable, list[RankingRecord]]:
    """Records of the same item: same id, or without ids the same prompt and completions (as consolidation groups)."""
    groups: dict[Hashable, list[RankingRecord]] = defaultdict(list)
    for r in records:
        groups[r.id if r.id is not None else (r.prompt, frozenset(r.completions))].append(r)
    return groups


def pairwise_agreement(records: Iterable[RankingRecord]) -> float | None:
    """Share of (two annotators, two completions) comparisons where both annotators order the two the same way
    (above, below or tied), over every item that several annotators ranked."""
    agree = total = 0
    for group in records_by_item(records).values():
        for a, b in combinations(group, 2):
            rank_a, rank_b = dict(zip(a.completions, a.ranks)), dict(zip(b.completions, b.ranks))
            for x, y in combinations(a.completions, 2):
                total += 1
                agree += _order(rank_a, x, y) == _order(rank_b, x, y)
    return agree / total if total else None


def consensus_agreement(records: Iterable[RankingRecord]) -> dict[str, float | None]:
    """Per annotator: the share of consensus pairs (couples the majority decided) that they ordered the same way.

    The consensus includes the annotator's own vote, as it does in the export.
    """
    agree: Counter = Counter()
    total: Counter = Counter()
    for group in records_by_item(records).values():
        if len(group) < 2:
            continue
        consensus = consolidate_rankings(group)
        if not consensus:
            continue
        item = consensus[0]
        for r in group:
            rank_of = dict(zip(r.completions, r.ranks))
            for better, worse in item.pairs:
                total[r.annotator] += 1
                agree[r.annotator] += rank_of[item.completions[better]] < rank_of[item.completions[worse]]
    annotators = {r.annotator for group in records_by_item(records).values() for r in group}
    return {a: (agree[a] / total[a] if total[a] else None) for a in sorted(annotators)}
