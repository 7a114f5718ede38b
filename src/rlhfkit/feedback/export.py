"""Exports in the formats of DESIGN.md, read by the trainers as is: per-annotator rankings, consensus pairs
(the majority rule of rlhfkit.data.preference, the same code `rlhfkit reward train` uses) and SFT examples."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from rlhfkit.data.preference import RankingRecord, consolidate_rankings
from rlhfkit.feedback.db import Annotation, Item, Project


def submitted_annotations(db: Session, project: Project) -> list[Annotation]:
    return list(db.scalars(
        select(Annotation).join(Item).where(Item.project_id == project.id, Annotation.status == "submitted")
        .options(selectinload(Annotation.item).selectinload(Item.completions), selectinload(Annotation.user))
        .order_by(Item.position, Annotation.id)))


def ranking_record(annotation: Annotation) -> RankingRecord:
    item = annotation.item
    return RankingRecord(prompt=item.prompt, completions=[c.text for c in item.completions], ranks=annotation.ranks,
                         annotator=annotation.user.username, id=item.external_id)


def ranking_records(db: Session, project: Project) -> list[RankingRecord]:
    return [ranking_record(a) for a in submitted_annotations(db, project) if a.ranks is not None]


def export_rankings(db: Session, project: Project) -> list[dict[str, Any]]:
    return [r.model_dump() for r in ranking_records(db, project)]


def export_consensus_pairs(db: Session, project: Project) -> list[dict[str, Any]]:
    """One pair per couple of completions that the annotators' majority decided; ties give no pair."""
    items = consolidate_rankings(ranking_records(db, project))
    return [p.model_dump(exclude_defaults=True) for item in items for p in item.to_pair_records()]


def export_sft(db: Session, project: Project) -> list[dict[str, Any]]:
    """Each written or edited ideal response as a prompt/response example."""
    return [{"prompt": a.item.prompt, "response": a.ideal_response}
            for a in submitted_annotations(db, project) if a.ideal_response]


EXPORTS: dict[str, Callable[[Session, Project], list[dict[str, Any]]]] = {
    "rankings": export_rankings,
    "pairs": export_consensus_pairs,
    "sft": export_sft,
}
