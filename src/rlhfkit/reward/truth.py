"""The truth reward: a verifiable reward for a knowledge assistant, in the way Tülu 3 and DeepSeek-R1 reward
answers that can be checked (RLVR). Each answer is checked against its question's truth record (`facts`,
`answerable`, `wrong`) and the fact sheet (rlhfkit.text.facts), and scored

    r = w_facts * recall - w_contradiction * 1[contradicted]
        + w_declined * 1[declines and the question is unanswerable]
        - w_needless * 1[declines and the question is answerable]

  recall        the share of the question's facts the answer states (an unanswerable question's facts name
                whom to ask instead: pointing there counts);
  contradicted  the answer states something the fact sheet contradicts: a fact's number changed, a contact
                the sheet does not hold, one of the record's `wrong` statements (text.facts.check_facts);
  declines      the answer says it does not know (text.facts.abstains).

Default weights (1, 1, 1, 0.5): a right and complete answer scores 1; a wrong number costs 1 whatever else the
answer states (a fluent wrong answer scores below a silent one); on a question the sheet cannot answer, saying
so and whom to ask scores up to 2 and a confident guess at most 1; on one it can answer, "I don't know" costs
0.5, so it pays only where the model would otherwise state a wrong fact (-1). Contradictions are checked by
rule, so a wrong claim in other words goes unnoticed: the reward is a lower bound on what is wrong.

Prompts are looked up by their question: a plain string as it is, a conversation by its last user message, so
the reward scores the same with retrieval on (passages in the system message) and off. Spec:
`truth:PATH[?WEIGHT=VALUE&...]`, PATH a JSONL file of truth records (e.g. data/company/train.jsonl) or a directory
of them, with the FACTS.md beside the file or in the directory as the fact sheet; the weights by TruthWeights'
names, e.g. `truth:data/company/train.jsonl?needless=0.25`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from urllib.parse import parse_qsl

import torch

from rlhfkit.data.chat import as_messages, last_user_message
from rlhfkit.data.records import TruthRecord
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.text.facts import FactSheet, abstains, check_facts, load_truth


@dataclass(frozen=True)
class TruthWeights:
    facts: float = 1.0  # w_facts: per unit of recall
    contradiction: float = 1.0  # w_contradiction
    declined: float = 1.0  # w_declined: declining a question the sheet cannot answer
    needless: float = 0.5  # w_needless: declining one it can

    @classmethod
    def parse(cls, spec: str) -> tuple[str, TruthWeights]:
        """`PATH?needless=0.25&declined=2` -> (PATH, the weights with those changed)."""
        path, _, query = spec.partition("?")
        names = [f.name for f in fields(cls)]
        changes = {}
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key not in names:
                raise ConfigError(f"truth reward {spec!r}: unknown weight {key!r}; the weights are {', '.join(names)}")
            try:
                changes[key] = float(value)
            except ValueError:
                raise ConfigError(f"truth reward {spec!r}: weight {key}={value!r} is not a number") from None
        return path, replace(cls(), **changes)


def truth_score(answer: str, truth: TruthRecord, sheet: FactSheet | None,
                weights: TruthWeights = TruthWeights()) -> float:
    """r for one answer (the module docstring's formula)."""
    facts = truth.facts or []
    check = check_facts(answer, facts, truth.prompt, True, truth.wrong or [], sheet)
    recall = sum(check.stated) / len(facts) if facts else 0.0
    declines = abstains(answer)
    return (weights.facts * recall - weights.contradiction * check.contradicted
            + weights.declined * (declines and not truth.answerable)
            - weights.needless * (declines and truth.answerable))


def question(prompt: str | list) -> str:
    """What a prompt asks: a string as it is, a conversation's last user message (passages stay in the system)."""
    return prompt if isinstance(prompt, str) else last_user_message(as_messages(prompt))


class TruthReward:
    """`truth:PATH[?WEIGHT=VALUE&...]`: every answer scored against its question's truth (module docstring)."""

    def __init__(self, path: str, weights: TruthWeights = TruthWeights(), name: str = "truth"):
        self.truth, self.sheet = load_truth(path)
        checkable = [t for t in self.truth.values() if t.facts or not t.answerable]
        if not checkable:
            raise DataError(f"{path}: no record has `facts` or `answerable: false`, which the truth reward needs")
        self.path, self.weights, self.name = path, weights, name

    def _truth(self, prompt: str | list) -> TruthRecord:
        record = self.truth.get(question(prompt))
        if record is None or not (record.facts or not record.answerable):
            raise DataError(f"{self.path} has no facts for the question {question(prompt)[:60]!r}: the truth reward "
                            "needs `facts` or `answerable: false` for every prompt it scores")
        return record

    def score(self, prompts: Sequence, responses: Sequence[str]) -> torch.Tensor:
        values = [truth_score(r, self._truth(p), self.sheet, self.weights) for p, r in zip(prompts, responses)]
        return torch.tensor(values, dtype=torch.float32)
