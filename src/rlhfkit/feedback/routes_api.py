"""The JSON API, for scripts (Authorization: Bearer <token>) and the pages' JavaScript (cookie + X-CSRF-Token).
Bodies are read as strict JSON (schemas.parse_json)."""

from __future__ import annotations

import json
from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Response
from fastapi.responses import PlainTextResponse
from sqlalchemy.orm import Session

from rlhfkit.feedback.annotations import (
    AnswerError, Refused, item_or_404, next_item, progress, project_or_404, save_annotation,
)
from rlhfkit.feedback.auth import Principal, get_db, require_admin, require_user
from rlhfkit.feedback.db import Annotation, Item, Job, Project
from rlhfkit.feedback.export import EXPORTS
from rlhfkit.feedback.schemas import (
    AnnotationIn, AnnotationOut, CompletionOut, Id, ItemOut, JobOut, ProgressOut, StrictJSONRoute,
)

router = APIRouter(prefix="/api", route_class=StrictJSONRoute)
MinAccuracy = Query(None, ge=0, le=1, description="leave out annotators whose accuracy on control items is below this "
                                                  "(and those who answered none)")


def item_out(project: Project, item: Item) -> ItemOut:
    return ItemOut(id=item.id, project_id=project.id, prompt=item.prompt, context=item.context,
                   questions=project.questions,
                   completions=[CompletionOut(id=c.id, text=c.text) for c in item.completions])


def annotation_out(annotation: Annotation) -> AnnotationOut:
    return AnnotationOut(id=annotation.id, item_id=annotation.item_id, annotator=annotation.user.username,
                         status=annotation.status, ranks=annotation.ranks, ratings=annotation.ratings,
                         flags=annotation.flags, ideal_response=annotation.ideal_response,
                         seconds_spent=annotation.seconds_spent, revisions=annotation.revisions)


def store(db: Session, project: Project, item: Item, principal: Principal, answer: AnnotationIn | None,
          **options) -> Annotation:
    """Save, turning the service's refusals into HTTP answers (shared by the API and the pages)."""
    try:
        return save_annotation(db, project, item, principal.user, answer, **options)
    except AnswerError as e:
        raise HTTPException(422, str(e)) from None
    except Refused as e:
        raise HTTPException(409, str(e)) from None


@router.get("/me")
def me(principal: Principal = Depends(require_user)) -> dict[str, str]:
    return {"username": principal.user.username, "role": principal.user.role}


@router.get("/projects/{project_id}/next", response_model=ItemOut, responses={204: {"description": "nothing left"}})
def api_next(project_id: Id, principal: Principal = Depends(require_user), db: Session = Depends(get_db)):
    project = project_or_404(db, project_id, principal)
    item = next_item(db, project, principal.user)
    return item_out(project, item) if item else Response(status_code=204)


@router.post("/projects/{project_id}/items/{item_id}/annotations", status_code=201)
def api_submit(project_id: Id, item_id: Id, answer: AnnotationIn, principal: Principal = Depends(require_user),
               db: Session = Depends(get_db)) -> AnnotationOut:
    """Answer an item handed to you (409 if you have answered it already: PUT revises)."""
    project = project_or_404(db, project_id, principal)
    return annotation_out(store(db, project, item_or_404(db, project, item_id), principal, answer))


@router.put("/projects/{project_id}/items/{item_id}/annotations")
def api_revise(project_id: Id, item_id: Id, answer: AnnotationIn, principal: Principal = Depends(require_user),
               db: Session = Depends(get_db)) -> AnnotationOut:
    """Replace your answer to an item while it is open (until all its annotators have answered)."""
    project = project_or_404(db, project_id, principal)
    return annotation_out(store(db, project, item_or_404(db, project, item_id), principal, answer, revise=True))


@router.post("/projects/{project_id}/items/{item_id}/skip", status_code=201)
def api_skip(project_id: Id, item_id: Id, principal: Principal = Depends(require_user),
             db: Session = Depends(get_db)) -> AnnotationOut:
    project = project_or_404(db, project_id, principal)
    return annotation_out(store(db, project, item_or_404(db, project, item_id), principal, None))


@router.get("/projects/{project_id}/progress")
def api_progress(project_id: Id, principal: Principal = Depends(require_user), db: Session = Depends(get_db)) -> ProgressOut:
    return progress(db, project_or_404(db, project_id, principal), principal.user)


@router.get("/annotations/{annotation_id}")
def api_annotation(annotation_id: Id, principal: Principal = Depends(require_user),
                   db: Session = Depends(get_db)) -> AnnotationOut:
    annotation = db.get(Annotation, annotation_id)
    if annotation is None:
        raise HTTPException(404, "no such annotation")
    if annotation.user_id != principal.user.id and not principal.is_admin:
        raise HTTPException(403, "annotators see only their own answers")  # blind: no peeking at others
    return annotation_out(annotation)


@router.get("/projects/{project_id}/export/{kind}", response_class=PlainTextResponse)
def api_export(project_id: Id, kind: Literal["rankings", "pairs", "sft"], min_accuracy: float | None = MinAccuracy,
               _admin: Principal = Depends(require_admin), db: Session = Depends(get_db)) -> PlainTextResponse:
    return jsonl_response(EXPORTS[kind](db, project_or_404(db, project_id), min_accuracy=min_accuracy))


@router.get("/jobs/{job_id}")
def api_job(job_id: Id, _admin: Principal = Depends(require_admin), db: Session = Depends(get_db)) -> JobOut:
    job = db.get(Job, job_id)
    if job is None:
        raise HTTPException(404, "no such job")
    return JobOut(id=job.id, kind=job.kind, status=job.status, done=job.done, total=job.total, message=job.message)


def jsonl_response(records: list[dict], filename: str | None = None) -> PlainTextResponse:
    headers = {"content-disposition": f'attachment; filename="{filename}"'} if filename else None
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return PlainTextResponse(body, media_type="application/x-ndjson", headers=headers)
