"""The annotator's side: who may see a project, the queue (with control items mixed in), answer validation,
submission, revision and skip (each one transaction), progress.

Rules an answer must pass (in one transaction, the item's row locked): the project is open (not archived); the
item has completions; a first answer is to an item handed to this person and, unless it is a control item, one
that does not have all its annotators yet; a revision is of one's own answer to an item still open (an item
closes when it has as many answers as the project's annotators per item). Nothing an annotator sees tells a
control item from a regular one: not the item, not revising, not the progress counts.
"""

from __future__ import annotations

import datetime as dt
import random

from fastapi import HTTPException
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rlhfkit.feedback.auth import Principal
from rlhfkit.feedback.db import (
    RATING_ASPECTS, Annotation, Assignment, Completion, Item, Project, ProjectMember, User, utcnow, visible,
)
from rlhfkit.feedback.schemas import AnnotationIn, ProgressOut

MIN_COMPLETIONS = 2  # an item is served once it has something to compare
ASSIGNMENT_LIFETIME = dt.timedelta(minutes=30)  # after that, an unanswered item goes back to the queue


class AnswerError(ValueError):
    """The answer does not fit the item or the project's questions (HTTP 422)."""


class Refused(Exception):
    """The answer cannot be taken now, whatever it says (HTTP 409): the message says why."""


class AlreadyAnswered(Refused):
    """This person has answered or skipped this item already."""

    def __init__(self):
        super().__init__("you have answered or skipped this item already")


def is_member(db: Session, project: Project, user: User) -> bool:
    return db.get(ProjectMember, (project.id, user.id)) is not None


def project_or_404(db: Session, project_id: int, principal: Principal | None = None) -> Project:
    """The project; for an annotator (`principal` given) only a project they are a member of, else 404, so that
    other projects' names and ids do not leak."""
    project = db.get(Project, project_id)
    if project is None or (principal is not None and not principal.is_admin and not is_member(db, project, principal.user)):
        raise HTTPException(404, "no such project")
    return project


def item_or_404(db: Session, project: Project, item_id: int) -> Item:
    item = db.get(Item, item_id)
    if item is None or item.project_id != project.id or not _is_visible(db, item):
        raise HTTPException(404, "no such item in this project")
    return item


def require_completions(item: Item) -> None:
    """Refused unless the item has completions enough to compare."""
    if len(item.completions) < MIN_COMPLETIONS:
        raise Refused("this item has no completions yet: it cannot be answered")


def _is_visible(db: Session, item: Item) -> bool:
    return item.import_job_id is None or bool(db.scalar(select(visible(Item.import_job_id)).where(Item.id == item.id)))


def ready_items():
    """Ids of items with enough (finished) completions to be compared."""
    return (select(Completion.item_id).where(visible(Completion.import_job_id)).group_by(Completion.item_id)
            .having(func.count() >= MIN_COMPLETIONS))


def submitted_counts():
    return (select(Annotation.item_id, func.count().label("n")).where(Annotation.status == "submitted")
            .group_by(Annotation.item_id).subquery())


def _servable(project: Project, user: User):
    """Conditions on Item for items of `project` that `user` may be handed: finished, with completions, not
    answered or skipped by them."""
    mine = select(Annotation.item_id).where(Annotation.user_id == user.id)
    return (Item.project_id == project.id, visible(Item.import_job_id), Item.id.in_(ready_items()), Item.id.not_in(mine))


def _open_items(project: Project, user: User, now: dt.datetime):
    """Regular items `user` may be handed that still need annotators once the answers in and the items handed to
    others (and not yet answered) are counted; started items first, so complete items accumulate."""
    submitted = submitted_counts()
    held = (select(Assignment.item_id, func.count().label("n"))
            .where(Assignment.expires_at > now, Assignment.user_id != user.id).group_by(Assignment.item_id).subquery())
    taken = func.coalesce(submitted.c.n, 0) + func.coalesce(held.c.n, 0)
    return (select(Item).outerjoin(submitted, submitted.c.item_id == Item.id).outerjoin(held, held.c.item_id == Item.id)
            .where(*_servable(project, user), Item.control_ranks.is_(None), taken < project.annotators_per_item)
            .order_by(taken.desc(), Item.position))


def _open_controls(project: Project, user: User):
    """Control items `user` has not answered: every member answers each one (no annotator limit)."""
    return select(Item).where(*_servable(project, user), Item.control_ranks.is_not(None)).order_by(Item.position)


def lock_row(db: Session, model, row_id: int) -> None:
    """Serialise writers of one row's dependants until this transaction ends. PostgreSQL: lock the row (not its
    key, so inserts that reference it still go ahead). SQLite has one writer at a time: a write takes the
    database's write lock now, so that the checks that follow read what no one else can change until commit."""
    if db.get_bind().dialect.name == "postgresql":
        db.execute(select(model.id).where(model.id == row_id).with_for_update(key_share=True))
    else:
        db.execute(update(model).where(model.id == row_id).values(id=model.id))


def _control_turn(db: Session, project: Project, user: User) -> bool:
    """Whether this hand-out is a control item: a draw with probability `control_share`, seeded by the person and
    how many items they have answered, so it cannot be told from the outside and a reload does not change it."""
    answered = db.scalar(select(func.count()).select_from(Annotation).join(Item)
                         .where(Item.project_id == project.id, Annotation.user_id == user.id))
    return random.Random(f"{project.id}:{user.id}:{answered}").random() < project.control_share


