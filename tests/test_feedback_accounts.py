"""Accounts and API tokens over their lifetime (issue 14, hole 3): deactivation, token expiry and revocation,
password changes and resets, and a database from before these existed upgraded in place. Tests taking `app` run
on SQLite and on PostgreSQL."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from alembic import command
from alembic.config import Config
from feedback_helpers import PASSWORD, Client, clients, database_url, make_app, seeded  # noqa: F401
from sqlalchemy import create_engine, select, text, update

from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.db import MIGRATIONS, ApiToken, AuthSession, User, normalize_url, utcnow

NEW_PASSWORD = "a brand new passphrase"


@pytest.fixture
def app(database_url):
    return make_app(database_url)


def user_id(app, name: str) -> int:
    with app.state.sessions() as db:
        return db.scalar(select(User.id).where(User.username == name))


def new_token(admin: Client, uid: int, **form) -> str:
    page = admin.form(f"/admin/users/{uid}/tokens", {"name": "script", **form})
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    return re.search(r'id="new-token">([^<]+)<', page.text).group(1)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_a_deactivated_user_is_locked_out_everywhere_until_reactivated(app):
    admin, alice, bob, pid = seeded(app, annotators=1)
    alice_id = user_id(app, "alice")
    token = new_token(admin, alice_id)
    held = alice.get(f"/api/projects/{pid}/next").json()["id"]

    r = admin.form(f"/admin/users/{alice_id}/active", {"active": "false"})
    assert r.status_code == 200 and "deactivated" in r.text
    assert alice.get("/", follow_redirects=False).status_code == 303  # her login has ended
    assert Client(app).get("/api/me", headers=bearer(token)).status_code == 401  # her token stops working
    fresh = Client(app)
    r = fresh.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": re.search(
        r'name="csrf_token" value="([^"]*)"', fresh.get("/login").text).group(1)})
    assert r.status_code == 401  # and she cannot log in again
    assert bob.get(f"/api/projects/{pid}/next").json()["id"] == held  # the item she held is free again
    assert admin.form(f"/admin/users/{user_id(app, 'admin')}/active", {"active": "false"}).status_code == 422

    admin.form(f"/admin/users/{alice_id}/active", {"active": "true"})
    assert Client(app).login("alice").get("/api/me").json()["username"] == "alice"
    assert Client(app).get("/api/me", headers=bearer(token)).status_code == 401  # revoked with the deactivation


def test_tokens_are_listed_expire_and_can_be_revoked(app):
    admin, bob = clients(app, "admin", "bob")
    bob_id = user_id(app, "bob")
    short = new_token(admin, bob_id, days=1)
    forever = new_token(admin, bob_id, days=365)  # the longest this server allows
    own = new_token(admin, bob_id, name="laptop")
    script = Client(app)
    for token in (short, forever, own):
        assert script.get("/api/me", headers=bearer(token)).json()["username"] == "bob"
    with app.state.sessions() as db:
        short_id, forever_id, own_id = db.scalars(select(ApiToken.id).order_by(ApiToken.id)).all()
        assert db.get(ApiToken, own_id).last_used_at is not None  # recorded (at most every few minutes)
        assert db.get(ApiToken, short_id).expires_at - utcnow() < dt.timedelta(days=1)
        assert db.get(ApiToken, forever_id).expires_at - utcnow() > dt.timedelta(days=364)
        db.execute(update(ApiToken).where(ApiToken.id == short_id).values(expires_at=utcnow()))
        db.commit()
    assert script.get("/api/me", headers=bearer(short)).status_code == 401  # expired
    page = admin.get("/admin/users").text
    assert page.count("<td>bob</td>") == 4  # the user and the 3 tokens
    assert page.count('class="token-state">active<') == 2 and 'class="token-state">expired<' in page

    assert admin.form(f"/admin/tokens/{forever_id}/revoke", follow_redirects=False).status_code == 303
    assert script.get("/api/me", headers=bearer(forever)).status_code == 401
    assert "revoked" in admin.get("/admin/users").text

    account = bob.get("/account").text  # bob sees his own tokens and revokes the laptop's
    assert "laptop" in account and account.count("Revoke") == 1
    assert bob.form(f"/account/tokens/{own_id}/revoke", follow_redirects=False).status_code == 303
    assert script.get("/api/me", headers=bearer(own)).status_code == 401
    alice, = clients(app, "alice")
    assert alice.form(f"/account/tokens/{own_id}/revoke").status_code == 404  # not hers


def test_changing_a_password_ends_the_other_logins(app):
    alice, elsewhere = clients(app, "alice", "alice")
    r = alice.form("/account/password", {"current_password": "not it at all", "new_password": NEW_PASSWORD})
    assert r.status_code == 422 and "current password is wrong" in r.text
    r = alice.form("/account/password", {"current_password": PASSWORD, "new_password": "short"})
    assert r.status_code == 422 and "8 to 1024" in r.text
    r = alice.form("/account/password", {"current_password": PASSWORD, "new_password": NEW_PASSWORD})
    assert r.status_code == 200 and "password changed" in r.text
    assert alice.get("/api/me").status_code == 200  # this login goes on
    assert elsewhere.get("/api/me").status_code == 401  # the other one has ended
    assert Client(app).login("alice", NEW_PASSWORD)
    with pytest.raises(AssertionError):
        Client(app).login("alice", PASSWORD)


def test_an_admin_resets_a_password_and_the_users_logins_end(app):
    admin, alice = clients(app, "admin", "alice")
    r = admin.form(f"/admin/users/{user_id(app, 'alice')}/password", {"password": NEW_PASSWORD})
    assert r.status_code == 200 and "their logins have ended" in r.text
    assert alice.get("/api/me").status_code == 401
    assert Client(app).login("alice", NEW_PASSWORD)
    with app.state.sessions() as db:
        assert db.scalar(select(AuthSession.id).where(AuthSession.user_id == user_id(app, "alice"))) is not None


def test_a_database_from_before_is_upgraded_in_place(database_url):
    engine = create_engine(normalize_url(database_url))
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    rows = {  # one of everything, as version 0002 stored it
        "users": "(username, password_hash, role, created_at) VALUES ('Alice', 'x', 'annotator', '2026-01-01'), "
                 "('root', 'x', 'admin', '2026-01-01')",
        "projects": "(name, guidelines, k, annotators_per_item, questions, created_at) "
                    "VALUES ('old', '', 2, 1, '[\"ranking\"]', '2026-01-01')",
        "items": "(project_id, external_id, prompt, position) VALUES (1, 'q', 'Why?', 1)",
        "completions": "(item_id, position, text) VALUES (1, 0, 'a'), (1, 1, 'b')",
        "annotations": "(item_id, user_id, status, ranks, seconds_spent, created_at) "
                       "VALUES (1, 1, 'submitted', '[1, 2]', 3.0, '2026-01-01')",
        "api_tokens": "(token_hash, user_id, name, created_at) VALUES ('h', 1, 'script', '2026-01-01')",
        "sessions": "(token_hash, user_id, csrf_token, expires_at) VALUES ('s', 1, 'c', '2099-01-01')",
        "jobs": "(project_id, kind, status, done, total, message, params, created_at, updated_at) "
                "VALUES (1, 'generate', 'done', 1, 1, '', '{}', '2026-01-01', '2026-01-01')",
    }
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0002")
        for table, values in rows.items():
            connection.execute(text(f"INSERT INTO {table} {values}"))
    engine.dispose()
    app = create_app(database_url)  # migrates to the newest schema
    with app.state.sessions() as db:
        for table in rows:  # rebuilding SQLite's tables lost nothing (no cascade from a dropped table)
            assert db.scalar(text(f"SELECT count(*) FROM {table}")) == rows[table].count("), (") + 1, table
        alice = db.scalar(select(User).where(User.username_key == "alice"))
        assert alice.username == "Alice" and alice.active
        members = db.execute(text("SELECT project_id, user_id FROM project_members")).all()
        assert members == [(1, alice.id)]  # annotators keep seeing the projects they saw; admins see all anyway
