"""Shared pieces of the feedback-app tests: database URLs (SQLite, and PostgreSQL when configured), an app with
users, a logged-in TestClient that knows its CSRF token, a seeded project, and the app served by uvicorn."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from rlhfkit.feedback import auth
from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.auth import create_user
from rlhfkit.feedback.db import Item, normalize_url

PASSWORD = "correct horse battery"
# argon2 with its cheapest settings: the real ones (argon2-cffi's defaults, RFC 9106) take 0.1-0.4 s a hash on
# this machine, and these tests create and log in hundreds of users. The hashes are argon2 all the same.
auth._hasher = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
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
                   questions: tuple[str, ...] = ("ranking", "ratings", "flags", "ideal"), guidelines: str = "Be kind.",
                   members: tuple[str, ...] = ("alice", "bob", "carol"), control_percent: float = 0) -> int:
    """A project with `members` (by default every annotator of make_app) and no control items mixed in."""
    response = admin.form("/admin/projects", {"name": name, "k": k, "annotators_per_item": annotators,
                                              "questions": list(questions), "guidelines": guidelines,
                                              "members": list(members), "control_percent": control_percent},
                          follow_redirects=False)
    assert response.status_code == 303, response.text
    return int(response.headers["location"].rsplit("/", 1)[1])


PROMPTS = [{"prompt": f"Question {i}?", "id": f"q{i}"} for i in range(3)]
COMPLETIONS = [{"id": f"q{i}", "prompt": f"Question {i}?", "completions": [f"answer {i}{c}" for c in "abc"]}
               for i in range(3)]


def clients(app, *names):
    return [Client(app).login(n) for n in names]


def seeded(app, **project):
    """Admin, alice and bob logged in; a project with 3 prompts and 3 completions each."""
    admin, alice, bob = clients(app, "admin", "alice", "bob")
    pid = create_project(admin, **project)
    assert admin.form(f"/admin/projects/{pid}/import/prompts", files={"file": ("p.jsonl", jsonl(PROMPTS))}).status_code == 200
    r = admin.form(f"/admin/projects/{pid}/import/completions", files={"file": ("c.jsonl", jsonl(COMPLETIONS))})
    assert r.status_code == 200 and "imported 3 completions" in r.text
    return admin, alice, bob, pid


def mark_control(admin, pid: int, external_id: str, known: list[str]):
    """Make the item `external_id` a control item with the known ranks `known` (one per completion, "" for none)."""
    page = admin.get(f"/admin/projects/{pid}/items", params={"external_id": external_id})
    assert page.status_code == 200, page.text
    item_id = int(re.search(r'/items/(\d+)/control"', page.text).group(1))
    return admin.form(f"/admin/projects/{pid}/items/{item_id}/control", {"known": known})


def annotate_page(client, pid):
    page = client.get(f"/projects/{pid}/annotate")
    assert page.status_code == 200
    match = re.search(r'action="/projects/\d+/items/(\d+)/submit"', page.text)
    return page, int(match.group(1)) if match else None


def answer_form(client, app, item_id, best_first: list[int], ideal: str = ""):
    """Form fields ranking the completions at positions `best_first` 1, 2, 3, rating all 4, flagging nothing."""
    with app.state.sessions() as db:
        k = len(db.get(Item, item_id).completions)
    data = {"k": k, "flags_shown": "1", "ideal_response": ideal}
    for rank, position in enumerate(best_first, start=1):
        data[f"rank_{position}"] = rank
    for i in range(k):
        data.update({f"rating_{i}_{a}": 4 for a in ("helpful", "honest", "harmless")})
    return data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app, **settings):
    """The app served by uvicorn in a thread (real sockets, real concurrency); yields its base URL."""
    settings = {"host": "127.0.0.1", "port": free_port(), "log_level": "warning", **settings}
    server = uvicorn.Server(uvicorn.Config(app, **settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://{settings['host']}:{settings['port']}"
    finally:
        server.should_exit = True
        thread.join(10)


def logged_in(base: str, username: str, n: int) -> list[tuple[httpx.Client, str]]:
    """`n` HTTP clients sharing one login of `username`, with its CSRF token."""
    first = httpx.Client(base_url=base, timeout=60)
    first.post("/login", data={"username": username, "password": PASSWORD, "csrf_token": csrf_of(first.get("/login").text)})
    token = csrf_of(first.get("/").text)
    return [(first, token)] + [(httpx.Client(base_url=base, timeout=60, cookies=first.cookies), token) for _ in range(n - 1)]
