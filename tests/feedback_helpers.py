"""Shared pieces of the feedback-app tests: database URLs (SQLite, and PostgreSQL when configured), an app with
users, and a logged-in TestClient that knows its CSRF token."""

from __future__ import annotations

import json
import os
import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.auth import create_user
from rlhfkit.feedback.db import normalize_url

PASSWORD = "correct horse battery"
CSRF = re.compile(r'name="csrf_token" value="([^"]*)"')


def postgres_url() -> str:
    """The test PostgreSQL database, emptied; skips without one (fails under CI, which must provide one)."""
    url = os.environ.get("RLHFKIT_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("CI is set but RLHFKIT_TEST_POSTGRES_URL is not: .ci/run must start PostgreSQL")
        pytest.skip("set RLHFKIT_TEST_POSTGRES_URL=postgresql://user:password@host/db to run this on PostgreSQL")
    engine = create_engine(normalize_url(url))
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'feedback.db'}" if request.param == "sqlite" else postgres_url()


def add_user(app, username: str, role: str = "annotator") -> None:
    with app.state.sessions() as db:
        create_user(db, username, PASSWORD, role)
        db.commit()


class Client(TestClient):
    """A TestClient logged in through the login form, posting forms with the session's CSRF token."""

    def login(self, username: str, password: str = PASSWORD) -> Client:
        page = self.get("/login")
        response = self.post("/login", data={"username": username, "password": password, "csrf_token": csrf_of(page.text)},
                             follow_redirects=False)
        assert response.status_code == 303, response.text
        self.csrf = csrf_of(self.get("/").text)
        return self

    def form(self, url: str, data: dict | None = None, files: dict | None = None, **kwargs):
        return self.post(url, data={**(data or {}), "csrf_token": self.csrf}, files=files, **kwargs)


def csrf_of(html: str) -> str:
    match = CSRF.search(html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def make_app(database_url: str, **kwargs):
    app = create_app(database_url, **kwargs)
    add_user(app, "admin", "admin")
    for name in ("alice", "bob", "carol"):
        add_user(app, name)
    return app


def create_project(admin: Client, name: str = "demo", k: int = 3, annotators: int = 2,
                   questions: tuple[str, ...] = ("ranking", "ratings", "flags", "ideal"), guidelines: str = "Be kind.") -> int:
    response = admin.form("/admin/projects", {"name": name, "k": k, "annotators_per_item": annotators,
                                              "questions": list(questions), "guidelines": guidelines},
                          follow_redirects=False)
    assert response.status_code == 303, response.text
    return int(response.headers["location"].rsplit("/", 1)[1])
