"""The annotator's pages: their projects, the next item (blind: nobody's answers but one's own are ever shown),
submit (a ranking needs an interaction or an explicit "all equal"), revise until the item closes, skip,
guidelines. A refused answer comes back as the same page with the error and everything that was typed."""

from __future__ import annotations

import random
from dataclasses import dataclass

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import RedirectResponse
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.datastructures import FormData

from rlhfkit.feedback.annotations import (
    AnswerError, Refused, is_closed, item_or_404, my_answers, next_item, progress, project_or_404, require_completions,
    save_annotation,
)
from rlhfkit.feedback.auth import Principal, get_db, require_user
from rlhfkit.feedback.db import HARM_FLAGS, RATING_ASPECTS, Annotation, Completion, Item, Project, ProjectMember, User
from rlhfkit.feedback.pages import render
from rlhfkit.feedback.schemas import AnnotationIn, Id

router = APIRouter()
PAIRWISE_RANKS = {"a": [1, 2], "b": [2, 1], "tie": [1, 1]}
RANK_FIRST = "ranking: rank the completions first: move at least one card (drag it, or Tab to it and press ↑/↓), or choose “All equal”"


@dataclass
class Draft:
    """What the annotate form held, read leniently (so that a refused answer can be shown again as typed).
    Lists run over completion positions; None where nothing was given."""

    ranks: list[int | None]
    ratings: list[dict[str, int]]
    flags: list[list[str]]
    pairwise: str | None = None
    ideal_response: str | None = None
    all_equal: bool = False

    @property
    def ranked(self) -> bool:
        return all(r is not None for r in self.ranks)


def _int(value) -> int | None:
    try:
        return int(value) if isinstance(value, str) and value.strip() and len(value) < 10 else None
    except ValueError:
        return None


def read_form(form: FormData, k: int) -> Draft:
    ratings = [{a: v for a in RATING_ASPECTS if (v := _int(form.get(f"rating_{i}_{a}"))) is not None} for i in range(k)]
    ideal = form.get("ideal_response")
    return Draft(ranks=[_int(form.get(f"rank_{i}")) for i in range(k)], ratings=ratings,
                 flags=[[f for f in form.getlist(f"flag_{i}") if f in HARM_FLAGS] for i in range(k)],
                 pairwise=form.get("pairwise") if form.get("pairwise") in PAIRWISE_RANKS else None,
                 ideal_response=ideal if isinstance(ideal, str) else None, all_equal=form.get("all_equal") == "1")


def answer_of(project: Project, draft: Draft, form: FormData) -> AnnotationIn:
    """The draft as an answer for the project's questions; raises AnswerError saying what is missing."""
    asked = set(project.questions)
    data: dict = {}
    if "ranking" in asked:
        if draft.all_equal:
            data["ranks"] = [1] * len(draft.ranks)
        elif draft.ranked:
            data["ranks"] = draft.ranks
        else:
            raise AnswerError(RANK_FIRST)
    if "pairwise" in asked:
        if draft.pairwise is None:
            raise AnswerError("pairwise: choose the better completion, or “Equally good”")
        data["ranks"] = PAIRWISE_RANKS[draft.pairwise]
    if "ratings" in asked:
        missing = [i for i, r in enumerate(draft.ratings) if len(r) != len(RATING_ASPECTS)]
        if missing:
            raise AnswerError(f"ratings: rate {', '.join(RATING_ASPECTS)} of every completion (missing on "
                              f"{len(missing)} of them)")
        data["ratings"] = draft.ratings
    if "flags" in asked and "flags_shown" in form:
        data["flags"] = draft.flags
    if "ideal" in asked and draft.ideal_response is not None:
        data["ideal_response"] = draft.ideal_response
    try:
        return AnnotationIn.model_validate(data)
    except ValidationError as e:
        raise AnswerError("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg'].removeprefix('Value error, ')}"
                                    for x in e.errors())) from None


def shown_order(user: User, item: Item) -> list[Completion]:
    """The completions in the order this person sees them: fixed per person and item, so position bias averages out."""
    shown = list(item.completions)
    random.Random(f"{user.id}:{item.id}").shuffle(shown)
    return shown


def _order_changed(user: User, item: Item, ranks: list[int] | None, project: Project) -> bool | None:
    """Whether a ranking differs from the one the cards' first order would give (None where nothing is ordered)."""
    if ranks is None or "ranking" not in project.questions:
        return None
    untouched = {c.position: n for n, c in enumerate(shown_order(user, item), start=1)}
    return ranks != [untouched[p] for p in range(len(ranks))]


def draft_of(annotation: Annotation) -> Draft:
    """One's stored answer as a draft, to revise it."""
    k = len(annotation.item.completions)
    ranks = annotation.ranks or [None] * k
    pairwise = None
    if annotation.ranks and len(annotation.ranks) == 2:
        pairwise = {(1, 2): "a", (2, 1): "b", (1, 1): "tie"}.get(tuple(annotation.ranks))
    return Draft(ranks=list(ranks), ratings=annotation.ratings or [{} for _ in range(k)],
                 flags=annotation.flags or [[] for _ in range(k)], pairwise=pairwise,
                 ideal_response=annotation.ideal_response)


