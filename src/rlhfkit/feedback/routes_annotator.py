"""The annotator's pages: projects, the next item (blind: nobody's answers but one's own are ever shown),
submit, skip, guidelines."""

from __future__ import annotations

import random

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import RedirectResponse
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from rlhfkit.feedback.annotations import item_or_404, next_item, progress, project_or_404
from rlhfkit.feedback.auth import Principal, get_db, require_user
from rlhfkit.feedback.db import HARM_FLAGS, RATING_ASPECTS, Project
from rlhfkit.feedback.pages import render
from rlhfkit.feedback.routes_api import store
from rlhfkit.feedback.schemas import AnnotationIn

router = APIRouter()
PAIRWISE_RANKS = {"a": [1, 2], "b": [2, 1], "tie": [1, 1]}


@router.get("/")
def home(request: Request, principal: Principal = Depends(require_user), db: Session = Depends(get_db)):
    projects = db.scalars(select(Project).order_by(Project.name)).all()
    rows = [(p, progress(db, p, principal.user)) for p in projects]
    return render(request, "home.html", principal, rows=rows)


@router.get("/projects/{project_id}/guidelines")
def guidelines(request: Request, project_id: int, principal: Principal = Depends(require_user),
               db: Session = Depends(get_db)):
    return render(request, "guidelines.html", principal, project=project_or_404(db, project_id))


@router.get("/projects/{project_id}/annotate")
def annotate(request: Request, project_id: int, principal: Principal = Depends(require_user),
             db: Session = Depends(get_db)):
    project = project_or_404(db, project_id)
    item = next_item(db, project, principal.user)
    shown = []
    if item is not None:
        # Each annotator sees the completions in their own fixed order, so position bias averages out.
        shown = list(item.completions)
        random.Random(f"{principal.user.id}:{item.id}").shuffle(shown)
    return render(request, "annotate.html", principal, project=project, item=item, shown=shown,
                  progress=progress(db, project, principal.user), aspects=RATING_ASPECTS, harm_flags=HARM_FLAGS)


async def answer_from_form(request: Request) -> AnnotationIn:
    """The annotate form's fields (named by completion position, whatever the order shown) as an AnnotationIn."""
    form = await request.form()
    try:
        k = int(form.get("k", "0"))
        if not 2 <= k <= 50:
            raise ValueError("k")
        data: dict = {}
        if "rank_0" in form:
            data["ranks"] = [int(form[f"rank_{i}"]) for i in range(k)]
        if "pairwise" in form:
            data["ranks"] = PAIRWISE_RANKS[form["pairwise"]]
        if f"rating_0_{RATING_ASPECTS[0]}" in form:
            data["ratings"] = [{a: int(form[f"rating_{i}_{a}"]) for a in RATING_ASPECTS} for i in range(k)]
        if "flags_shown" in form:
            data["flags"] = [form.getlist(f"flag_{i}") for i in range(k)]
        if "ideal_response" in form:
            data["ideal_response"] = form["ideal_response"]
        return AnnotationIn.model_validate(data)
    except (KeyError, ValueError, ValidationError) as e:
        raise HTTPException(422, f"the form is incomplete or malformed ({e})") from None


@router.post("/projects/{project_id}/items/{item_id}/submit")
def submit(project_id: int, item_id: int, answer: AnnotationIn = Depends(answer_from_form),
           principal: Principal = Depends(require_user), db: Session = Depends(get_db)):
    project = project_or_404(db, project_id)
    store(db, project, item_or_404(db, project, item_id), principal, answer)
    return RedirectResponse(f"/projects/{project_id}/annotate", status_code=303)


@router.post("/projects/{project_id}/items/{item_id}/skip")
def skip(project_id: int, item_id: int, principal: Principal = Depends(require_user), db: Session = Depends(get_db)):
    project = project_or_404(db, project_id)
    store(db, project, item_or_404(db, project, item_id), principal, None)
    return RedirectResponse(f"/projects/{project_id}/annotate", status_code=303)
