"""The annotator's side: the queue, answer validation, submission and skip (each one transaction), progress."""

from __future__ import annotations

import datetime as dt

from fastapi import HTTPException
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rlhfkit.feedback.db import RATING_ASPECTS, Annotation, Assignment, Completion, Item, Project, User, utcnow
from rlhfkit.feedback.schemas import AnnotationIn, ProgressOut

MIN_COMPLETIONS = 2  # an item is served once it has something to compare
ASSIGNMENT_LIFETIME = dt.timedelta(minutes=30)  # after that, an unanswered item goes back to the queue


class AnswerError(ValueError):
    """The answer does not fit the item or the project's questions (HTTP 422)."""


class AlreadyAnswered(Exception):
    """This person has answered or skipped this item already (HTTP 409)."""


def project_or_404(db: Session, project_id: int) -> Project:
    project = db.get(Project, project_id)
    if project is None:
        raise HTTPException(404, "no such project")
    return project


def item_or_404(db: Session, project: Project, item_id: int) -> Item:
    item = db.get(Item, item_id)
    if item is None or item.project_id != project.id:
        raise HTTPException(404, "no such item in this project")
    return item


def _open_items(project: Project, user: User, now: dt.datetime):
    """Items of `project` this person has neither answered nor skipped, that still need annotators once the
    answers in and the items handed to others (and not yet answered) are counted."""
    submitted = (select(Annotation.item_id, func.count().label("n")).where(Annotation.status == "submitted")
                 .group_by(Annotation.item_id).subquery())
    held = (select(Assignment.item_id, func.count().label("n"))
            .where(Assignment.expires_at > now, Assignment.user_id != user.id).group_by(Assignment.item_id).subquery())
    ready = select(Completion.item_id).group_by(Completion.item_id).having(func.count() >= MIN_COMPLETIONS)
    mine = select(Annotation.item_id).where(Annotation.user_id == user.id)
    taken = func.coalesce(submitted.c.n, 0) + func.coalesce(held.c.n, 0)
    return (select(Item).outerjoin(submitted, submitted.c.item_id == Item.id).outerjoin(held, held.c.item_id == Item.id)
            .where(Item.project_id == project.id, Item.id.not_in(mine), Item.id.in_(ready),
                   taken < project.annotators_per_item)
            .order_by(taken.desc(), Item.position))  # finish started items first, so complete items accumulate


def _lock_queue(db: Session, project: Project, user: User, now: dt.datetime) -> None:
    """Hand out one item at a time per project, so that concurrent annotators cannot all take the last free slot
    of the same item. PostgreSQL: lock the project's row. SQLite: the DELETE below is a write, which takes the
    database's write lock for the rest of this transaction (SQLite has one writer at a time)."""
    if db.get_bind().dialect.name == "postgresql":
        db.execute(select(Project.id).where(Project.id == project.id).with_for_update())
    db.execute(delete(Assignment).where(Assignment.user_id == user.id, Assignment.expires_at <= now))


def next_item(db: Session, project: Project, user: User) -> Item | None:
    """The item this person holds (reloading the page shows it again), else a new one, which they now hold."""
    now = utcnow()
    _lock_queue(db, project, user, now)
    item = db.scalar(select(Item).join(Assignment, Assignment.item_id == Item.id)
                     .where(Item.project_id == project.id, Assignment.user_id == user.id)
                     .order_by(Assignment.served_at).limit(1))
    if item is None:
        item = db.scalar(_open_items(project, user, now).limit(1))
        if item is not None:
            db.add(Assignment(item_id=item.id, user_id=user.id, served_at=now, expires_at=now + ASSIGNMENT_LIFETIME))
    db.commit()
    return item


def progress(db: Session, project: Project, user: User) -> ProgressOut:
    rows = dict(db.execute(
        select(Annotation.status, func.count()).join(Item).where(Item.project_id == project.id, Annotation.user_id == user.id)
        .group_by(Annotation.status)).all())
    available = db.scalar(select(func.count()).select_from(_open_items(project, user, utcnow()).subquery()))
    return ProgressOut(submitted=rows.get("submitted", 0), skipped=rows.get("skipped", 0), available=available)


def validate_answer(project: Project, item: Item, answer: AnnotationIn) -> None:
    """Every question the project asks is answered, in the right shape; questions it does not ask stay empty."""
    k = len(item.completions)
    asked = set(project.questions)
    if asked & {"ranking", "pairwise"}:
        if answer.ranks is None or len(answer.ranks) != k:
            raise AnswerError(f"ranks: give one rank per completion ({k})")
        if any(not 1 <= r <= k for r in answer.ranks):
            raise AnswerError(f"ranks: each rank is between 1 (best) and {k}")
    elif answer.ranks is not None:
        raise AnswerError("ranks: this project does not ask for a ranking")
    if "ratings" in asked:
        if answer.ratings is None or len(answer.ratings) != k:
            raise AnswerError(f"ratings: rate each of the {k} completions")
        for i, rating in enumerate(answer.ratings):
            if set(rating) != set(RATING_ASPECTS) or any(not 1 <= v <= 5 for v in rating.values()):
                raise AnswerError(f"ratings.{i}: rate {', '.join(RATING_ASPECTS)} from 1 to 5")
    elif answer.ratings is not None:
        raise AnswerError("ratings: this project does not ask for ratings")
    if answer.flags is not None and ("flags" not in asked or len(answer.flags) != k):
        raise AnswerError(f"flags: one list of flags per completion ({k}), and only if the project asks for flags")
    if answer.ideal_response is not None and "ideal" not in asked:
        raise AnswerError("ideal_response: this project does not ask for one")


def save_annotation(db: Session, project: Project, item: Item, user: User, answer: AnnotationIn | None) -> Annotation:
    """Store an answer (or, with answer=None, a skip) and release the item's assignment, in one transaction.

    Time spent: the client's own measure if it sends one (scripts), else from when the item was handed out.
    """
    assignment = db.scalar(select(Assignment).where(Assignment.item_id == item.id, Assignment.user_id == user.id))
    seconds = answer.seconds_spent if answer is not None else None
    if seconds is None:
        seconds = (utcnow() - assignment.served_at).total_seconds() if assignment is not None else 0.0
    if answer is not None:
        validate_answer(project, item, answer)
        annotation = Annotation(item_id=item.id, user_id=user.id, status="submitted", ranks=answer.ranks,
                                ratings=answer.ratings, flags=answer.flags,
                                ideal_response=(answer.ideal_response or "").strip() or None, seconds_spent=seconds)
    else:
        annotation = Annotation(item_id=item.id, user_id=user.id, status="skipped", seconds_spent=seconds)
    db.add(annotation)
    if assignment is not None:
        db.delete(assignment)
    try:
        db.commit()
    except IntegrityError:  # the unique (item, user) constraint: a second answer from the same person
        db.rollback()
        raise AlreadyAnswered() from None
    return annotation
