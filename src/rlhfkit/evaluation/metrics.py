"""Evaluation statistics: percentile-bootstrap intervals, the paired change against a baseline, distinct-n (with a
jackknife interval), win rate; intervals formatted for tables.

Every model answers the same prompts, so comparisons between models are paired: a bootstrap resample draws prompt
indices once and takes both models' scores on those prompts (Efron & Tibshirani 1993, ch. 13). The interval is
the percentile interval of the resampled statistic.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A statistic on the whole sample and its bootstrap confidence interval."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def excludes(self, x: float) -> bool:
        return not self.low <= x <= self.high


def bootstrap(statistic: Callable[[np.ndarray], np.ndarray], n: int, n_resamples: int = 10_000,
              confidence: float = 0.95, seed: int = 0) -> Interval:
    """`statistic(index)` maps an index array [..., n] into the sample(s) to a value per leading row.

    It is evaluated once on the sample itself (index 0..n-1) and on `n_resamples` resamples drawn with
    replacement; the interval is their (1 - confidence) / 2 and (1 + confidence) / 2 quantiles.
    """
    if n < 1:
        raise ValueError("the bootstrap needs at least one observation")
    rng = np.random.default_rng(seed)
    value = float(statistic(np.arange(n)[None, :])[0])
    estimates = []
    for start in range(0, n_resamples, 1000):  # chunks bound the memory: 1000 x n indices at a time
        index = rng.integers(0, n, size=(min(1000, n_resamples - start), n))
        estimates.append(statistic(index))
    alpha = (1 - confidence) / 2
    low, high = np.quantile(np.concatenate(estimates), [alpha, 1 - alpha])
    return Interval(value, float(low), float(high))


def mean_interval(values: Sequence[float], **kwargs) -> Interval:
    x = np.asarray(values, dtype=np.float64)
    return bootstrap(lambda i: x[i].mean(-1), len(x), **kwargs)


def percent_change_interval(baseline: Sequence[float], other: Sequence[float], **kwargs) -> Interval:
    """100 * (mean(other) / mean(baseline) - 1) over paired observations (same prompts), resampled in pairs."""
    b, o = np.asarray(baseline, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if b.shape != o.shape:
        raise ValueError(f"paired samples differ in size: {b.shape} and {o.shape}")

    def change(i: np.ndarray) -> np.ndarray:
        base = b[i].mean(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return 100.0 * (o[i].mean(-1) / base - 1.0)

    if b.mean() == 0:
        raise ValueError("the baseline's mean is 0: a percent change is undefined")
    return bootstrap(change, len(b), **kwargs)


def difference_interval(values: Sequence[float], reference_values: Sequence[float], **kwargs) -> Interval:
    """mean(values) - mean(reference_values) over paired observations (same prompts), resampled in pairs."""
    v, r = np.asarray(values, dtype=np.float64), np.asarray(reference_values, dtype=np.float64)
    if v.shape != r.shape:
        raise ValueError(f"paired samples differ in size: {v.shape} and {r.shape}")
    d = v - r
    return bootstrap(lambda i: d[i].mean(-1), len(d), **kwargs)


def win_rate_interval(scores: Sequence[float], reference_scores: Sequence[float], **kwargs) -> Interval:
    """Share of prompts where a model's response scores above the reference's response; a tie counts half."""
    s, r = np.asarray(scores, dtype=np.float64), np.asarray(reference_scores, dtype=np.float64)
    wins = (s > r) + 0.5 * (s == r)
    return bootstrap(lambda i: wins[i].mean(-1), len(wins), **kwargs)


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    tokens = text.split()
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams in all texts (Li et al. 2016); whitespace tokens. 0 when there are none."""
    grams = [_ngrams(text, n) for text in texts]
    total = sum(len(g) for g in grams)
    return len({gram for g in grams for gram in g}) / total if total else 0.0


def distinct_n_interval(texts: Sequence[str], n: int, confidence: float = 0.95) -> Interval:
    """`distinct_n` with a normal interval from the delete-one jackknife's standard error (Efron & Tibshirani 1993,
    ch. 11). Not the bootstrap: a resample draws answers more than once, and a repeated answer repeats its n-grams,
    so resampled distinct-n sits far below the sample's (0.47 against 0.71 on 550 answers) and a percentile
    interval would miss it. Leaving answer i out removes its n-grams from the total and, from the distinct ones,
    those that occur nowhere else."""
    from scipy.stats import norm

    grams = [_ngrams(text, n) for text in texts]
    counts = Counter(gram for g in grams for gram in g)
    total, seen = sum(counts.values()), len(counts)
    value = seen / total if total else 0.0
    if len(texts) < 2:
        return Interval(value, value, value)
    left_out = np.array([(seen - sum(1 for gram, c in Counter(g).items() if counts[gram] == c)) / (total - len(g))
                         if total > len(g) else 0.0 for g in grams])
    k = len(texts)
    se = math.sqrt((k - 1) / k * float(((left_out - left_out.mean()) ** 2).sum()))
    z = float(norm.ppf((1 + confidence) / 2))
    return Interval(value, value - z * se, value + z * se)


def format_interval(value: dict[str, float] | None, digits: int = 3, signed: bool = False) -> str:
    """`0.123 [0.101, 0.140]`; `-` for a metric that does not apply."""
    if value is None:
        return "-"
    f = f"{{:{'+' if signed else ''}.{digits}f}}".format
    return f"{f(value['value'])} [{f(value['low'])}, {f(value['high'])}]"
