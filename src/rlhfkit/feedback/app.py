"""The FastAPI application: storage, middleware (body size limit, security and cache headers), routes, and the
error answers: 4xx for every bad request (never 500), 503 with Retry-After when the database is busy."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from urllib.parse import quote

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DataError as StorageDataError
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rlhfkit.feedback import routes_admin, routes_annotator, routes_api, routes_auth
from rlhfkit.feedback.auth import MAX_TOKEN_DAYS, LoginRateLimiter, LoginRequired, optional_principal, verify_csrf
from rlhfkit.feedback.db import make_engine, make_sessionmaker, migrate
from rlhfkit.feedback.importing import remove_all_leftovers, stop_unfinished_imports
from rlhfkit.feedback.jobs import interrupt_unfinished_jobs
from rlhfkit.feedback.pages import render

logger = logging.getLogger(__name__)
MAX_BODY_BYTES = 20 * 1024 * 1024  # the largest upload (a prompts or completions file)
RETRY_AFTER_SECONDS = 5
SECURITY_HEADERS = [
    # Scripts only from our own static files: even if some text escaped escaping, it could not run.
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                 b"frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]
# Pages and API answers hold private data (new tokens, answers, exports): no cache keeps them.
NO_STORE = (b"cache-control", b"no-store")
# SQLSTATEs of PostgreSQL's waits given up: lock_not_available, deadlock_detected, serialization_failure,
# query_canceled; class 08 is a lost connection.
TRANSIENT_SQLSTATES = {"55P03", "40P01", "40001", "57014"}


class LimitsAndHeaders:
    """ASGI middleware: 413 for bodies over `max_body_bytes` (declared or streamed), security headers on every reply,
    `Cache-Control: no-store` on every reply but static files."""

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._too_large(send)
        received, answered = 0, False
        cache = [] if scope["path"].startswith("/static/") else [NO_STORE]

        async def limited_receive() -> Message:
            # A streamed body that grows too large: answer 413 now and tell the app the client has gone.
            nonlocal received, answered
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes and not answered:
                answered = True
                await self._too_large(send)
                return {"type": "http.disconnect"}
            return message

        async def send_with_headers(message: Message) -> None:
            if answered:
                return  # the 413 went out already; whatever the app says after the disconnect is dropped
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                message["headers"] = headers + SECURITY_HEADERS + [h for h in cache if h[0] not in dict(headers)]
            await send(message)

        await self.app(scope, limited_receive, send_with_headers)

    async def _too_large(self, send: Send) -> None:
        await JSONResponse({"detail": f"request body over {self.max_body_bytes} bytes"}, status_code=413,
                           headers=dict((k.decode(), v.decode()) for k, v in SECURITY_HEADERS))({"type": "http"}, None, send)


def is_transient(error: OperationalError | PoolTimeout) -> bool:
    """A wait for the database given up (a lock, the connection pool) or a lost connection: worth a retry."""
    if isinstance(error, PoolTimeout):
        return True
    sqlstate = getattr(error.orig, "sqlstate", None)
    if sqlstate is not None:
        return sqlstate in TRANSIENT_SQLSTATES or sqlstate.startswith("08")
    return "locked" in str(error.orig) or "busy" in str(error.orig)  # SQLite: database is locked / busy


def _printable(text: str) -> str:
    """`text` made encodable (a lone surrogate in a request may be echoed in an error message)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _problems(exc: RequestValidationError) -> list[dict]:
    """Pydantic's errors without the input it echoes (which may be NaN, a lone surrogate, or 5 MB of text)."""
    problems = []
    for e in exc.errors():
        msg = e["msg"] + (f": {e['ctx']['error']}" if e["type"] == "json_invalid" and "error" in e.get("ctx", {}) else "")
        problems.append({"loc": [_printable(str(x)) if isinstance(x, str) else x for x in e["loc"]],
                         "msg": _printable(msg), "type": e["type"]})
    return problems


