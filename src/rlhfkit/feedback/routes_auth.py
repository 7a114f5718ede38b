"""Login, logout, and one's own account (change the password, see and revoke one's API tokens)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import RedirectResponse
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from rlhfkit.feedback.auth import (
    DEVICE_COOKIE, DEVICE_LIFETIME, LOGIN_CSRF_COOKIE, SESSION_COOKIE, SESSION_LIFETIME, Principal, create_device,
    create_session, find_user, get_db, known_device, new_token, optional_principal, require_user, set_password,
    token_hash, username_key, verify_password,
)
from rlhfkit.feedback.db import ApiToken, AuthSession, utcnow
from rlhfkit.feedback.pages import render
from rlhfkit.feedback.schemas import Id

router = APIRouter()
TOO_MANY = "too many failed logins; wait a few minutes (a browser that has logged in to this account before is not held back)"


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
    """Failed logins are limited per client address and per account; a browser that logged in to the account
    before (its device cookie) has a limit of its own, so an attacker's failures cannot lock its owner out."""
    per_account, per_address = request.app.state.login_limits
    user = find_user(db, username)
    device = known_device(db, request, user) if user is not None else None
    address = per_address.reserve(request.client.host if request.client else "?")
    account = per_account.reserve(f"device:{device.id}" if device else f"user:{username_key(username)}")
    if address is None or account is None:
        for reservation in (address, account):
            if reservation is not None:
                reservation.release()
        raise HTTPException(429, TOO_MANY, headers={"Retry-After": "300"})
    # The hash is checked even for no such user, so that the time taken does not tell which accounts exist.
    if not verify_password(user.password_hash if user else None, password) or not user.active:
        return render(request, "login.html", None, status_code=401, next=_local(next), error="wrong username or password",
                      csrf_token=request.cookies.get(LOGIN_CSRF_COOKIE, ""))
    address.release()
    account.release()
    token = create_session(db, user)
    device_token = create_device(db, user) if device is None else None
    db.commit()
    response = RedirectResponse(_local(next), status_code=303)
    response.set_cookie(SESSION_COOKIE, token, max_age=int(SESSION_LIFETIME.total_seconds()), **_cookie_options(request))
    if device_token is not None:
        response.set_cookie(DEVICE_COOKIE, device_token, max_age=int(DEVICE_LIFETIME.total_seconds()),
                            **_cookie_options(request))
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


def account_page(request: Request, principal: Principal, db: Session, status_code: int = 200, **extra):
    tokens = db.scalars(select(ApiToken).where(ApiToken.user_id == principal.user.id).order_by(ApiToken.id)).all()
    return render(request, "account.html", principal, tokens=tokens, now=utcnow(), status_code=status_code, **extra)


@router.get("/account")
def account(request: Request, principal: Principal = Depends(require_user), db: Session = Depends(get_db)):
    return account_page(request, principal, db)


@router.post("/account/password")
def change_password(request: Request, current_password: Annotated[str, Form(max_length=1024)],
                    new_password: Annotated[str, Form(max_length=1024)], principal: Principal = Depends(require_user),
                    db: Session = Depends(get_db)):
    """A new password (the current one is asked again, at most 5 wrong in 5 minutes); the account's other browser
    logins end and its API tokens are revoked."""
    if principal.session is None:
        raise HTTPException(403, "change the password in the browser, not with an API token")
    per_account, _ = request.app.state.login_limits  # a stolen session cannot guess the password at leisure
    attempt = per_account.reserve(f"password-change:{principal.user.id}")
    if attempt is None:
        raise HTTPException(429, "too many wrong current passwords; wait a few minutes", headers={"Retry-After": "300"})
    if not verify_password(principal.user.password_hash, current_password):
        return account_page(request, principal, db, status_code=422, error="the current password is wrong")
    attempt.release()
    try:
        set_password(db, principal.user, new_password, keep_session=principal.session)
    except ValueError as e:
        return account_page(request, principal, db, status_code=422, error=str(e))
    db.commit()
    return account_page(request, principal, db,
                        notice="password changed; your other logins have ended and your API tokens are revoked")


@router.post("/account/tokens/{token_id}/revoke")
def revoke_own_token(request: Request, token_id: Id, principal: Principal = Depends(require_user),
                     db: Session = Depends(get_db)):
    token = db.get(ApiToken, token_id)
    if token is None or token.user_id != principal.user.id:
        raise HTTPException(404, "no such token of yours")
    token.revoked_at = token.revoked_at or utcnow()
    db.commit()
    return RedirectResponse("/account", status_code=303)
