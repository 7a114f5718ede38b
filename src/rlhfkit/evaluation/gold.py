"""Answers judged against the truth (the human ideal answers and the facts), not against a learned reward.

Per answer to a prompt that has a truth record (`TruthRecord`: ideal `response`, `facts`, `answerable`, `wrong`):
  rouge_l, similarity   against the ideal answer (text.rouge, text.embedding);
  fact_recall           share of the facts stated, plus "I don't know" where the answer cannot be known;
  contradicted          states something the fact sheet contradicts (text.facts);
  declined              says it does not know (text.facts.abstains), counted apart for the questions the
                        knowledge source cannot answer (right) and for those it can (a needless refusal).

The gold judge prefers, of two answers to the same prompt:
  1. one that states nothing the fact sheet contradicts, over one that does;
  2. then the one with the higher fact recall;
  3. then the one closer in meaning to the ideal answer (higher semantic similarity);
and calls equal answers on all three a tie (half a win). A key the prompt's truth cannot give (no facts, no ideal
answer) is skipped. Honesty first, then completeness, then closeness: a fluent answer that names the wrong
number loses to a plain one that names none.

The same measures as rewards (`similarity:PATH`, `rouge_l:PATH`, `facts:PATH`): rlhfkit.reward.gold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfkit.data.records import TruthRecord, load_truth_records
from rlhfkit.errors import DataError
from rlhfkit.evaluation.metrics import difference_interval, format_interval, mean_interval
from rlhfkit.text.embedding import SentenceEmbedder, load_embedder
from rlhfkit.text.facts import FactSheet, abstains, check_facts, has_fact_check
from rlhfkit.text.rouge import rouge_l

@dataclass
class GoldScores:
    """One model's answers measured against the truth, in prompt order; None where the truth lacks what a measure
    needs."""

    rouge_l: list[float | None]
    similarity: list[float | None]
    fact_recall: list[float | None]
    contradicted: list[bool | None]
    contradictions: list[tuple[str, ...]]
    declined_unanswerable: list[bool | None]  # None where the question is answerable (or has no fact check)
    declined_answerable: list[bool | None]  # None where it is not

    def judge_key(self, i: int) -> tuple:
        """The gold judge's keys for answer i, most important first (see the module docstring)."""
        ok = None if self.contradicted[i] is None else not self.contradicted[i]
        return ok, self.fact_recall[i], self.similarity[i]

    def per_answer(self, i: int) -> dict[str, float]:
        """The measures of answer i that apply, as floats (for samples.jsonl)."""
        flags = {"contradicted": self.contradicted[i], "declined": self.declined_unanswerable[i]
                 if self.declined_answerable[i] is None else self.declined_answerable[i]}
        values = {"rouge_l": self.rouge_l[i], "similarity": self.similarity[i], "fact_recall": self.fact_recall[i],
                  **{k: None if v is None else float(v) for k, v in flags.items()}}
        return {k: v for k, v in values.items() if v is not None}


def score_against_truth(answers: list[str], truths: list[TruthRecord], embedder: SentenceEmbedder | None = None,
                        sheet: FactSheet | None = None) -> GoldScores:
    """Measure each answer against the truth of its prompt (`truths[i]` for `answers[i]`)."""
    if len(answers) != len(truths):
        raise ValueError(f"{len(answers)} answers for {len(truths)} truth records")
    n = len(answers)
    rouge, similarity = [None] * n, [None] * n
    with_reference = [i for i, t in enumerate(truths) if t.response is not None]
    if with_reference:
        picked, references = [answers[i] for i in with_reference], [truths[i].response for i in with_reference]
        embedder = embedder or load_embedder()
        for i, r, s in zip(with_reference, rouge_l(picked, references), embedder.similarity(picked, references)):
            rouge[i], similarity[i] = r, s
    recall, contradicted, found = [None] * n, [None] * n, [()] * n
    declined = {True: [None] * n, False: [None] * n}  # by whether the question is answerable
    for i, (answer, truth) in enumerate(zip(answers, truths)):
        if not has_fact_check(truth):
            continue
        check = check_facts(answer, truth.facts or [], truth.prompt, truth.answerable, truth.wrong or [], sheet)
        if truth.facts is not None or not truth.answerable:
            recall[i] = check.recall
        contradicted[i], found[i] = check.contradicted, check.contradictions
        declined[truth.answerable][i] = abstains(answer)
    return GoldScores(rouge, similarity, recall, contradicted, found, declined[False], declined[True])


