"""The feedback app attacked again (issue 25, item 7): each test reproduces one defect the attack found and checks
that it is fixed. Tests taking `app` or `database_url` run on SQLite and on PostgreSQL."""

from __future__ import annotations

from contextlib import contextmanager

import datetime as dt
import re
import threading
import time
import unicodedata

import httpx
import pytest
from alembic import command
from alembic.config import Config
from feedback_helpers import (  # noqa: F401
    PASSWORD, Client, clients, create_project, database_url, jsonl, logged_in, make_app, mark_control, serving,
)
from sqlalchemy import create_engine, func, select, text

from rlhfkit.feedback import auth
from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.db import MIGRATIONS, ApiToken, Item, User, normalize_url, utcnow

NEW_PASSWORD = "a brand new passphrase"


@pytest.fixture
def app(database_url):
    return make_app(database_url)


def control_project(admin, members=("alice", "bob"), annotators: int = 2, items: int = 3, **project) -> int:
    """A ranking project (K = 2) with `items` items q0, q1, ...; no control item yet."""
    pid = create_project(admin, k=2, annotators=annotators, questions=("ranking",), members=members, **project)
    lines = [{"id": f"q{i}", "prompt": f"Question {i}?", "completions": [f"a{i}", f"b{i}"]} for i in range(items)]
    assert admin.form(f"/admin/projects/{pid}/import/completions", files={"file": ("c.jsonl", jsonl(lines))}).status_code == 200
    return pid


# a. Clearing a control item stored the JSON text 'null', not SQL NULL: the admin page answered 500 for good and the
#    item left the normal queue.

@contextmanager
def database_at(database_url: str, revision: str):
    """A connection to the database migrated up to `revision` (data written as an older release wrote it), closed
    after the block so that the app's own start migrates the rest."""
    engine = create_engine(normalize_url(database_url))
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
            yield connection
    finally:
        engine.dispose()


def test_a_cleared_control_item_is_a_regular_item_again(app):
    admin, alice = clients(app, "admin", "alice")
    pid = control_project(admin, members=("alice",), annotators=1, items=1)
    assert mark_control(admin, pid, "q0", ["1", "2"]).status_code == 200
    with app.state.sessions() as db:
        item_id = db.scalar(select(Item.id).where(Item.project_id == pid))
    r = admin.form(f"/admin/projects/{pid}/items/{item_id}/control/clear")
    assert r.status_code == 200 and "regular item again" in r.text
    with app.state.sessions() as db:
        assert db.scalar(select(Item.id).where(Item.id == item_id, Item.control_ranks.is_(None))) == item_id
    page = admin.get(f"/admin/projects/{pid}")
    assert page.status_code == 200 and "0 control items" in page.text
    assert alice.get(f"/api/projects/{pid}/next").json()["id"] == item_id  # back in the normal queue


def test_the_upgrade_turns_json_null_control_ranks_into_sql_null(database_url):
    """A database written before the fix holds JSON 'null' where a control item was cleared: the migration
    repairs it, and the project's page works again."""
    with database_at(database_url, "0004") as connection:
        connection.execute(text("INSERT INTO projects (name, guidelines, k, annotators_per_item, questions, "
                                "control_share, created_at) VALUES ('old', '', 2, 1, '[\"ranking\"]', 0, '2026-01-01')"))
        connection.execute(text("INSERT INTO items (project_id, external_id, prompt, position, control_ranks) VALUES "
                                "(1, 'cleared', 'Why?', 0, 'null'), (1, 'control', 'How?', 1, '[1, 2]'), "
                                "(1, 'regular', 'What?', 2, NULL)"))
    app = create_app(database_url)
    with app.state.sessions() as db:
        rows = dict(db.execute(select(Item.external_id, Item.control_ranks.is_(None))).all())
        assert rows == {"cleared": True, "control": False, "regular": True}
        assert db.scalar(select(Item.control_ranks).where(Item.external_id == "control")) == [1, 2]


# c. The browser form's submit on a ranking item without completions answered 500 (the page's cards[0]); the API
#    answers 409.

