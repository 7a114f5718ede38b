"""Admin pages: projects (settings, members, archiving, imports, sampling job, control items, progress, agreement,
accuracy, export) and users (roles, deactivation, password resets, API tokens)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import RedirectResponse
from pydantic import ValidationError
from sqlalchemy import delete, desc, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from rlhfkit.errors import DataError
from rlhfkit.feedback.annotations import MIN_COMPLETIONS, item_or_404, project_or_404
from rlhfkit.feedback.auth import (
    TOKEN_DAYS, Principal, UserExists, create_api_token, create_user, find_user, get_db, require_admin,
    require_admin_login, set_active, set_password,
)
from rlhfkit.feedback.db import (
    QUESTIONS, ROLES, ApiToken, Assignment, Item, Job, Project, ProjectMember, User, utcnow,
)
from rlhfkit.feedback.export import EXPORTS
from rlhfkit.feedback.importing import import_completions, import_prompts
from rlhfkit.feedback.jobs import GenerationParams, JobRunning, check_model_name, start_generation
from rlhfkit.feedback.pages import render
from rlhfkit.feedback.quality import known_ranks
from rlhfkit.feedback.reports import project_report
from rlhfkit.feedback.routes_api import MinAccuracy, jsonl_response
from rlhfkit.feedback.schemas import Id, ProjectIn, Text

router = APIRouter(prefix="/admin")
Admin = Annotated[Principal, Depends(require_admin)]
AdminLogin = Annotated[Principal, Depends(require_admin_login)]  # users and tokens: a browser login, no API token
DB = Annotated[Session, Depends(get_db)]


def _errors(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, x['loc'])) or 'project'}: {x['msg'].removeprefix('Value error, ')}"
                     for x in e.errors())


def _annotators(db: Session) -> list[User]:
    return list(db.scalars(select(User).where(User.role == "annotator", User.active).order_by(User.username_key)))


def _home_page(request: Request, admin: Principal, db: Session, status_code: int = 200, typed: dict | None = None,
               **extra):
    projects = db.scalars(select(Project).order_by(Project.name)).all()
    typed = typed or {"k": 4, "annotators_per_item": 2, "questions": ["ranking", "ideal"], "control_percent": 10}
    return render(request, "admin_home.html", admin, projects=projects, questions=QUESTIONS, annotators=_annotators(db),
                  typed=typed, status_code=status_code, **extra)


@router.get("")
def admin_home(request: Request, admin: Admin, db: DB):
    return _home_page(request, admin, db)


def _members(db: Session, usernames: list[str]) -> list[User]:
    users = [find_user(db, name) for name in usernames]
    unknown = [name for name, user in zip(usernames, users) if user is None]
    if unknown:
        raise ValueError(f"members: no user named {', '.join(map(repr, unknown))}")
    return users


@router.post("/projects")
def create_project(request: Request, admin: Admin, db: DB, name: Annotated[str, Form()],
                   k: Annotated[int, Form()], annotators_per_item: Annotated[int, Form()],
                   guidelines: Annotated[str, Form()] = "", questions: Annotated[list[str], Form()] = (),
                   control_percent: Annotated[float, Form(ge=0, le=100)] = 10,
                   members: Annotated[list[str], Form()] = ()):
    typed = {"name": name, "k": k, "annotators_per_item": annotators_per_item, "guidelines": guidelines,
             "questions": list(questions), "control_percent": control_percent, "members": list(members)}

    def refused(status_code: int, error: str):  # the form comes back as it was filled in
        return _home_page(request, admin, db, status_code=status_code, error=error, typed=typed)

    try:
        spec = ProjectIn(name=name.strip(), guidelines=guidelines, k=k, annotators_per_item=annotators_per_item,
                         questions=list(questions), control_share=control_percent / 100)
        users = _members(db, list(members))
    except ValidationError as e:
        return refused(422, _errors(e))
    except ValueError as e:
        return refused(422, str(e))
    taken = f"a project named {spec.name!r} exists"
    if db.scalar(select(Project).where(Project.name == spec.name)):
        return refused(409, taken)
    project = Project(**spec.model_dump())
    db.add(project)
    try:
        db.flush()  # the unique name settles two simultaneous requests for one name
    except IntegrityError:
        db.rollback()
        return refused(409, taken)
    db.add_all(ProjectMember(project_id=project.id, user_id=user.id) for user in users)
    db.commit()
    return RedirectResponse(f"/admin/projects/{project.id}", status_code=303)


def _project_page(request: Request, admin: Principal, db: Session, project: Project, status_code: int = 200, **extra):
    jobs = db.scalars(select(Job).where(Job.project_id == project.id).order_by(desc(Job.id)).limit(5)).all()
    members = db.scalars(select(User).join(ProjectMember, ProjectMember.user_id == User.id)
                         .where(ProjectMember.project_id == project.id).order_by(User.username_key)).all()
    controls = db.scalars(select(Item).where(Item.project_id == project.id, Item.control_ranks.is_not(None))
                          .order_by(Item.position).limit(50)).all()
    return render(request, "admin_project.html", admin, project=project, report=project_report(db, project),
                  jobs=jobs, members=members, others=[u for u in _annotators(db) if u not in members],
                  controls=controls, status_code=status_code, **extra)


@router.get("/projects/{project_id}")
def project_page(request: Request, project_id: Id, admin: Admin, db: DB):
    return _project_page(request, admin, db, project_or_404(db, project_id))


def _back_to(project: Project) -> RedirectResponse:
    return RedirectResponse(f"/admin/projects/{project.id}", status_code=303)


@router.post("/projects/{project_id}/members")
def add_members(request: Request, project_id: Id, admin: Admin, db: DB, members: Annotated[list[str], Form()] = ()):
    project = project_or_404(db, project_id)
    try:
        users = _members(db, list(members))
    except ValueError as e:
        return _project_page(request, admin, db, project, status_code=422, error=str(e))
    for user in users:
        if db.get(ProjectMember, (project.id, user.id)) is None:
            db.add(ProjectMember(project_id=project.id, user_id=user.id))
    db.commit()
    return _back_to(project)


@router.post("/projects/{project_id}/members/{user_id}/remove")
def remove_member(project_id: Id, user_id: Id, admin: Admin, db: DB):
    """The annotator no longer sees the project; their answers stay, the items they held go back to the queue."""
    project = project_or_404(db, project_id)
    db.execute(delete(ProjectMember).where(ProjectMember.project_id == project.id, ProjectMember.user_id == user_id))
    held = select(Item.id).where(Item.project_id == project.id)
    db.execute(delete(Assignment).where(Assignment.user_id == user_id, Assignment.item_id.in_(held)))
    db.commit()
    return _back_to(project)


@router.post("/projects/{project_id}/archive")
def archive(project_id: Id, admin: Admin, db: DB, archived: Annotated[bool, Form()] = True):
    """Archived: hidden from annotators and closed to answers; the admin page and the exports stay."""
    project = project_or_404(db, project_id)
    project.archived_at = utcnow() if archived else None
    if archived:
        db.execute(delete(Assignment).where(Assignment.item_id.in_(select(Item.id).where(Item.project_id == project.id))))
    db.commit()
    return _back_to(project)


@router.post("/projects/{project_id}/control-share")
def set_control_share(project_id: Id, admin: Admin, db: DB, control_percent: Annotated[float, Form(ge=0, le=100)]):
    project = project_or_404(db, project_id)
    project.control_share = control_percent / 100
    db.commit()
    return _back_to(project)


@router.post("/projects/{project_id}/import/{what}")
def import_file(request: Request, project_id: Id, what: Literal["prompts", "completions"], admin: Admin, db: DB,
                file: Annotated[UploadFile, File()]):
    project = project_or_404(db, project_id)
    content = file.file.read()  # at most the app's body limit
    name = file.filename or f"{what}.jsonl"
    try:
        count = (import_prompts if what == "prompts" else import_completions)(db, project, name, content)
    except DataError as e:
        return _project_page(request, admin, db, project, status_code=422, error=str(e))
    except JobRunning as e:
        return _project_page(request, admin, db, project, status_code=409, error=str(e))
    return _project_page(request, admin, db, project, notice=f"imported {count} {what} records from {name}")


@router.post("/projects/{project_id}/generate")
def generate(request: Request, project_id: Id, admin: Admin, db: DB, model: Annotated[str, Form()],
             max_new_tokens: Annotated[int, Form()] = 128, temperature: Annotated[float, Form()] = 0.9,
             top_p: Annotated[float, Form()] = 0.95):
    project = project_or_404(db, project_id)
    try:
        params = GenerationParams(model=model.strip(), max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        params.model = check_model_name(params.model, request.app.state.model_dir)
    except ValidationError as e:
        return _project_page(request, admin, db, project, status_code=422, error=_errors(e))
    except ValueError as e:
        return _project_page(request, admin, db, project, status_code=422, error=f"model: {e}")
    try:
        start_generation(request.app.state.sessions, project, params, request.app.state.retrieval)
    except JobRunning as e:
        return _project_page(request, admin, db, project, status_code=409, error=str(e))
    return _back_to(project)


@router.get("/projects/{project_id}/export/{kind}")
def export(project_id: Id, kind: Literal["rankings", "pairs", "sft"], admin: Admin, db: DB,
           min_accuracy: float | None = MinAccuracy):
    project = project_or_404(db, project_id)
    return jsonl_response(EXPORTS[kind](db, project, min_accuracy=min_accuracy), filename=f"project{project.id}-{kind}.jsonl")


@router.get("/projects/{project_id}/items")
def find_item(project_id: Id, admin: Admin, db: DB, external_id: Annotated[Text, Query(max_length=200)]):
    """The item page of the item with this id (the id of the imported file, or the one given on import)."""
    project = project_or_404(db, project_id)
    item_id = db.scalar(select(Item.id).where(Item.project_id == project.id, Item.external_id == external_id))
    if item_id is None:
        raise HTTPException(404, f"no item with id {external_id!r} in this project")
    return RedirectResponse(f"/admin/projects/{project.id}/items/{item_id}", status_code=303)


def _item_page(request: Request, admin: Principal, db: Session, project: Project, item: Item, status_code: int = 200,
               **extra):
    return render(request, "admin_item.html", admin, project=project, item=item, status_code=status_code, **extra)


@router.get("/projects/{project_id}/items/{item_id}")
def item_page(request: Request, project_id: Id, item_id: Id, admin: Admin, db: DB):
    project = project_or_404(db, project_id)
    return _item_page(request, admin, db, project, item_or_404(db, project, item_id))


@router.post("/projects/{project_id}/items/{item_id}/control")
def mark_control(request: Request, project_id: Id, item_id: Id, admin: Admin, db: DB,
                 known: Annotated[list[str], Form()] = ()):
    """Make the item a control item with a known answer: one rank per completion in order, blank for "after the
    ranked ones" (so rank 1 alone means "the known best")."""
    project = project_or_404(db, project_id)
    item = item_or_404(db, project, item_id)
    try:
        if len(item.completions) < MIN_COMPLETIONS or len(known) != len(item.completions):
            raise ValueError(f"give a rank (or a blank) for each of the item's {len(item.completions)} completions")
        given = {position: int(rank) for position, rank in enumerate(known) if rank.strip()}
        item.control_ranks = known_ranks(given, len(item.completions))
    except ValueError as e:
        return _item_page(request, admin, db, project, item, status_code=422, error=f"known answer: {e}")
    db.commit()
    return _item_page(request, admin, db, project, item, notice="this item is a control item now")