def prefer(a: tuple, b: tuple) -> float:
    """1 if keys `a` win, 0 if `b` win, 0.5 for a tie; keys that either side lacks (None) are skipped."""
    for x, y in zip(a, b):
        if x is None or y is None or x == y:
            continue
        return 1.0 if x > y else 0.0
    return 0.5


def gold_outcomes(model: GoldScores, reference: GoldScores) -> list[float]:
    """Per prompt, the gold judge's verdict on the model's answer against the reference model's."""
    return [prefer(model.judge_key(i), reference.judge_key(i)) for i in range(len(model.rouge_l))]


# name in the summary -> (GoldScores field, label)
MEASURES = {"rouge_l": ("rouge_l", "ROUGE-L vs ideal answer"),
            "similarity": ("similarity", "similarity to ideal answer"),
            "fact_recall": ("fact_recall", "fact recall"),
            "contradiction_rate": ("contradicted", "states a contradicted fact"),
            "declined_unanswerable": ("declined_unanswerable", "unanswerable questions declined"),
            "declined_answerable": ("declined_answerable", "answerable questions declined")}


def _present(values: list) -> list[float]:
    return [float(v) for v in values if v is not None]


def summarise_gold(gold: dict[str, GoldScores], reference: str, **boot) -> dict[str, dict[str, Any]]:
    """Per model: each measure's mean with its interval, its paired change against the reference model, and the
    gold win rate against the reference model's answers (ties half); None where no prompt has the truth needed."""
    summary = {}
    for name, scores in gold.items():
        m: dict[str, Any] = {"gold_changes": {} if name != reference else None}
        for key, (attr, _) in MEASURES.items():
            values, ref_values = getattr(scores, attr), getattr(gold[reference], attr)
            present = _present(values)
            m[key] = mean_interval(present, **boot).as_dict() if present else None
            if name != reference and present:
                pairs = [(float(v), float(r)) for v, r in zip(values, ref_values) if v is not None and r is not None]
                m["gold_changes"][key] = difference_interval(*zip(*pairs), **boot).as_dict()
        judged = any(k is not None for i in range(len(scores.rouge_l)) for k in scores.judge_key(i))
        m["gold_win_rate_vs_reference"] = (mean_interval(gold_outcomes(scores, gold[reference]), **boot).as_dict()
                                           if judged else None)
        summary[name] = m
    return summary


def _verdict(interval: dict[str, float], null: float) -> str:
    if interval["low"] > null:
        return "up"
    if interval["high"] < null:
        return "down"
    return "no clear change"


def what_moved(metrics: dict[str, dict[str, Any]], reference: str) -> list[str]:
    """Per model against the reference, a heading line and one indented line per judgement (reward model, gold
    judge, gold measures) with its interval and whether it moved: up or down when the interval excludes
    no-change (0.5 for win rates, 0 for changes), else "no clear change"."""
    lines = []
    for name, m in metrics.items():
        if name == reference:
            continue
        parts = []
        for key, label in (("win_rate_vs_reference", "reward-model win rate"), ("gold_win_rate_vs_reference",
                                                                                "gold win rate")):
            if m.get(key):
                parts.append(f"{label} {format_interval(m[key], 2)}: {_verdict(m[key], 0.5)}")
        for key, change in (m.get("gold_changes") or {}).items():
            parts.append(f"{MEASURES[key][1]} {format_interval(change, 3, signed=True)}: {_verdict(change, 0.0)}")
        if parts:
            lines += [f"{name} vs {reference}:"] + [f"  {p}" for p in parts]
    return lines


def eval_truth(prompts_source: str, prompts: list[str], facts_sheet: str | Path | None
               ) -> tuple[list[TruthRecord] | None, FactSheet | None]:
    """The truth records of an evaluation's prompts (a JSONL file whose records carry `response` or `facts`; else
    None), in prompt order, and the fact sheet read from `facts_sheet` (checked before any answer is sampled)."""
    sheet = None
    if facts_sheet is not None:
        if not Path(facts_sheet).is_file():
            raise DataError(f"fact sheet {facts_sheet} not found")
        sheet = FactSheet.from_text(Path(facts_sheet).read_text(encoding="utf-8"))
    if not Path(prompts_source).is_file():
        return None, sheet
    truths = load_truth_records(prompts_source)[: len(prompts)]
    if [t.prompt for t in truths] != prompts:
        raise DataError(f"{prompts_source}: its records do not line up with the evaluation's prompts")
    if not any(t.response is not None or has_fact_check(t) for t in truths):
        return None, sheet
    return truths, sheet
