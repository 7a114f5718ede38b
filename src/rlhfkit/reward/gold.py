"""The gold measures against the truth (rlhfkit.evaluation.gold) as rewards: an online trainer's `rewards:` with
weight 0 logs them beside the learned reward; `rlhfkit simulate` can rank by them; `rlhfkit reward score` scores
with them.

  similarity:PATH, rouge_l:PATH   against the ideal answer of the same prompt in PATH;
  facts:PATH                      fact recall, minus 1 when contradicted (keys 1 and 2 of the gold judge as one number).

PATH is a JSONL file of truth records, or a directory: all its *.jsonl files; the FACTS.md in the directory, or beside
the file, is the fact sheet.
"""

from __future__ import annotations

import torch

from rlhfkit.data.records import TruthRecord
from rlhfkit.errors import DataError
from rlhfkit.text.embedding import DEFAULT_EMBEDDER, load_embedder
from rlhfkit.text.facts import check_facts, has_fact_check, load_truth
from rlhfkit.text.rouge import rouge_l


class GoldReward:
    """A gold measure as a reward: `similarity`, `rouge_l` or `facts` of each response against its prompt's truth."""

    METRICS = ("similarity", "rouge_l", "facts")

    def __init__(self, metric: str, path: str, device: str | torch.device = "cpu", embedder: str = DEFAULT_EMBEDDER):
        if metric not in self.METRICS:
            raise ValueError(f"unknown truth metric {metric!r}; one of {self.METRICS}")
        self.truth, self.sheet = load_truth(path)
        needs = "facts" if metric == "facts" else "response"
        lacking = [p for p, t in self.truth.items() if getattr(t, needs) is None and (needs == "response" or t.answerable)]
        if len(lacking) == len(self.truth):
            raise DataError(f"{path}: no record has `{needs}`, which the {metric} reward needs")
        self.metric, self.path, self.name = metric, path, metric
        self.embedder = load_embedder(embedder, str(device)) if metric == "similarity" else None

    def _truths(self, prompts) -> list[TruthRecord]:
        try:
            return [self.truth[p] for p in prompts]
        except KeyError as e:
            raise DataError(f"{self.path} has no truth for the prompt {str(e.args[0])[:60]!r}: the {self.metric} "
                            "reward needs every scored prompt in it (a directory may hold several files)") from None

    def score(self, prompts, responses) -> torch.Tensor:
        truths = self._truths(list(prompts))
        if self.metric == "facts":
            unchecked = [t.prompt for t in truths if not has_fact_check(t)]
            if unchecked:
                raise DataError(f"{self.path}: the prompt {unchecked[0][:60]!r} has no `facts` to check answers against")
            values = []
            for response, t in zip(responses, truths):
                check = check_facts(response, t.facts or [], t.prompt, t.answerable, t.wrong or [], self.sheet)
                values.append(check.recall - float(check.contradicted))
        else:
            missing = [t.prompt for t in truths if t.response is None]
            if missing:
                raise DataError(f"{self.path}: the prompt {missing[0][:60]!r} has no ideal `response` to compare with")
            references = [t.response for t in truths]
            values = rouge_l(list(responses), references) if self.metric == "rouge_l" \
                else self.embedder.similarity(list(responses), references)
        return torch.tensor(values, dtype=torch.float32)
