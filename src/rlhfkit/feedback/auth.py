"""Who is asking: accounts (usernames, password hashing with argon2), login sessions, API tokens, known browsers,
CSRF tokens, roles, and the login rate limit.

Browsers authenticate with an HttpOnly, SameSite=Lax session cookie and must send the session's CSRF token with
every state-changing request (form field `csrf_token` or header `X-CSRF-Token`). Scripts send
`Authorization: Bearer <token>`; a browser cannot attach that header cross-site, so token requests need no CSRF.
Tokens expire; they act with their user's role but cannot manage users or tokens (that takes a browser login).
Deactivating a user, resetting or changing their password end their sessions and revoke their tokens.
Passwords are NFKC-normalised before hashing and checking, so that one password typed on keyboards that compose
characters differently is one password.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import re
import secrets
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import Depends, HTTPException, Request
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from rlhfkit.feedback.common_passwords import COMMON_PASSWORDS
from rlhfkit.feedback.db import ROLES, ApiToken, Assignment, AuthSession, LoginDevice, User, utcnow

SESSION_COOKIE = "rlhfkit_session"
LOGIN_CSRF_COOKIE = "rlhfkit_login_csrf"  # double-submit token for the login form (no session exists yet)
DEVICE_COOKIE = "rlhfkit_device"  # marks a browser that has logged in as its user before
SESSION_LIFETIME = dt.timedelta(hours=12)
DEVICE_LIFETIME = dt.timedelta(days=180)
TOKEN_USE_RECORDED_EVERY = dt.timedelta(minutes=5)  # last-used times are that coarse, to spare the database writes
MIN_PASSWORD_LENGTH, MAX_PASSWORD_LENGTH = 8, 1024
TOKEN_DAYS, MAX_TOKEN_DAYS = 90, 365  # the default lifetime of a new API token, and the server's default limit
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
# ASCII letters, digits, '.', '_', '-': no look-alikes (Cyrillic a, zero-width spaces, combining accents), and one
# account per name whatever its case (the lower-case form is unique).
USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
USERNAME_RULE = "a username has 1 to 64 characters: letters a-z and A-Z, digits, '.', '_' or '-', starting with a letter or digit"

_hasher = PasswordHasher()


def username_key(username: str) -> str:
    """The form usernames are compared in: lower case."""
    return username.lower()


def check_username(username: str) -> str:
    if not USERNAME.fullmatch(username):
        raise ValueError(USERNAME_RULE)
    return username


def normalized(password: str) -> str:
    """The form passwords are hashed and checked in: NFKC (é composed or not, full-width digits, ligatures)."""
    return unicodedata.normalize("NFKC", password)


def hash_password(password: str, username: str) -> str:
    """The hash of `password` for the account `username`; raises ValueError saying what the policy refuses."""
    password = normalized(password)
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise ValueError(f"the password needs {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters")
    if any(ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF for c in password):
        raise ValueError("the password holds a control character; use printable characters and spaces")
    if password.casefold() in COMMON_PASSWORDS:
        raise ValueError("the password is one of the most common passwords (the first an attacker tries); choose another")
    if len(username) >= 3 and username.casefold() in password.casefold():
        raise ValueError("the password must not contain the username")
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """With password_hash=None (no such user), a hash is checked all the same, so the answer takes as long as for
    a real user and the timing does not tell which usernames exist. A hash stored before passwords were
    normalised is of the password as typed: that is tried second."""
    tried = dict.fromkeys([normalized(password), password])
    return any(_verify(password_hash, p) for p in tried) and password_hash is not None


def _verify(password_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(password_hash or _dummy_hash(), password)
    except (VerificationError, InvalidHashError):
        return False


@functools.cache
def _dummy_hash() -> str:
    return _hasher.hash(secrets.token_urlsafe(16))


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def find_user(db: Session, username: str) -> User | None:
    """The account `username` names, in any case; None for no account (or a name no account can have)."""
    if not USERNAME.fullmatch(username):
        return None  # never sent to the database: it may hold what PostgreSQL refuses (NUL)
    return db.scalar(select(User).where(User.username_key == username_key(username)))


class UserExists(ValueError):
    """The username is taken (in some case)."""


def create_user(db: Session, username: str, password: str, role: str) -> User:
    """A new account. Raises ValueError for a bad name, password or role, UserExists for a name taken in any case;
    between two simultaneous requests, the unique index on the lower-case name decides (IntegrityError)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    check_username(username)
    if find_user(db, username) is not None:
        raise UserExists(f"user {username!r} exists already (usernames are compared without case)")
    user = User(username=username, username_key=username_key(username), password_hash=hash_password(password, username),
                role=role)
    db.add(user)
    db.flush()
    return user