def test_the_form_on_an_item_without_completions_answers_409(app):
    admin, alice = clients(app, "admin", "alice")
    pid = create_project(admin, k=2, questions=("ranking",), members=("alice",))
    admin.form(f"/admin/projects/{pid}/import/prompts", files={"file": ("p.jsonl", jsonl([{"prompt": "p", "id": "a"}]))})
    with app.state.sessions() as db:
        item_id = db.scalar(select(Item.id).where(Item.project_id == pid))
    for form in ({"mode": "new"}, {"mode": "new", "all_equal": "1"}, {"mode": "revise"}):
        r = alice.form(f"/projects/{pid}/items/{item_id}/submit", form)
        assert r.status_code == 409 and "no completions" in r.text, (form, r.status_code)
    r = alice.form(f"/projects/{pid}/items/{item_id}/skip")
    assert r.status_code == 409 and "no completions" in r.text


# d. An annotator could tell control items apart: a control answer could be revised where a regular one could not
#    (200 vs 409), `progress.available` did not drop after a control answer, and "your latest answers" offered
#    "revise" only beside control items.

@pytest.mark.parametrize("annotators", [1, 2])
def test_control_items_cannot_be_told_apart_by_the_annotator(app, annotators):
    admin, alice = clients(app, "admin", "alice")
    # Every hand-out a control item while one is left: the test knows q0 comes first, then q1 and q2.
    pid = control_project(admin, members=("alice",), annotators=annotators, control_percent=100)
    assert mark_control(admin, pid, "q0", ["1", "2"]).status_code == 200
    headers = {"X-CSRF-Token": alice.csrf}
    seen = {}
    for _ in range(3):
        before = alice.get(f"/api/projects/{pid}/progress").json()["available"]
        item = alice.get(f"/api/projects/{pid}/next").json()
        url = f"/api/projects/{pid}/items/{item['id']}/annotations"
        assert alice.post(url, json={"ranks": [1, 2]}, headers=headers).status_code == 201
        after = alice.get(f"/api/projects/{pid}/progress").json()["available"]
        revised = alice.put(url, json={"ranks": [2, 1]}, headers=headers).status_code
        revise_page = alice.get(f"/projects/{pid}/items/{item['id']}/revise").status_code
        listed = alice.get(f"/projects/{pid}/annotate").text
        offered = f'/projects/{pid}/items/{item["id"]}/revise">revise' in listed
        seen[item["prompt"]] = (before - after, revised, revise_page, offered)
    assert set(seen) == {"Question 0?", "Question 1?", "Question 2?"}
    open_ = annotators > 1  # one answer closes an item of one annotator; two leave it open
    expected = (1, 200 if open_ else 409, 200 if open_ else 409, open_)
    assert seen == {prompt: expected for prompt in seen}, seen


# b. The CSRF check was an async dependency running a blocking database query on the event loop (and so were the
#    error pages' user look-ups): one browser posting a form while the database was slow stalled every request.

SLOW_QUERY_SECONDS = 1.5


@pytest.mark.parametrize("slow_request", ["form post (CSRF check)", "missing page (error page)"])
def test_a_slow_database_query_does_not_stall_other_requests(tmp_path, monkeypatch, slow_request):
    app = make_app(f"sqlite:///{tmp_path / 'f.db'}")
    with serving(app) as base:
        (browser, csrf), = logged_in(base, "alice", 1)
        looked_up = auth.current_session

        def slow_session(db, request):  # the database takes its time over this one request
            if request.headers.get("x-slow"):
                time.sleep(SLOW_QUERY_SECONDS)
            return looked_up(db, request)

        monkeypatch.setattr(auth, "current_session", slow_session)

        def slow() -> int:
            if slow_request.startswith("form"):
                return browser.post("/account/password", headers={"x-slow": "1"}, data={"csrf_token": csrf}).status_code
            return browser.get("/projects/999999/guidelines", headers={"x-slow": "1"}).status_code

        answered = {}
        thread = threading.Thread(target=lambda: answered.update(slow=slow()))
        thread.start()
        waits = []
        with httpx.Client(base_url=base, timeout=30) as other:
            while thread.is_alive():  # another client's requests meanwhile, one every 0.1 s
                started = time.perf_counter()
                assert other.get("/static/app.css").status_code == 200
                waits.append(time.perf_counter() - started)
                time.sleep(0.1)
        thread.join()
    assert answered["slow"] in (404, 422)  # answered, once its query was done
    assert len(waits) >= 5 and max(waits) < SLOW_QUERY_SECONDS / 3, f"other requests waited {max(waits):.2f} s"


