"""Quality control: control items (items with a known ranking, mixed into the queue unannounced) and each
annotator's accuracy on them.

A control item's known answer is a ranking of its completions, ties allowed: a known best completion is rank 1
with the others tied at 2; a known order ranks them all. An annotator's accuracy is the share of the known
answers' decided pairs (a above b) that they ordered the same way (a strictly above b), over all the control
items they answered: the same pair-level measure as their agreement with the consensus.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import combinations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from rlhfkit.feedback.db import Annotation, Item, Project


@dataclass
class ControlScore:
    answers: int  # control items answered
    agreed: int  # known pairs ordered as known
    pairs: int  # known pairs seen

    @property
    def accuracy(self) -> float | None:
        return self.agreed / self.pairs if self.pairs else None


def known_ranks(given: dict[int, int], k: int) -> list[int]:
    """The known ranking from ranks given for some completions (position -> rank): those not given are tied
    after the last given (so one completion given rank 1 is "the known best"). Raises ValueError when it decides
    no pair."""
    if any(not 0 <= position < k for position in given) or any(r < 1 for r in given.values()):
        raise ValueError(f"give ranks from 1 to completions 0..{k - 1}")
    after = max(given.values(), default=0) + 1
    ranks = [given.get(position, after) for position in range(k)]
    if len(set(ranks)) < 2:
        raise ValueError("the known answer must put some completion above another")
    return ranks


def decided_pairs(ranks: list[int]) -> list[tuple[int, int]]:
    """(better, worse) for every pair the ranking does not tie."""
    return [(i, j) if ranks[i] < ranks[j] else (j, i) for i, j in combinations(range(len(ranks)), 2) if ranks[i] != ranks[j]]


def control_scores(annotations: list[Annotation]) -> dict[str, ControlScore]:
    """Per annotator, their score on the control items among `annotations` (submitted answers that fit their item)."""
    agreed: Counter = Counter()
    pairs: Counter = Counter()
    answers: Counter = Counter()
    for a in annotations:
        known = a.item.control_ranks
        if known is None or a.ranks is None:
            continue
        name = a.user.username
        answers[name] += 1
        for better, worse in decided_pairs(known):
            pairs[name] += 1
            agreed[name] += a.ranks[better] < a.ranks[worse]
    return {name: ControlScore(answers[name], agreed[name], pairs[name]) for name in answers}


def annotators_below(scores: dict[str, ControlScore], everyone: set[str], min_accuracy: float) -> set[str]:
    """Who an export with `min_accuracy` leaves out: accuracy below it, or no control answer to judge by."""
    return {name for name in everyone if (s := scores.get(name)) is None or s.accuracy is None or s.accuracy < min_accuracy}


def control_item_count(db: Session, project: Project) -> int:
    return db.scalar(select(func.count()).select_from(Item)
                     .where(Item.project_id == project.id, Item.control_ranks.is_not(None)))
