"""What the admin sees of a project: progress, per-annotator statistics (with accuracy on control items beside
agreement with the consensus) and agreement per question."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from rlhfkit.feedback.agreement import consensus_agreement, krippendorff_alpha, pairwise_agreement
from rlhfkit.feedback.annotations import ready_items, submitted_counts
from rlhfkit.feedback.db import HARM_FLAGS, RATING_ASPECTS, Annotation, Item, Project, User, visible
from rlhfkit.feedback.export import data_annotations, ranking_records, submitted_annotations
from rlhfkit.feedback.quality import control_item_count, control_scores


@dataclass
class AnnotatorStats:
    username: str
    submitted: int
    skipped: int
    mean_seconds: float | None
    consensus_agreement: float | None
    control_answers: int = 0
    control_accuracy: float | None = None
    kept_shown_order: float | None = None  # of their rankings made on the page, the share left in the order shown


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
    complete: int  # regular items with all their annotators
    controls: int  # control items
    submitted: int
    misfits: int  # stored answers that do not fit their item, left out of everything
    pairwise_agreement: float | None
    agreement: list[AgreementRow]
    annotators: list[AnnotatorStats]


def _alpha_row(question: str, metric: str, units: dict) -> AgreementRow:
    values = list(units.values())
    return AgreementRow(question, metric, krippendorff_alpha(values, metric), sum(len(v) >= 2 for v in values))


def _agreement(project: Project, annotations: list[Annotation]) -> list[AgreementRow]:
    """Krippendorff's alpha per question. Units of analysis: one per (item, completion) for ranks and ratings,
    per (item, completion, flag) for flags."""
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
    return agreement


def _annotator_stats(db: Session, project: Project, answers: list[Annotation], data: list[Annotation]) -> list[AnnotatorStats]:
    per_user = db.execute(
        select(User.username, Annotation.status, func.count(), func.avg(Annotation.seconds_spent))
        .join(Annotation.user).join(Annotation.item).where(Item.project_id == project.id)
        .group_by(User.username, Annotation.status)).all()
    with_consensus = consensus_agreement(ranking_records(data))
    controls = control_scores(answers)
    shown: Counter = Counter()
    kept: Counter = Counter()
    for a in answers:
        if a.order_changed is not None:
            shown[a.user.username] += 1
            kept[a.user.username] += not a.order_changed
    stats: dict[str, AnnotatorStats] = {}
    for username, status, count, mean_seconds in per_user:
        score = controls.get(username)
        s = stats.setdefault(username, AnnotatorStats(
            username, 0, 0, None, with_consensus.get(username), score.answers if score else 0,
            score.accuracy if score else None, kept[username] / shown[username] if shown[username] else None))
        if status == "submitted":
            s.submitted, s.mean_seconds = count, mean_seconds
        else:
            s.skipped = count
    return sorted(stats.values(), key=lambda s: s.username)


def project_report(db: Session, project: Project) -> ProjectReport:
    answers = submitted_annotations(db, project)
    data = data_annotations(answers)
    records = ranking_records(data)
    counts = submitted_counts()
    in_project = (Item.project_id == project.id, visible(Item.import_job_id))
    stored = db.scalar(select(func.count()).select_from(Annotation).join(Item)
                       .where(Item.project_id == project.id, Annotation.status == "submitted"))
    return ProjectReport(
        items=db.scalar(select(func.count()).select_from(Item).where(*in_project)),
        ready=db.scalar(select(func.count()).select_from(Item).where(*in_project, Item.id.in_(ready_items()))),
        complete=db.scalar(select(func.count()).select_from(Item).join(counts, counts.c.item_id == Item.id)
                           .where(*in_project, Item.control_ranks.is_(None), counts.c.n >= project.annotators_per_item)),
        controls=control_item_count(db, project),
        submitted=len(answers),
        misfits=stored - len(answers),
        pairwise_agreement=pairwise_agreement(records),
        agreement=_agreement(project, data),
        annotators=_annotator_stats(db, project, answers, data),
    )