@router.post("/projects/{project_id}/items/{item_id}/control/clear")
def clear_control(request: Request, project_id: Id, item_id: Id, admin: Admin, db: DB):
    project = project_or_404(db, project_id)
    item = item_or_404(db, project, item_id)
    item.control_ranks = None
    db.commit()
    return _item_page(request, admin, db, project, item, notice="this item is a regular item again")


def _users_page(request: Request, admin: Principal, db: Session, status_code: int = 200, **extra):
    users = db.scalars(select(User).order_by(User.username_key)).all()
    tokens = db.scalars(select(ApiToken).options(selectinload(ApiToken.user)).order_by(ApiToken.id)).all()
    return render(request, "admin_users.html", admin, users=users, tokens=tokens, roles=ROLES, now=utcnow(),
                  token_days=TOKEN_DAYS, max_token_days=request.app.state.max_token_days, status_code=status_code,
                  **extra)


@router.get("/users")
def users_page(request: Request, admin: AdminLogin, db: DB):
    return _users_page(request, admin, db)


@router.post("/users")
def add_user(request: Request, admin: AdminLogin, db: DB, username: Annotated[str, Form(max_length=64)],
             password: Annotated[str, Form(max_length=1024)], role: Annotated[str, Form()]):
    try:
        create_user(db, username.strip(), password, role)
        db.commit()
    except (UserExists, IntegrityError) as e:  # IntegrityError: the same name, created by a simultaneous request
        db.rollback()
        return _users_page(request, admin, db, status_code=409,
                           error=str(e) if isinstance(e, UserExists) else f"user {username.strip()!r} exists already")
    except ValueError as e:
        db.rollback()
        return _users_page(request, admin, db, status_code=422, error=str(e))
    return RedirectResponse("/admin/users", status_code=303)


