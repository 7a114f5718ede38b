"""The FastAPI application: storage, middleware (body size limit, security headers), routes, error pages."""

from __future__ import annotations

from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import HTTPException
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rlhfkit.feedback import routes_admin, routes_annotator, routes_api, routes_auth
from rlhfkit.feedback.auth import LoginRateLimiter, LoginRequired, optional_principal, verify_csrf
from rlhfkit.feedback.db import make_engine, make_sessionmaker, migrate
from rlhfkit.feedback.jobs import interrupt_unfinished_jobs
from rlhfkit.feedback.pages import render

MAX_BODY_BYTES = 20 * 1024 * 1024  # the largest upload (a prompts or completions file)
SECURITY_HEADERS = [
    # Scripts only from our own static files: even if some text escaped escaping, it could not run.
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                 b"frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]


class LimitsAndHeaders:
    """ASGI middleware: 413 for bodies over `max_body_bytes` (declared or streamed), security headers on every reply."""

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._too_large(send)
        received, answered = 0, False

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
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, limited_receive, send_with_headers)

    async def _too_large(self, send: Send) -> None:
        await JSONResponse({"detail": f"request body over {self.max_body_bytes} bytes"}, status_code=413,
                           headers=dict((k.decode(), v.decode()) for k, v in SECURITY_HEADERS))({"type": "http"}, None, send)


def create_app(database_url: str, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The app on `database_url` (SQLite or PostgreSQL), its schema migrated to the newest version first."""
    engine = make_engine(database_url)
    migrate(engine)
    sessions = make_sessionmaker(engine)
    interrupt_unfinished_jobs(sessions)

    # No Swagger page: it loads scripts from a CDN, which the CSP (and an offline machine) would block.
    app = FastAPI(title="rlhfkit human feedback", dependencies=[Depends(verify_csrf)], docs_url=None,
                  redoc_url=None, openapi_url="/api/openapi.json")
    app.state.engine, app.state.sessions = engine, sessions
    app.state.login_limits = LoginRateLimiter(limit=5), LoginRateLimiter(limit=30)  # per username, per address
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")
    for module in (routes_auth, routes_annotator, routes_admin, routes_api):
        app.include_router(module.router)

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, _exc: LoginRequired):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": "log in or send an API token"}, status_code=401)
        return RedirectResponse(f"/login?next={request.url.path}", status_code=303)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        if request.url.path.startswith("/api/") or request.method != "GET":
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        with sessions() as db:
            principal = optional_principal(request, db)
            return render(request, "error.html", principal, status_code=exc.status_code, status=exc.status_code,
                          detail=exc.detail)

    app.add_middleware(LimitsAndHeaders, max_body_bytes=max_body_bytes)
    return app
