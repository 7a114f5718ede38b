"""Admin pages: projects (settings, imports, generation job, progress, agreement, export) and users."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import RedirectResponse
from pydantic import ValidationError
from sqlalchemy import desc, select
from sqlalchemy.orm import Session

from rlhfkit.errors import DataError
from rlhfkit.feedback.annotations import project_or_404
from rlhfkit.feedback.auth import Principal, create_api_token, create_user, get_db, require_admin
from rlhfkit.feedback.db import QUESTIONS, ROLES, Job, Project, User
from rlhfkit.feedback.export import EXPORTS
from rlhfkit.feedback.importing import import_completions, import_prompts
from rlhfkit.feedback.jobs import GenerationParams, JobRunning, start_generation
from rlhfkit.feedback.pages import render
from rlhfkit.feedback.reports import project_report
from rlhfkit.feedback.routes_api import jsonl_response
from rlhfkit.feedback.schemas import ProjectIn

router = APIRouter(prefix="/admin")
Admin = Annotated[Principal, Depends(require_admin)]
DB = Annotated[Session, Depends(get_db)]


def _errors(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, x['loc'])) or 'project'}: {x['msg'].removeprefix('Value error, ')}"
                     for x in e.errors())


def _home_page(request: Request, admin: Principal, db: Session, status_code: int = 200, **extra):
    projects = db.scalars(select(Project).order_by(Project.name)).all()
    return render(request, "admin_home.html", admin, projects=projects, questions=QUESTIONS, status_code=status_code,
                  **extra)


@router.get("")
def admin_home(request: Request, admin: Admin, db: DB):
    return _home_page(request, admin, db)


@router.post("/projects")
def create_project(request: Request, admin: Admin, db: DB, name: Annotated[str, Form()],
                   k: Annotated[int, Form()], annotators_per_item: Annotated[int, Form()],
                   guidelines: Annotated[str, Form()] = "", questions: Annotated[list[str], Form()] = ()):
    try:
        spec = ProjectIn(name=name.strip(), guidelines=guidelines, k=k, annotators_per_item=annotators_per_item,
                         questions=list(questions))
    except ValidationError as e:
        return _home_page(request, admin, db, status_code=422, error=_errors(e))
    if db.scalar(select(Project).where(Project.name == spec.name)):
        return _home_page(request, admin, db, status_code=409, error=f"a project named {spec.name!r} exists")
    project = Project(**spec.model_dump())
    db.add(project)
    db.commit()
    return RedirectResponse(f"/admin/projects/{project.id}", status_code=303)


def _project_page(request: Request, admin: Principal, db: Session, project: Project, status_code: int = 200, **extra):
    jobs = db.scalars(select(Job).where(Job.project_id == project.id).order_by(desc(Job.id)).limit(5)).all()
    return render(request, "admin_project.html", admin, project=project, report=project_report(db, project),
                  jobs=jobs, status_code=status_code, **extra)


@router.get("/projects/{project_id}")
def project_page(request: Request, project_id: int, admin: Admin, db: DB):
    return _project_page(request, admin, db, project_or_404(db, project_id))


@router.post("/projects/{project_id}/import/{what}")
def import_file(request: Request, project_id: int, what: Literal["prompts", "completions"], admin: Admin, db: DB,
                file: Annotated[UploadFile, File()]):
    project = project_or_404(db, project_id)
    content = file.file.read()  # at most the app's body limit
    name = file.filename or f"{what}.jsonl"
    try:
        count = (import_prompts if what == "prompts" else import_completions)(db, project, name, content)
    except DataError as e:
        return _project_page(request, admin, db, project, status_code=422, error=str(e))
    return _project_page(request, admin, db, project, notice=f"imported {count} {what} records from {name}")


@router.post("/projects/{project_id}/generate")
def generate(request: Request, project_id: int, admin: Admin, db: DB, model: Annotated[str, Form()],
             max_new_tokens: Annotated[int, Form()] = 128, temperature: Annotated[float, Form()] = 0.9,
             top_p: Annotated[float, Form()] = 0.95):
    project = project_or_404(db, project_id)
    try:
        params = GenerationParams(model=model.strip(), max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    except ValidationError as e:
        return _project_page(request, admin, db, project, status_code=422, error=_errors(e))
    try:
        start_generation(request.app.state.sessions, project, params)
    except JobRunning as e:
        return _project_page(request, admin, db, project, status_code=409, error=str(e))
    return RedirectResponse(f"/admin/projects/{project_id}", status_code=303)


@router.get("/projects/{project_id}/export/{kind}")
def export(project_id: int, kind: Literal["rankings", "pairs", "sft"], admin: Admin, db: DB):
    project = project_or_404(db, project_id)
    return jsonl_response(EXPORTS[kind](db, project), filename=f"project{project.id}-{kind}.jsonl")


def _users_page(request: Request, admin: Principal, db: Session, status_code: int = 200, **extra):
    users = db.scalars(select(User).order_by(User.username)).all()
    return render(request, "admin_users.html", admin, users=users, roles=ROLES, status_code=status_code, **extra)


@router.get("/users")
def users_page(request: Request, admin: Admin, db: DB):
    return _users_page(request, admin, db)


@router.post("/users")
def add_user(request: Request, admin: Admin, db: DB, username: Annotated[str, Form(max_length=64)],
             password: Annotated[str, Form(max_length=1024)], role: Annotated[str, Form()]):
    try:
        create_user(db, username.strip(), password, role)
    except ValueError as e:
        db.rollback()
        return _users_page(request, admin, db, status_code=422, error=str(e))
    db.commit()
    return RedirectResponse("/admin/users", status_code=303)


def _user_or_404(db: Session, user_id: int) -> User:
    user = db.get(User, user_id)
    if user is None:
        raise HTTPException(404, "no such user")
    return user


@router.post("/users/{user_id}/role")
def set_role(request: Request, user_id: int, admin: Admin, db: DB, role: Annotated[str, Form()]):
    user = _user_or_404(db, user_id)
    if role not in ROLES:
        raise HTTPException(422, f"role must be one of {', '.join(ROLES)}")
    if user.id == admin.user.id and role != "admin":
        return _users_page(request, admin, db, status_code=422, error="you cannot take away your own admin role")
    user.role = role
    db.commit()
    return RedirectResponse("/admin/users", status_code=303)


@router.post("/users/{user_id}/tokens")
def new_api_token(request: Request, user_id: int, admin: Admin, db: DB, name: Annotated[str, Form(max_length=100)] = "script"):
    user = _user_or_404(db, user_id)
    token = create_api_token(db, user, name)
    db.commit()
    return _users_page(request, admin, db, new_token=token, token_user=user.username)
