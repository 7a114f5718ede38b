"""Who is asking: password hashing (argon2), login sessions, API tokens, CSRF tokens, roles, login rate limit.

Browsers authenticate with an HttpOnly, SameSite=Lax session cookie and must send the session's CSRF token with
every state-changing request (form field `csrf_token` or header `X-CSRF-Token`). Scripts send
`Authorization: Bearer <token>`; a browser cannot attach that header cross-site, so token requests need no CSRF.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import secrets
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import Depends, HTTPException, Request
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from rlhfkit.feedback.db import ROLES, ApiToken, AuthSession, User, utcnow

SESSION_COOKIE = "rlhfkit_session"
LOGIN_CSRF_COOKIE = "rlhfkit_login_csrf"  # double-submit token for the login form (no session exists yet)
SESSION_LIFETIME = dt.timedelta(hours=12)
MIN_PASSWORD_LENGTH = 8
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}

_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"the password needs at least {MIN_PASSWORD_LENGTH} characters")
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """With password_hash=None (no such user), a hash is checked all the same, so the answer takes as long as for
    a real user and the timing does not tell which usernames exist."""
    try:
        return _hasher.verify(password_hash or _dummy_hash(), password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


@functools.cache
def _dummy_hash() -> str:
    return _hasher.hash(secrets.token_urlsafe(16))


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_user(db: Session, username: str, password: str, role: str) -> User:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if not username.strip() or len(username) > 64:
        raise ValueError("the username must have 1 to 64 characters")
    if db.scalar(select(User).where(User.username == username)) is not None:
        raise ValueError(f"user {username!r} exists already")
    user = User(username=username, password_hash=hash_password(password), role=role)
    db.add(user)
    db.flush()
    return user


def create_session(db: Session, user: User) -> str:
    """A new login for `user`; returns the cookie value (the only copy of the token)."""
    db.execute(delete(AuthSession).where(AuthSession.expires_at <= utcnow()))  # tidy up logins long expired
    token = new_token()
    db.add(AuthSession(token_hash=token_hash(token), user_id=user.id, csrf_token=new_token(),
                       expires_at=utcnow() + SESSION_LIFETIME))
    return token


def create_api_token(db: Session, user: User, name: str) -> str:
    token = new_token()
    db.add(ApiToken(token_hash=token_hash(token), user_id=user.id, name=name))
    return token


@dataclass
class Principal:
    user: User
    session: AuthSession | None  # None when authenticated by an API token

    @property
    def is_admin(self) -> bool:
        return self.user.role == "admin"

    @property
    def csrf_token(self) -> str:
        return self.session.csrf_token if self.session else ""


class LoginRequired(Exception):
    """Raised by the auth dependencies; the app answers 401 for the API and a redirect to /login for pages."""


def get_db(request: Request):
    with request.app.state.sessions() as db:
        yield db


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def optional_principal(request: Request, db: Session = Depends(get_db)) -> Principal | None:
    token = _bearer(request)
    if token is not None:
        api_token = db.scalar(select(ApiToken).where(ApiToken.token_hash == token_hash(token)))
        return Principal(api_token.user, None) if api_token else None
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        session = db.scalar(select(AuthSession).where(AuthSession.token_hash == token_hash(cookie)))
        if session is not None and session.expires_at > utcnow():
            return Principal(session.user, session)
    return None


def require_user(principal: Principal | None = Depends(optional_principal)) -> Principal:
    if principal is None:
        raise LoginRequired()
    return principal


def require_admin(principal: Principal = Depends(require_user)) -> Principal:
    if not principal.is_admin:
        raise HTTPException(403, "admins only")
    return principal


async def verify_csrf(request: Request, db: Session = Depends(get_db)) -> None:
    """App-wide dependency: every state-changing request carries the right CSRF token (or is a token request)."""
    if request.method not in STATE_CHANGING or _bearer(request) is not None:
        return
    expected = None
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        session = db.scalar(select(AuthSession).where(AuthSession.token_hash == token_hash(cookie)))
        expected = session.csrf_token if session is not None else None
    if expected is None:
        expected = request.cookies.get(LOGIN_CSRF_COOKIE)
    sent = request.headers.get("x-csrf-token")
    if sent is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        sent = (await request.form()).get("csrf_token")
    if not expected or not isinstance(sent, str) or not secrets.compare_digest(sent, expected):
        raise HTTPException(403, "CSRF token missing or wrong; reload the page and try again")


class LoginRateLimiter:
    """At most `limit` failed logins per `window` seconds per key (a username, a client address)."""

    def __init__(self, limit: int = 5, window: float = 300.0):
        self.limit, self.window = limit, window
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        failures = self._failures[key]
        while failures and failures[0] < now - self.window:
            failures.popleft()
        return failures

    def blocked(self, key: str) -> bool:
        with self._lock:
            return len(self._recent(key, time.monotonic())) >= self.limit

    def failed(self, key: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._recent(key, now).append(now)