def set_password(db: Session, user: User, password: str, keep_session: AuthSession | None = None) -> None:
    """Change `user`'s password, end their other logins (all of them when an admin resets it) and revoke their
    API tokens (whoever knew the old password may have made one)."""
    user.password_hash = hash_password(password, user.username)
    ended = delete(AuthSession).where(AuthSession.user_id == user.id)
    if keep_session is not None:
        ended = ended.where(AuthSession.id != keep_session.id)
    db.execute(ended)
    revoke_tokens(db, user)


def set_active(db: Session, user: User, active: bool) -> None:
    """Deactivate (end the logins, revoke the tokens, give back the held items) or reactivate an account (with
    no token: new ones are made for it)."""
    user.active = active
    if not active:
        db.execute(delete(AuthSession).where(AuthSession.user_id == user.id))
        db.execute(delete(Assignment).where(Assignment.user_id == user.id))
        revoke_tokens(db, user)


def revoke_tokens(db: Session, user: User) -> None:
    """Revoke every API token of `user` not revoked yet (they stay listed, with when they were stopped)."""
    db.execute(update(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
               .values(revoked_at=utcnow()))


def create_session(db: Session, user: User) -> str:
    """A new login for `user`; returns the cookie value (the only copy of the token)."""
    db.execute(delete(AuthSession).where(AuthSession.expires_at <= utcnow()))  # tidy up logins long expired
    token = new_token()
    db.add(AuthSession(token_hash=token_hash(token), user_id=user.id, csrf_token=new_token(),
                       expires_at=utcnow() + SESSION_LIFETIME))
    return token


def create_api_token(db: Session, user: User, name: str, days: int = TOKEN_DAYS) -> str:
    """A bearer token for `user`, valid for `days`; returns the token (its only copy)."""
    token = new_token()
    db.add(ApiToken(token_hash=token_hash(token), user_id=user.id, name=name,
                    expires_at=utcnow() + dt.timedelta(days=days)))
    return token


def known_device(db: Session, request: Request, user: User) -> LoginDevice | None:
    """The LoginDevice of this browser's device cookie, if it is `user`'s and still valid."""
    cookie = request.cookies.get(DEVICE_COOKIE)
    if not cookie:
        return None
    device = db.scalar(select(LoginDevice).where(LoginDevice.token_hash == token_hash(cookie)))
    return device if device is not None and device.user_id == user.id and device.expires_at > utcnow() else None


def create_device(db: Session, user: User) -> str:
    """Remember this browser for `user`; returns the cookie value."""
    db.execute(delete(LoginDevice).where(LoginDevice.user_id == user.id, LoginDevice.expires_at <= utcnow()))
    token = new_token()
    db.add(LoginDevice(token_hash=token_hash(token), user_id=user.id, expires_at=utcnow() + DEVICE_LIFETIME))
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


def _token_principal(db: Session, token: str) -> Principal | None:
    now = utcnow()
    api_token = db.scalar(select(ApiToken).where(ApiToken.token_hash == token_hash(token)))
    if api_token is None or not api_token.usable(now) or not api_token.user.active:
        return None
    if api_token.last_used_at is None or api_token.last_used_at < now - TOKEN_USE_RECORDED_EVERY:
        db.execute(update(ApiToken).where(ApiToken.id == api_token.id).values(last_used_at=now))
        db.commit()
    return Principal(api_token.user, None)


def current_session(db: Session, request: Request) -> AuthSession | None:
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    session = db.scalar(select(AuthSession).where(AuthSession.token_hash == token_hash(cookie)))
    return session if session is not None and session.expires_at > utcnow() and session.user.active else None


def optional_principal(request: Request, db: Session = Depends(get_db)) -> Principal | None:
    token = _bearer(request)
    if token is not None:
        return _token_principal(db, token)
    session = current_session(db, request)
    return Principal(session.user, session) if session is not None else None


def require_user(principal: Principal | None = Depends(optional_principal)) -> Principal:
    if principal is None:
        raise LoginRequired()
    return principal


def require_admin(principal: Principal = Depends(require_user)) -> Principal:
    if not principal.is_admin:
        raise HTTPException(403, "admins only")
    return principal


def require_admin_login(principal: Principal = Depends(require_admin)) -> Principal:
    """An admin in a browser: users and tokens are managed there only, so that a leaked API token cannot make
    admins, reset passwords or mint more tokens."""
    if principal.session is None:
        raise HTTPException(403, "users and API tokens are managed in the browser, logged in as an admin, not with an API token")
    return principal


async def csrf_sent(request: Request) -> str | None:
    """The CSRF token a state-changing browser request carries (header `X-CSRF-Token`, else the form field
    `csrf_token`). Reading the body is awaited here, so that the check itself needs no event loop."""
    if request.method not in STATE_CHANGING or _bearer(request) is not None:
        return None
    sent = request.headers.get("x-csrf-token")
    if sent is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        sent = (await request.form()).get("csrf_token")
    return sent if isinstance(sent, str) else None


def verify_csrf(request: Request, sent: str | None = Depends(csrf_sent), db: Session = Depends(get_db)) -> None:
    """App-wide dependency: every state-changing request carries the right CSRF token (or is a token request).
    A plain function, so FastAPI runs it in the threadpool: its database query never blocks the event loop."""
    if request.method not in STATE_CHANGING or _bearer(request) is not None:
        return
    session = current_session(db, request)
    expected = session.csrf_token if session is not None else request.cookies.get(LOGIN_CSRF_COOKIE)
    if not expected or sent is None or not secrets.compare_digest(sent.encode("utf-8", "replace"), expected.encode()):
        raise HTTPException(403, "CSRF token missing or wrong (the session may have ended); reload the page and try again")


class LoginRateLimiter:
    """At most `limit` failed logins per `window` seconds per key (an account, a known browser, a client address).

    `reserve` counts an attempt as failed *before* the password is checked, under a lock, so parallel guesses
    cannot all pass the check; a successful login releases its reservation. Keys whose failures have all aged out
    are forgotten (swept once per window), so the memory held is bounded by the failures of one window.
    """

    def __init__(self, limit: int = 5, window: float = 300.0, clock: Callable[[], float] = time.monotonic):
        self.limit, self.window, self.clock = limit, window, clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        self._last_sweep = clock()

    def __len__(self) -> int:
        """How many keys are remembered."""
        return len(self._failures)

    def reserve(self, key: str) -> Reservation | None:
        """A reservation of one failure for `key`, or None when `key` is at its limit."""
        now = self.clock()
        with self._lock:
            self._sweep(now)
            failures = self._failures.setdefault(key, deque())
            while failures and failures[0] <= now - self.window:
                failures.popleft()
            if len(failures) >= self.limit:
                return None
            failures.append(now)
            return Reservation(self, key, now)

    def _release(self, key: str, at: float) -> None:
        with self._lock:
            failures = self._failures.get(key)
            if failures is not None and at in failures:
                failures.remove(at)
                if not failures:
                    del self._failures[key]

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < self.window:
            return
        self._last_sweep = now
        for key in [k for k, failures in self._failures.items() if not failures or failures[-1] <= now - self.window]:
            del self._failures[key]


@dataclass
class Reservation:
    """One attempt counted as failed until released."""

    limiter: LoginRateLimiter
    key: str
    at: float

    def release(self) -> None:
        """The attempt succeeded (or was refused elsewhere): it does not count."""
        self.limiter._release(self.key, self.at)