def next_item(db: Session, project: Project, user: User) -> Item | None:
    """The item this person holds (reloading the page shows it again), else a new one, which they now hold.
    Control items are mixed in at the project's share, and only while regular items remain."""
    if project.archived_at is not None:
        return None
    now = utcnow()
    lock_row(db, Project, project.id)  # one hand-out at a time: concurrent annotators cannot all take the last slot
    db.execute(delete(Assignment).where(Assignment.user_id == user.id, Assignment.expires_at <= now))
    item = db.scalar(select(Item).join(Assignment, Assignment.item_id == Item.id)
                     .where(Item.project_id == project.id, Assignment.user_id == user.id)
                     .order_by(Assignment.served_at).limit(1))
    if item is None:
        item = db.scalar(_open_items(project, user, now).limit(1))
        if item is not None and _control_turn(db, project, user):
            item = db.scalar(_open_controls(project, user).limit(1)) or item
        if item is not None:
            db.add(Assignment(item_id=item.id, user_id=user.id, served_at=now, expires_at=now + ASSIGNMENT_LIFETIME))
    db.commit()
    return item


def progress(db: Session, project: Project, user: User) -> ProgressOut:
    rows = dict(db.execute(
        select(Annotation.status, func.count()).join(Item).where(Item.project_id == project.id, Annotation.user_id == user.id)
        .group_by(Annotation.status)).all())
    return ProgressOut(submitted=rows.get("submitted", 0), skipped=rows.get("skipped", 0),
                       available=_available(db, project, user))


def _available(db: Session, project: Project, user: User) -> int:
    """The items this person may still be handed: the regular items that need annotators and, while one is left,
    the control items they have not answered. A control answer lowers the count as any other answer does."""
    if project.archived_at is not None:
        return 0

    def count(query) -> int:
        return db.scalar(select(func.count()).select_from(query.subquery()))

    regular = count(_open_items(project, user, utcnow()))
    return regular + count(_open_controls(project, user)) if regular else 0


def is_closed(db: Session, project: Project, item: Item) -> bool:
    """No more revisions: the project is archived, or the item has its annotators' answers (a control item too,
    though every member answers it: it must close as a regular item would, or revising would tell it apart)."""
    if project.archived_at is not None:
        return True
    answers = db.scalar(select(func.count()).select_from(Annotation)
                        .where(Annotation.item_id == item.id, Annotation.status == "submitted"))
    return answers >= project.annotators_per_item


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


def _fill(annotation: Annotation, answer: AnnotationIn, order_changed: bool | None) -> None:
    annotation.ranks, annotation.ratings, annotation.flags = answer.ranks, answer.ratings, answer.flags
    annotation.ideal_response = (answer.ideal_response or "").strip() or None
    annotation.order_changed = order_changed


def save_annotation(db: Session, project: Project, item: Item, user: User, answer: AnnotationIn | None,
                    order_changed: bool | None = None, revise: bool = False) -> Annotation:
    """Store an answer (or, with answer=None, a skip) and release the item's assignment, in one transaction; with
    `revise`, a second answer by the same person replaces their first while the item is open.

    The time spent is from handing out to the first answer, as the server saw it.
    """
    if project.archived_at is not None:
        raise Refused("this project is archived: it takes no more answers")
    lock_row(db, Item, item.id)
    mine = db.scalar(select(Annotation).where(Annotation.item_id == item.id, Annotation.user_id == user.id))
    if mine is not None:
        if not revise or answer is None or mine.status != "submitted":
            raise AlreadyAnswered()
        if is_closed(db, project, item):
            raise Refused("this item has all its answers: answers to it can no longer be revised")
        validate_answer(project, item, answer)
        _fill(mine, answer, order_changed)
        mine.revisions, mine.updated_at = mine.revisions + 1, utcnow()
        db.commit()
        return mine
    require_completions(item)
    assignment = db.scalar(select(Assignment).where(Assignment.item_id == item.id, Assignment.user_id == user.id))
    if answer is not None:
        if assignment is None:
            raise Refused("this item was not handed to you: ask for the next item (GET .../next) and answer that")
        if item.control_ranks is None and is_closed(db, project, item):
            raise Refused("this item has all its annotators already: ask for the next item")
        validate_answer(project, item, answer)
    seconds = (utcnow() - assignment.served_at).total_seconds() if assignment is not None else 0.0
    annotation = Annotation(item_id=item.id, user_id=user.id, status="skipped" if answer is None else "submitted",
                            seconds_spent=seconds)
    if answer is not None:
        _fill(annotation, answer, order_changed)
    db.add(annotation)
    if assignment is not None:
        db.delete(assignment)
    try:
        db.commit()
    except IntegrityError:  # the unique (item, user) constraint: a second answer from the same person
        db.rollback()
        raise AlreadyAnswered() from None
    return annotation


def my_answers(db: Session, project: Project, user: User, limit: int = 10) -> list[tuple[Annotation, bool]]:
    """This person's latest answers in `project`, each with whether it can still be revised."""
    answers = db.scalars(select(Annotation).join(Item)
                         .where(Item.project_id == project.id, Annotation.user_id == user.id,
                                Annotation.status == "submitted")
                         .order_by(Annotation.id.desc()).limit(limit)).all()
    return [(a, not is_closed(db, project, a.item)) for a in answers]
