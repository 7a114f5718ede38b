"""Exports in the formats of DESIGN.md, read by the trainers as is: per-annotator rankings, consensus pairs
(the majority rule of rlhfkit.data.preference, the same code `rlhfkit reward train` uses) and SFT examples.

Control items are tests of the annotators, not data: their answers are left out. With `min_accuracy`, so are the
answers of annotators whose accuracy on the control items is below it (or who answered none). Answers that do
not fit their item (a database written before answers to items without completions were refused) are left out
and counted on the project page.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from rlhfkit.data.preference import RankingRecord, consolidate_rankings
from rlhfkit.feedback.annotations import MIN_COMPLETIONS
from rlhfkit.feedback.db import Annotation, Item, Project
from rlhfkit.feedback.quality import annotators_below, control_scores


def submitted_annotations(db: Session, project: Project) -> list[Annotation]:
    """Every submitted answer of the project that fits its item, control items included."""
    return [a for a in db.scalars(
        select(Annotation).join(Item).where(Item.project_id == project.id, Annotation.status == "submitted")
        .options(selectinload(Annotation.item).selectinload(Item.completions), selectinload(Annotation.user))
        .order_by(Item.position, Annotation.id)) if fits_item(a)]


def fits_item(annotation: Annotation) -> bool:
    """Whether each per-completion answer has one entry per completion of an item that can be compared."""
    k = len(annotation.item.completions)
    return k >= MIN_COMPLETIONS and all(
        answer is None or len(answer) == k for answer in (annotation.ranks, annotation.ratings, annotation.flags))


def data_annotations(answers: list[Annotation], min_accuracy: float | None = None) -> list[Annotation]:
    """Of `answers`, those that are data: not to control items, and (with `min_accuracy`) from annotators at or
    above it."""
    left_out: set[str] = set()
    if min_accuracy is not None:
        left_out = annotators_below(control_scores(answers), {a.user.username for a in answers}, min_accuracy)
    return [a for a in answers if a.item.control_ranks is None and a.user.username not in left_out]


def _data(db: Session, project: Project, min_accuracy: float | None) -> list[Annotation]:
    return data_annotations(submitted_annotations(db, project), min_accuracy)


def ranking_record(annotation: Annotation) -> RankingRecord:
    item = annotation.item
    return RankingRecord(prompt=item.prompt, completions=[c.text for c in item.completions], ranks=annotation.ranks,
                         annotator=annotation.user.username, id=item.external_id)


def ranking_records(annotations: list[Annotation]) -> list[RankingRecord]:
    return [ranking_record(a) for a in annotations if a.ranks is not None]


def export_rankings(db: Session, project: Project, min_accuracy: float | None = None) -> list[dict[str, Any]]:
    return [r.model_dump() for r in ranking_records(_data(db, project, min_accuracy))]


def export_consensus_pairs(db: Session, project: Project, min_accuracy: float | None = None) -> list[dict[str, Any]]:
    """One pair per couple of completions that the annotators' majority decided; ties give no pair."""
    items = consolidate_rankings(ranking_records(_data(db, project, min_accuracy)))
    return [p.model_dump(exclude_defaults=True) for item in items for p in item.to_pair_records()]


def export_sft(db: Session, project: Project, min_accuracy: float | None = None) -> list[dict[str, Any]]:
    """Each written or edited ideal response as a prompt/response example."""
    return [{"prompt": a.item.prompt, "response": a.ideal_response}
            for a in _data(db, project, min_accuracy) if a.ideal_response]


EXPORTS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "rankings": export_rankings,
    "pairs": export_consensus_pairs,
    "sft": export_sft,
}