def test_every_worker_thread_gets_a_database_connection_at_once(database_url):
    """uvicorn runs the routes on 40 threads: SQLAlchemy's default SQLite pool (15) made the others wait 30 s for a
    connection under load, then answer 503."""
    app = make_app(database_url, lock_timeout=2)
    started = time.perf_counter()
    connections = [app.state.engine.connect() for _ in range(40)]
    try:
        assert time.perf_counter() - started < 2
    finally:
        for connection in connections:
            connection.close()


# e. Accounts: no attempt limit on the current-password check; reactivating a user brought back their API tokens,
#    and neither a password reset nor a change revoked them; the password policy checked only the length and did not
#    normalise Unicode; tokens could live for ever and a leaked admin token could mint admins and tokens.

def user_id(app, name: str) -> int:
    with app.state.sessions() as db:
        return db.scalar(select(User.id).where(User.username == name))


def new_token(admin, uid: int, **form) -> str:
    page = admin.form(f"/admin/users/{uid}/tokens", {"name": "script", **form})
    assert page.status_code == 200, page.text
    return re.search(r'id="new-token">([^<]+)<', page.text).group(1)


def works(app, token: str) -> bool:
    return Client(app).get("/api/me", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_the_current_password_check_has_an_attempt_limit(app):
    alice, = clients(app, "alice")
    wrong = {"current_password": "not it at all", "new_password": NEW_PASSWORD}
    assert [alice.form("/account/password", wrong).status_code for _ in range(5)] == [422] * 5
    r = alice.form("/account/password", {"current_password": PASSWORD, "new_password": NEW_PASSWORD})
    assert r.status_code == 429 and "too many" in r.text and r.headers["retry-after"]
    assert Client(app).login("alice")  # the password is unchanged, and logging in is not held back


def test_tokens_end_with_deactivation_password_reset_and_change(app):
    admin, alice = clients(app, "admin", "alice")
    alice_id = user_id(app, "alice")
    token = new_token(admin, alice_id)
    admin.form(f"/admin/users/{alice_id}/active", {"active": "false"})
    admin.form(f"/admin/users/{alice_id}/active", {"active": "true"})
    assert not works(app, token)  # reactivating her does not bring back the token she had

    token = new_token(admin, alice_id)
    r = admin.form(f"/admin/users/{alice_id}/password", {"password": NEW_PASSWORD})
    assert r.status_code == 200 and "API tokens" in r.text
    assert not works(app, token)

    alice = Client(app).login("alice", NEW_PASSWORD)
    token = new_token(admin, alice_id)
    r = alice.form("/account/password", {"current_password": NEW_PASSWORD, "new_password": PASSWORD})
    assert r.status_code == 200 and "API tokens" in r.text
    assert not works(app, token)
    assert works(app, new_token(admin, alice_id))  # a token made afterwards works


@pytest.mark.parametrize("password", ["12345678", "password", "Password1", "qwertyuiop", "alice", "alice2026!",
                                      "ALICE-ALICE", "１２３４５６７８"])
def test_common_passwords_and_the_username_are_refused(app, password):
    admin, alice = clients(app, "admin", "alice")
    r = admin.form(f"/admin/users/{user_id(app, 'alice')}/password", {"password": password})
    assert r.status_code == 422 and ("common" in r.text or "username" in r.text or "8 to" in r.text), r.text[-400:]
    r = alice.form("/account/password", {"current_password": PASSWORD, "new_password": password})
    assert r.status_code == 422
    assert Client(app).login("alice")  # unchanged
    for refused in ("12345678", "dave the annotator"):  # and for a new account
        r = admin.form("/admin/users", {"username": "dave", "password": refused, "role": "annotator"})
        assert r.status_code == 422, refused


def test_passwords_are_unicode_normalised(app):
    composed = unicodedata.normalize("NFC", "Grüße aus Köln, Ångström")
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    admin, = clients(app, "admin")
    assert admin.form(f"/admin/users/{user_id(app, 'alice')}/password", {"password": composed}).status_code == 200
    assert Client(app).login("alice", decomposed)  # typed on a keyboard that composes differently
    assert Client(app).login("alice", composed)
    with app.state.sessions() as db:  # a hash stored before normalising (of a decomposed password) still logs in
        db.get(User, user_id(app, "bob")).password_hash = auth._hasher.hash(decomposed)
        db.commit()
    assert Client(app).login("bob", decomposed)


def test_tokens_expire_and_cannot_manage_accounts(tmp_path):
    app = make_app(f"sqlite:///{tmp_path / 'f.db'}", max_token_days=30)
    admin, = clients(app, "admin")
    admin_id = user_id(app, "admin")
    page = admin.get("/admin/users").text
    assert 'name="days"' in page and 'max="30"' in page
    for days in (0, 31):  # none lives for ever, nor beyond the server's limit
        assert admin.form(f"/admin/users/{admin_id}/tokens", {"name": "x", "days": days}).status_code == 422
    r = admin.form(f"/admin/users/{admin_id}/tokens", {"name": "ops"})
    assert r.status_code == 200 and 'id="admin-token-warning"' in r.text  # an admin's token: a warning beside it
    token = re.search(r'id="new-token">([^<]+)<', r.text).group(1)
    assert 'id="admin-token-warning"' not in new_token_page(admin, user_id(app, "alice"))
    with app.state.sessions() as db:
        expires = db.scalar(select(ApiToken.expires_at).order_by(ApiToken.id.desc()).limit(1))
        assert dt.timedelta(days=29) < expires - utcnow() <= dt.timedelta(days=30)

    script = Client(app)
    bearer = {"Authorization": f"Bearer {token}"}
    assert script.get("/api/me", headers=bearer).json()["role"] == "admin"  # it does an admin's work
    assert script.get("/admin/projects/999", headers=bearer).status_code == 404
    answers = [script.post("/admin/users", headers=bearer, data={"username": "mallory", "password": NEW_PASSWORD,
                                                                 "role": "admin"}),
               script.post(f"/admin/users/{admin_id}/tokens", headers=bearer, data={"name": "forever"}),
               script.post(f"/admin/users/{user_id(app, 'alice')}/role", headers=bearer, data={"role": "admin"}),
               script.post(f"/admin/users/{user_id(app, 'alice')}/password", headers=bearer, data={"password": NEW_PASSWORD}),
               script.get("/admin/users", headers=bearer)]
    assert [r.status_code for r in answers] == [403] * 5 and "browser" in answers[0].text
    with app.state.sessions() as db:
        assert db.scalar(select(func.count()).select_from(ApiToken)) == 2
        assert db.scalar(select(User.role).where(User.username == "alice")) == "annotator"


def new_token_page(admin, uid: int) -> str:
    page = admin.form(f"/admin/users/{uid}/tokens", {"name": "script"})
    assert page.status_code == 200
    return page.text


def test_the_upgrade_gives_old_tokens_an_expiry_and_revokes_those_of_deactivated_users(database_url):
    with database_at(database_url, "0005") as connection:
        connection.execute(text("INSERT INTO users (username, username_key, password_hash, role, active, created_at) "
                                "VALUES ('ann', 'ann', 'x', 'annotator', true, '2026-01-01'), "
                                "('gone', 'gone', 'x', 'annotator', false, '2026-01-01')"))
        connection.execute(text("INSERT INTO api_tokens (token_hash, user_id, name, created_at) VALUES "
                                "('forever', 1, 'script', '2026-01-01'), ('left', 2, 'script', '2026-01-01')"))
    app = create_app(database_url)
    with app.state.sessions() as db:
        tokens = {t.token_hash: t for t in db.scalars(select(ApiToken))}
        assert dt.timedelta(days=89) < tokens["forever"].expires_at - utcnow() <= dt.timedelta(days=90)
        assert tokens["forever"].usable(utcnow()) and tokens["left"].revoked_at is not None