def _user_or_404(db: Session, user_id: int) -> User:
    user = db.get(User, user_id)
    if user is None:
        raise HTTPException(404, "no such user")
    return user


@router.post("/users/{user_id}/role")
def set_role(request: Request, user_id: Id, admin: AdminLogin, db: DB, role: Annotated[str, Form()]):
    user = _user_or_404(db, user_id)
    if role not in ROLES:
        raise HTTPException(422, f"role must be one of {', '.join(ROLES)}")
    if user.id == admin.user.id and role != "admin":
        return _users_page(request, admin, db, status_code=422, error="you cannot take away your own admin role")
    user.role = role
    db.commit()
    return RedirectResponse("/admin/users", status_code=303)


@router.post("/users/{user_id}/active")
def set_user_active(request: Request, user_id: Id, admin: AdminLogin, db: DB, active: Annotated[bool, Form()]):
    """Deactivate an account (its logins end, its tokens are revoked, its held items go back) or reactivate it."""
    user = _user_or_404(db, user_id)
    if user.id == admin.user.id and not active:
        return _users_page(request, admin, db, status_code=422, error="you cannot deactivate your own account")
    set_active(db, user, active)
    db.commit()
    return RedirectResponse("/admin/users", status_code=303)


@router.post("/users/{user_id}/password")
def reset_password(request: Request, user_id: Id, admin: AdminLogin, db: DB, password: Annotated[str, Form(max_length=1024)]):
    """Set a new password (to hand to the user); all of the user's logins end and their tokens are revoked."""
    user = _user_or_404(db, user_id)
    try:
        set_password(db, user, password)
    except ValueError as e:
        return _users_page(request, admin, db, status_code=422, error=str(e))
    db.commit()
    return _users_page(request, admin, db,
                       notice=f"password of {user.username} reset; their logins have ended and their API tokens are revoked")


@router.post("/users/{user_id}/tokens")
def new_api_token(request: Request, user_id: Id, admin: AdminLogin, db: DB,
                  name: Annotated[Text, Form(max_length=100)] = "script", days: Annotated[int | None, Form()] = None):
    """A new token, valid for `days` (1 to the server's limit; by default 90 or the limit). The page shows it once
    and is never cached; an admin's token comes with a warning of what it can do."""
    user = _user_or_404(db, user_id)
    limit = request.app.state.max_token_days
    days = min(TOKEN_DAYS, limit) if days is None else days
    if not 1 <= days <= limit:
        return _users_page(request, admin, db, status_code=422,
                           error=f"days: a token is valid for 1 to {limit} days (this server's limit)")
    token = create_api_token(db, user, name.strip() or "script", days)
    db.commit()
    return _users_page(request, admin, db, new_token=token, token_user=user, token_days_valid=days)


@router.post("/tokens/{token_id}/revoke")
def revoke_token(token_id: Id, admin: AdminLogin, db: DB):
    token = db.get(ApiToken, token_id)
    if token is None:
        raise HTTPException(404, "no such token")
    token.revoked_at = token.revoked_at or utcnow()
    db.commit()
    return RedirectResponse("/admin/users", status_code=303)