@dataclass
class Card:
    """A completion as the annotate page shows it: its letter (from the order first shown, so it never changes),
    the rank shown (None until the annotator ranks), and whether it is tied with the card above."""

    completion: Completion
    letter: str
    rank: int | None = None
    tied: bool = False


def _cards(user: User, item: Item, draft: Draft | None) -> list[Card]:
    """The cards in display order: the order first shown, or the draft's ranking when it has one."""
    cards = [Card(c, "ABCDEFGHIJ"[n]) for n, c in enumerate(shown_order(user, item))]
    if draft is None or not (draft.ranked or draft.all_equal):
        return cards
    ranks = [1] * len(cards) if draft.all_equal else draft.ranks
    cards.sort(key=lambda card: ranks[card.completion.position])
    for n, card in enumerate(cards):
        card.rank = ranks[card.completion.position]
        card.tied = n > 0 and card.rank == cards[n - 1].rank
    return cards


def annotate_page(request: Request, db: Session, principal: Principal, project: Project, item: Item | None,
                  draft: Draft | None = None, revising: bool = False, status_code: int = 200, error: str | None = None):
    return render(request, "annotate.html", principal, project=project, item=item, draft=draft, revising=revising,
                  cards=_cards(principal.user, item, draft) if item is not None else [],
                  progress=progress(db, project, principal.user), answers=my_answers(db, project, principal.user),
                  aspects=RATING_ASPECTS, harm_flags=HARM_FLAGS, status_code=status_code, error=error)


@router.get("/")
def home(request: Request, principal: Principal = Depends(require_user), db: Session = Depends(get_db)):
    query = select(Project).where(Project.archived_at.is_(None)).order_by(Project.name)
    if not principal.is_admin:
        query = query.join(ProjectMember, ProjectMember.project_id == Project.id).where(
            ProjectMember.user_id == principal.user.id)
    rows = [(p, progress(db, p, principal.user)) for p in db.scalars(query)]
    return render(request, "home.html", principal, rows=rows)


@router.get("/projects/{project_id}/guidelines")
def guidelines(request: Request, project_id: Id, principal: Principal = Depends(require_user),
               db: Session = Depends(get_db)):
    return render(request, "guidelines.html", principal, project=project_or_404(db, project_id, principal))


@router.get("/projects/{project_id}/annotate")
def annotate(request: Request, project_id: Id, principal: Principal = Depends(require_user),
             db: Session = Depends(get_db)):
    project = project_or_404(db, project_id, principal)
    return annotate_page(request, db, principal, project, next_item(db, project, principal.user))


@router.get("/projects/{project_id}/items/{item_id}/revise")
def revise_page(request: Request, project_id: Id, item_id: Id, principal: Principal = Depends(require_user),
                db: Session = Depends(get_db)):
    project = project_or_404(db, project_id, principal)
    item = item_or_404(db, project, item_id)
    mine = db.scalar(select(Annotation).where(Annotation.item_id == item.id, Annotation.user_id == principal.user.id,
                                              Annotation.status == "submitted"))
    if mine is None:
        raise HTTPException(404, "you have not answered this item")
    if is_closed(db, project, item):
        raise HTTPException(409, "this item has all its answers: answers to it can no longer be revised")
    return annotate_page(request, db, principal, project, item, draft=draft_of(mine), revising=True)


async def form_data(request: Request) -> FormData:
    return await request.form()


@router.post("/projects/{project_id}/items/{item_id}/submit")
def submit(request: Request, project_id: Id, item_id: Id, form: FormData = Depends(form_data),
           principal: Principal = Depends(require_user), db: Session = Depends(get_db)):
    project = project_or_404(db, project_id, principal)
    item = item_or_404(db, project, item_id)
    try:
        require_completions(item)
    except Refused as e:  # no cards to show the answer on again: an error page
        raise HTTPException(409, str(e)) from None
    draft = read_form(form, len(item.completions))
    revising = form.get("mode") == "revise"
    try:
        answer = answer_of(project, draft, form)
        save_annotation(db, project, item, principal.user, answer, revise=revising,
                        order_changed=_order_changed(principal.user, item, answer.ranks, project))
    except (AnswerError, Refused) as e:
        db.rollback()
        return annotate_page(request, db, principal, project, item, draft=draft, revising=revising,
                             status_code=422 if isinstance(e, AnswerError) else 409, error=str(e))
    return RedirectResponse(f"/projects/{project_id}/annotate", status_code=303)


@router.post("/projects/{project_id}/items/{item_id}/skip")
def skip(project_id: Id, item_id: Id, principal: Principal = Depends(require_user), db: Session = Depends(get_db)):
    project = project_or_404(db, project_id, principal)
    try:
        save_annotation(db, project, item_or_404(db, project, item_id), principal.user, None)
    except Refused as e:
        raise HTTPException(409, str(e)) from None
    return RedirectResponse(f"/projects/{project_id}/annotate", status_code=303)
