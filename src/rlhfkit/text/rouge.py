"""ROUGE-L (Lin 2004): the F-measure of the longest common subsequence of words between an answer and a reference
answer, from Google's `rouge-score` package (lower-cased words, Porter stemming), in [0, 1]."""

from __future__ import annotations

from collections.abc import Sequence


def rouge_l(answers: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure of each answer against its reference (0 when either has no word)."""
    from rouge_score import rouge_scorer

    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, ans)["rougeL"].fmeasure for ans, ref in zip(answers, references)]
