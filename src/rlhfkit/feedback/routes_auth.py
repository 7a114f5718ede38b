"""Login and logout."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import RedirectResponse
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from rlhfkit.feedback.auth import (
    LOGIN_CSRF_COOKIE, SESSION_COOKIE, SESSION_LIFETIME, Principal, create_session, get_db, new_token,
    optional_principal, require_user, token_hash, verify_password,
)
from rlhfkit.feedback.db import AuthSession, User
from rlhfkit.feedback.pages import render

router = APIRouter()


def _local(path: str) -> str:
    """Only same-site paths after login (no open redirect to `//evil.example` or `https://...`)."""
    return path if path.startswith("/") and not path.startswith("//") and "\\" not in path else "/"


def _cookie_options(request: Request) -> dict:
    return {"httponly": True, "samesite": "lax", "secure": request.url.scheme == "https", "path": "/"}


@router.get("/login")
def login_page(request: Request, next: str = "/", principal: Principal | None = Depends(optional_principal)):
    # Logged in already: the form must carry the session's token, which the CSRF check expects then.
    csrf = principal.csrf_token if principal and principal.session else request.cookies.get(LOGIN_CSRF_COOKIE) or new_token()
    response = render(request, "login.html", principal, next=_local(next), csrf_token=csrf)
    response.set_cookie(LOGIN_CSRF_COOKIE, csrf, **_cookie_options(request))
    return response


@router.post("/login")
def login(request: Request, username: Annotated[str, Form(max_length=64)], password: Annotated[str, Form(max_length=1024)],
          next: Annotated[str, Form(max_length=2000)] = "/", db: Session = Depends(get_db)):
    per_user, per_address = request.app.state.login_limits
    user_key, address_key = username, request.client.host if request.client else "?"
    if per_user.blocked(user_key) or per_address.blocked(address_key):
        raise HTTPException(429, "too many failed logins; wait a few minutes", headers={"Retry-After": "300"})
    user = db.scalar(select(User).where(User.username == username))
    if not verify_password(user.password_hash if user else None, password):
        per_user.failed(user_key)
        per_address.failed(address_key)
        return render(request, "login.html", None, status_code=401, next=_local(next), error="wrong username or password",
                      csrf_token=request.cookies.get(LOGIN_CSRF_COOKIE, ""))
    token = create_session(db, user)
    db.commit()
    response = RedirectResponse(_local(next), status_code=303)
    response.set_cookie(SESSION_COOKIE, token, max_age=int(SESSION_LIFETIME.total_seconds()), **_cookie_options(request))
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
    return response


@router.post("/logout")
def logout(request: Request, principal: Principal = Depends(require_user), db: Session = Depends(get_db)):
    cookie = request.cookies.get(SESSION_COOKIE, "")
    db.execute(delete(AuthSession).where(AuthSession.token_hash == token_hash(cookie)))
    db.commit()
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