def create_app(database_url: str, max_body_bytes: int = MAX_BODY_BYTES, model_dir: Path | None = None,
               lock_timeout: float = 15.0, retrieval: dict | None = None, max_token_days: int = MAX_TOKEN_DAYS) -> FastAPI:
    """The app on `database_url` (SQLite or PostgreSQL), its schema migrated to the newest version first.

    `model_dir`: sampling jobs load local models only from under it (default: the working directory).
    `retrieval`: RetrievalSettings (as a dict): sampling jobs ground the prompts in these documents, and annotators
    see the passages beside the prompt.
    `lock_timeout`: seconds a request waits for a database lock before it is answered 503 with Retry-After.
    `max_token_days`: the longest an API token may be valid.
    """
    engine = make_engine(database_url, lock_timeout=lock_timeout)
    migrate(engine)
    sessions = make_sessionmaker(engine)
    with sessions() as db:
        interrupt_unfinished_jobs(db)
        stop_unfinished_imports(db)

    # No Swagger page: it loads scripts from a CDN, which the CSP (and an offline machine) would block.
    app = FastAPI(title="rlhfkit human feedback", dependencies=[Depends(verify_csrf)], docs_url=None,
                  redoc_url=None, openapi_url="/api/openapi.json")
    app.state.engine, app.state.sessions = engine, sessions
    # An import cut short by a stop may have left many (invisible) rows: delete them without delaying the start.
    app.state.cleanup = threading.Thread(target=remove_all_leftovers, args=(sessions,), name="feedback-cleanup",
                                         daemon=True)
    app.state.cleanup.start()
    app.state.model_dir = (model_dir or Path.cwd()).resolve()
    app.state.retrieval = retrieval
    app.state.max_token_days = max_token_days
    app.state.login_limits = LoginRateLimiter(limit=5), LoginRateLimiter(limit=30)  # per account or browser, per address
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")
    for module in (routes_auth, routes_annotator, routes_admin, routes_api):
        app.include_router(module.router)
    _add_error_handlers(app, sessions)
    app.add_middleware(LimitsAndHeaders, max_body_bytes=max_body_bytes)
    return app


def _add_error_handlers(app: FastAPI, sessions) -> None:
    """Errors as JSON for the API and as a page for the browser: a login redirect, HTTP errors, invalid requests
    (422), values the database cannot store (422), write conflicts (409) and a busy database (503, Retry-After)."""

    def error_page(request: Request, status: int, detail, headers: dict | None, look_up_user: bool):
        lines = [f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in detail] if isinstance(detail, list) else [detail]
        with sessions() as db:
            principal = optional_principal(request, db) if look_up_user else None
            response = render(request, "error.html", principal, status_code=status, status=status, problems=lines)
        response.headers.update(headers or {})
        return response

    async def error(request: Request, status: int, detail, headers: dict | None = None, look_up_user: bool = True):
        """JSON for the API, an error page for the browser; the page looks up its user in the threadpool, as the
        routes do, so that no database query blocks the event loop."""
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": detail}, status_code=status, headers=headers)
        return await run_in_threadpool(error_page, request, status, detail, headers, look_up_user)

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, _exc: LoginRequired):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": "log in or send an API token"}, status_code=401)
        # After a form post (a session that ended while an answer was typed), come back to the page, not the post.
        back = request.url.path if request.method == "GET" else request.headers.get("referer", "/")
        back = back.split(str(request.base_url).rstrip("/"), 1)[-1] or "/"
        return RedirectResponse(f"/login?next={quote(back)}", status_code=303)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return await error(request, exc.status_code, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError):
        return await error(request, 422, _problems(exc))

    @app.exception_handler(StorageDataError)
    async def _unstorable(request: Request, exc: StorageDataError):
        logger.warning("refused a value the database cannot store: %s", exc.orig)
        return await error(request, 422, "a value is too long or holds characters the database cannot store")

    @app.exception_handler(IntegrityError)
    async def _conflict(request: Request, exc: IntegrityError):
        logger.warning("a write conflicted with a concurrent one: %s", exc.orig)
        return await error(request, 409, "this conflicts with a change made at the same moment; reload and try again")

    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeout)
    async def _busy(request: Request, exc: OperationalError | PoolTimeout):
        if not is_transient(exc):
            raise exc
        logger.warning("database busy, answered 503: %s", exc)
        return await error(request, 503, f"the database is busy; try again in {RETRY_AFTER_SECONDS} seconds",
                     {"Retry-After": str(RETRY_AFTER_SECONDS)}, look_up_user=False)
