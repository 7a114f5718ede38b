"""What the admin sees of a project: progress, per-annotator statistics and agreement per question."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from rlhfkit.feedback.agreement import consensus_agreement, krippendorff_alpha, pairwise_agreement
from rlhfkit.feedback.annotations import MIN_COMPLETIONS
from rlhfkit.feedback.db import HARM_FLAGS, RATING_ASPECTS, Annotation, Completion, Item, Project, User
from rlhfkit.feedback.export import ranking_record, submitted_annotations


@dataclass
class AnnotatorStats:
    username: str
    submitted: int
    skipped: int
    mean_seconds: float | None
    consensus_agreement: float | None


@dataclass
class AgreementRow:
    question: str
    metric: str
    alpha: float | None
    units: int  # units coded by at least two annotators


@dataclass
class ProjectReport:
    items: int
    ready: int  # items with completions
    complete: int  # items with all their annotators
    submitted: int
    pairwise_agreement: float | None
    agreement: list[AgreementRow]
    annotators: list[AnnotatorStats]


def _alpha_row(question: str, metric: str, units: dict) -> AgreementRow:
    values = list(units.values())
    return AgreementRow(question, metric, krippendorff_alpha(values, metric), sum(len(v) >= 2 for v in values))


def project_report(db: Session, project: Project) -> ProjectReport:
    annotations = submitted_annotations(db, project)
    records = [ranking_record(a) for a in annotations if a.ranks is not None]

    # Units of analysis: one per (item, completion) for ranks and ratings, per (item, completion, flag) for flags.
    rank_units, flag_units = defaultdict(list), defaultdict(list)
    rating_units: dict[str, defaultdict] = {aspect: defaultdict(list) for aspect in RATING_ASPECTS}
    for a in annotations:
        for i, rank in enumerate(a.ranks or []):
            rank_units[a.item_id, i].append(rank)
        for i, rating in enumerate(a.ratings or []):
            for aspect, value in rating.items():
                rating_units[aspect][a.item_id, i].append(value)
        if "flags" in project.questions:
            for i, flagged in enumerate(a.flags or [[] for _ in a.item.completions]):  # none sent: none raised
                for flag in HARM_FLAGS:
                    flag_units[a.item_id, i, flag].append(flag in flagged)
    agreement = []
    for question in ("ranking", "pairwise"):
        if question in project.questions:
            agreement.append(_alpha_row(question, "ordinal", rank_units))
    if "ratings" in project.questions:
        agreement += [_alpha_row(f"{aspect} (1-5)", "ordinal", rating_units[aspect]) for aspect in RATING_ASPECTS]
    if "flags" in project.questions:
        agreement.append(_alpha_row("harm flags", "nominal", flag_units))

    per_user = db.execute(
        select(User.username, Annotation.status, func.count(), func.avg(Annotation.seconds_spent))
        .join(Annotation.user).join(Annotation.item).where(Item.project_id == project.id)
        .group_by(User.username, Annotation.status)).all()
    with_consensus = consensus_agreement(records)
    stats: dict[str, AnnotatorStats] = {}
    for username, status, count, mean_seconds in per_user:
        s = stats.setdefault(username, AnnotatorStats(username, 0, 0, None, with_consensus.get(username)))
        if status == "submitted":
            s.submitted, s.mean_seconds = count, mean_seconds
        else:
            s.skipped = count

    counts = (select(Annotation.item_id, func.count().label("n")).where(Annotation.status == "submitted")
              .group_by(Annotation.item_id).subquery())
    ready = select(Completion.item_id).group_by(Completion.item_id).having(func.count() >= MIN_COMPLETIONS)
    in_project = Item.project_id == project.id
    return ProjectReport(
        items=db.scalar(select(func.count()).select_from(Item).where(in_project)),
        ready=db.scalar(select(func.count()).select_from(Item).where(in_project, Item.id.in_(ready))),
        complete=db.scalar(select(func.count()).select_from(Item).join(counts, counts.c.item_id == Item.id)
                           .where(in_project, counts.c.n >= project.annotators_per_item)),
        submitted=len(annotations),
        pairwise_agreement=pairwise_agreement(records),
        agreement=agreement,
        annotators=sorted(stats.values(), key=lambda s: s.username),
    )
