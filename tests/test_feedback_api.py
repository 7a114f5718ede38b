"""The feedback app through its HTTP interface (FastAPI TestClient): every route and role, CSRF, XSS, limits,
imports, the queue, submissions and exports. Tests taking `database_url` run on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import re

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from feedback_helpers import (  # noqa: F401
    PASSWORD, PROMPTS, Client, add_user, annotate_page, answer_form, clients, create_project, csrf_of, database_url, jsonl,
    make_app, seeded,
)
from sqlalchemy import select, update
from typer.testing import CliRunner

from rlhfkit.cli import app as cli_app
from rlhfkit.feedback.db import Annotation, Assignment, Base, Item, User, utcnow

XSS = "<script>alert('pwned')</script><img src=x onerror=alert(1)>"


@pytest.fixture
def app(database_url):
    """The app on SQLite, and again on PostgreSQL: every test that uses it is a storage test on both."""
    return make_app(database_url)


def test_migrations_create_exactly_the_models(database_url):
    app = make_app(database_url)
    with app.state.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


def test_two_annotators_to_consensus_pairs_with_agreement(database_url):
    app = make_app(database_url)
    admin, alice, bob, pid = seeded(app)
    orders = {"alice": [[0, 1, 2], [2, 1, 0], [0, 1, 2]], "bob": [[0, 2, 1], [2, 1, 0], [0, 1, 2]]}
    for client, name in ((alice, "alice"), (bob, "bob")):
        for n, best_first in enumerate(orders[name]):
            page, item_id = annotate_page(client, pid)
            assert f"{n} submitted" in page.text
            r = client.form(f"/projects/{pid}/items/{item_id}/submit", answer_form(client, app, item_id, best_first,
                                                                                    ideal=f"ideal by {name}"),
                            follow_redirects=False)
            assert r.status_code == 303, r.text
        page, item_id = annotate_page(client, pid)
        assert item_id is None and "Nothing left" in page.text

    pairs = [json.loads(line) for line in admin.get(f"/admin/projects/{pid}/export/pairs").text.splitlines()]
    # Item q0: both put a first; b vs c is one vote each, so a tie and no pair. q1 and q2: all three pairs agreed.
    assert {(p["prompt"], p["chosen"], p["rejected"]) for p in pairs} == {
        ("Question 0?", "answer 0a", "answer 0b"), ("Question 0?", "answer 0a", "answer 0c"),
        ("Question 1?", "answer 1c", "answer 1b"), ("Question 1?", "answer 1c", "answer 1a"),
        ("Question 1?", "answer 1b", "answer 1a"),
        ("Question 2?", "answer 2a", "answer 2b"), ("Question 2?", "answer 2a", "answer 2c"),
        ("Question 2?", "answer 2b", "answer 2c"),
    }
    rankings = [json.loads(line) for line in admin.get(f"/admin/projects/{pid}/export/rankings").text.splitlines()]
    assert len(rankings) == 6 and {r["annotator"] for r in rankings} == {"alice", "bob"}
    assert {"prompt", "completions", "ranks", "annotator", "id"} == set(rankings[0])
    sft = [json.loads(line) for line in admin.get(f"/admin/projects/{pid}/export/sft").text.splitlines()]
    assert len(sft) == 6 and sft[0] == {"prompt": "Question 0?", "response": "ideal by alice"}

    page = admin.get(f"/admin/projects/{pid}").text
    # 9 completion pairs compared by the two, 8 the same way: 88.9%. Both agree with all 8 consensus pairs.
    assert re.search(r'id="pairwise-agreement">88\.9%', page)
    assert "3 fully annotated" in page and "6 answers submitted" in page
    assert page.count("100.0%") == 2  # each annotator's agreement with the consensus
    assert "Krippendorff" in page and "helpful (1-5)" in page and "harm flags" in page
    with app.state.sessions() as db:
        seconds = db.scalars(select(Annotation.seconds_spent)).all()
        assert len(seconds) == 6 and all(s > 0 for s in seconds)  # from when the item was handed out


def test_queue_hands_out_held_then_open_items_until_they_have_enough_annotators(app):
    admin, alice, bob, pid = seeded(app, annotators=1)
    carol, = clients(app, "carol")
    _, first = annotate_page(alice, pid)
    assert annotate_page(alice, pid)[1] == first  # a reload shows the item this person holds
    _, second = annotate_page(bob, pid)
    assert second != first  # alice holds the first, and one annotator per item is enough
    assert alice.form(f"/projects/{pid}/items/{first}/skip", follow_redirects=False).status_code == 303
    _, third = annotate_page(alice, pid)
    assert third not in (first, second)  # skipped items are not served to her again
    assert annotate_page(carol, pid)[1] == first  # but her skip put the first back in the queue
    bob.form(f"/projects/{pid}/items/{second}/submit", answer_form(bob, app, second, [0, 1, 2]))
    assert annotate_page(bob, pid)[1] is None  # second is done, first and third are held by carol and alice
    assert bob.get(f"/api/projects/{pid}/progress").json() == {"submitted": 1, "skipped": 0, "available": 0}
    with app.state.sessions() as db:  # alice walks away: after the assignment's lifetime the item is free again
        db.execute(update(Assignment).where(Assignment.item_id == third).values(expires_at=utcnow()))
        db.commit()
    assert annotate_page(bob, pid)[1] == third
    r = bob.form(f"/projects/{pid}/items/{second}/submit", answer_form(bob, app, second, [0, 1, 2]))
    assert r.status_code == 409  # one answer per person and item


def test_answers_are_validated_against_the_project(app):
    admin, alice, bob, pid = seeded(app)
    item = alice.get(f"/api/projects/{pid}/next").json()
    assert [c["text"] for c in item["completions"]] == ["answer 0a", "answer 0b", "answer 0c"]
    url = f"/api/projects/{pid}/items/{item['id']}/annotations"
    headers = {"X-CSRF-Token": alice.csrf}
    ratings = [{"helpful": 5, "honest": 5, "harmless": 5}] * 3
    for bad in ({"ranks": [1, 2], "ratings": ratings}, {"ranks": [1, 2, 4], "ratings": ratings},
                {"ranks": [1, 2, 3]}, {"ranks": [1, 2, 3], "ratings": [{"helpful": 6, "honest": 1, "harmless": 1}] * 3},
                {"ranks": [1, 2, 3], "ratings": ratings, "flags": [["not-a-flag"], [], []]}):
        assert alice.post(url, json=bad, headers=headers).status_code == 422, bad
    good = {"ranks": [1, 1, 2], "ratings": ratings, "flags": [["privacy"], [], []], "ideal_response": "Better."}
    r = alice.post(url, json=good, headers=headers)
    assert r.status_code == 201 and r.json()["ranks"] == [1, 1, 2] and r.json()["flags"] == [["privacy"], [], []]
    assert alice.post(url, json=good, headers=headers).status_code == 409


def test_roles_on_every_route(app):
    admin, alice, bob, pid = seeded(app)
    item = alice.get(f"/api/projects/{pid}/next").json()
    ratings = [{"helpful": 3, "honest": 3, "harmless": 3}] * 3
    mine = alice.post(f"/api/projects/{pid}/items/{item['id']}/annotations", json={"ranks": [1, 2, 3], "ratings": ratings},
                      headers={"X-CSRF-Token": alice.csrf}).json()["id"]
    with app.state.sessions() as db:
        alice_id = db.scalar(select(User.id).where(User.username == "alice"))
    admin_gets = [f"/admin", f"/admin/projects/{pid}", "/admin/users", f"/admin/projects/{pid}/export/pairs",
                  f"/admin/projects/{pid}/export/rankings", f"/admin/projects/{pid}/export/sft",
                  f"/api/projects/{pid}/export/pairs", "/api/jobs/1", f"/admin/projects/{pid}/items?external_id=q0",
                  f"/admin/projects/{pid}/items/{item['id']}"]
    admin_posts = ["/admin/projects", f"/admin/projects/{pid}/import/prompts", f"/admin/projects/{pid}/import/completions",
                   f"/admin/projects/{pid}/generate", "/admin/users", f"/admin/users/{alice_id}/role",
                   f"/admin/users/{alice_id}/tokens", f"/admin/users/{alice_id}/active", f"/admin/users/{alice_id}/password",
                   "/admin/tokens/1/revoke", f"/admin/projects/{pid}/members", f"/admin/projects/{pid}/members/2/remove",
                   f"/admin/projects/{pid}/archive", f"/admin/projects/{pid}/control-share",
                   f"/admin/projects/{pid}/items/{item['id']}/control", f"/admin/projects/{pid}/items/{item['id']}/control/clear"]
    for url in admin_gets:
        assert bob.get(url).status_code == 403, url
    for url in admin_posts:
        assert bob.form(url).status_code == 403, url
    assert bob.get(f"/api/annotations/{mine}").status_code == 403  # blind: not another annotator's answer
    assert alice.get(f"/api/annotations/{mine}").json()["annotator"] == "alice"
    assert admin.get(f"/api/annotations/{mine}").status_code == 200

    anonymous = Client(app)
    user_gets = ["/", f"/projects/{pid}/annotate", f"/projects/{pid}/guidelines", "/account"]
    for url in user_gets + admin_gets:
        r = anonymous.get(url, follow_redirects=False)
        assert r.status_code in (401, 303), url
        if r.status_code == 303:
            assert r.headers["location"].startswith("/login")
    for url in ["/api/me", f"/api/projects/{pid}/next", f"/api/projects/{pid}/progress", f"/api/annotations/{mine}"]:
        assert anonymous.get(url).status_code == 401, url
    for url in user_gets:
        assert bob.get(url).status_code == 200, url
    assert bob.get("/api/me").json() == {"username": "bob", "role": "annotator"}
    assert bob.get(f"/projects/999/annotate").status_code == 404


def test_state_changing_requests_need_the_csrf_token(app):
    admin, alice, bob, pid = seeded(app)
    item = alice.get(f"/api/projects/{pid}/next").json()
    posts = [("/admin/projects", admin, {"name": "x", "k": 2, "annotators_per_item": 1, "questions": "ranking"}),
             (f"/admin/projects/{pid}/generate", admin, {"model": "m"}),
             ("/admin/users", admin, {"username": "eve", "password": PASSWORD, "role": "admin"}),
             (f"/projects/{pid}/items/{item['id']}/skip", alice, {}),
             (f"/projects/{pid}/items/{item['id']}/submit", alice, {"k": 3, "rank_0": 1, "rank_1": 2, "rank_2": 3}),
             ("/logout", alice, {}),
             ("/account/password", alice, {"current_password": PASSWORD, "new_password": "another long one"}),
             ("/admin/users/2/active", admin, {"active": "false"}), ("/admin/tokens/1/revoke", admin, {}),
             (f"/admin/projects/{pid}/archive", admin, {"archived": "true"})]
    for url, client, data in posts:
        assert client.post(url, data=data).status_code == 403, url
        assert client.post(url, data={**data, "csrf_token": "forged"}).status_code == 403, url
    assert admin.post(f"/admin/projects/{pid}/import/prompts", files={"file": ("p.jsonl", jsonl(PROMPTS))}).status_code == 403
    assert alice.post(f"/api/projects/{pid}/items/{item['id']}/annotations", json={"ranks": [1, 2, 3]}).status_code == 403
    assert alice.post(f"/api/projects/{pid}/items/{item['id']}/skip").status_code == 403
    # Another user's CSRF token is no good either.
    assert alice.post(f"/projects/{pid}/items/{item['id']}/skip", data={"csrf_token": bob.csrf}).status_code == 403
    fresh = Client(app)
    assert fresh.post("/login", data={"username": "alice", "password": PASSWORD}).status_code == 403
    with app.state.sessions() as db:
        assert db.scalar(select(User).where(User.username == "eve")) is None
        assert db.scalars(select(Annotation)).all() == []
        assert all(u.active for u in db.scalars(select(User)))
    assert Client(app).login("alice")  # her password is unchanged


def test_model_text_is_escaped_everywhere(app):
    admin, alice, bob, pid = seeded(app, guidelines=f"# Rules\n\nBe kind. {XSS}")
    completions = [{"prompt": f"Prompt {XSS}", "completions": [XSS, "</pre><script>x()</script>", "fine"]}]
    r = admin.form(f"/admin/projects/{pid}/import/completions", files={"file": ("c.jsonl", jsonl(completions))})
    assert r.status_code == 200
    with app.state.sessions() as db:  # take the others out of the queue so the XSS item is served
        for item in db.scalars(select(Item).where(Item.prompt != f"Prompt {XSS}")):
            db.delete(item)
        db.commit()
    page = alice.get(f"/projects/{pid}/annotate")
    assert "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;" in page.text
    assert "<script>alert" not in page.text and "<img src=x" not in page.text and "<script>x()" not in page.text
    assert "<h1>Rules</h1>" in page.text  # guidelines are Markdown, with raw HTML shown as text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "<script>alert" not in alice.get(f"/projects/{pid}/guidelines").text
    assert "<script>alert" not in admin.get(f"/admin/projects/{pid}").text
    xss_item = re.search(r'action="/projects/\d+/items/(\d+)/submit"', page.text).group(1)
    assert "<script>alert" not in admin.get(f"/admin/projects/{pid}/items/{xss_item}").text
    assert "<script>" not in admin.get(f"/admin/users").text


def test_login_cookie_flags_rate_limit_and_password_hashing(app):
    client = Client(app)
    page = client.get("/login")
    r = client.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": csrf_of(page.text)},
                    follow_redirects=False)
    cookie = r.headers["set-cookie"].lower()
    assert "rlhfkit_session=" in cookie and "httponly" in cookie and "samesite=lax" in cookie
    assert client.get("/").status_code == 200
    client.csrf = csrf_of(client.get("/").text)
    assert client.form("/logout", follow_redirects=False).status_code == 303
    assert client.get("/", follow_redirects=False).status_code == 303

    attacker = Client(app)
    token = csrf_of(attacker.get("/login").text)
    for _ in range(5):
        r = attacker.post("/login", data={"username": "bob", "password": "wrong password", "csrf_token": token})
        assert r.status_code == 401 and "wrong username or password" in r.text
    r = attacker.post("/login", data={"username": "bob", "password": PASSWORD, "csrf_token": token})
    assert r.status_code == 429  # even the right password, until the window passes
    assert Client(app).login("alice")  # other accounts are not locked
    with app.state.sessions() as db:
        hashes = db.scalars(select(User.password_hash)).all()
    assert all(h.startswith("$argon2") and PASSWORD not in h for h in hashes)


def test_request_size_limit(tmp_path):
    app = make_app(f"sqlite:///{tmp_path / 'f.db'}", max_body_bytes=10_000)
    admin, = clients(app, "admin")
    pid = create_project(admin)
    big = jsonl([{"prompt": "x" * 1000}] * 20)
    r = admin.form(f"/admin/projects/{pid}/import/prompts", files={"file": ("p.jsonl", big)})
    assert r.status_code == 413
    streamed = iter([b"{" + b" " * 6_000] * 3 + [b"}"])  # no Content-Length: counted as it arrives
    r = admin.post("/api/projects/1/items/1/annotations", content=streamed,
                   headers={"X-CSRF-Token": admin.csrf, "content-type": "application/json"})
    assert r.status_code == 413
    with app.state.sessions() as db:
        assert db.scalars(select(Item)).all() == []


def test_imports_are_one_transaction_and_name_file_and_line(app):
    admin, = clients(app, "admin")
    pid = create_project(admin, k=2)
    bad = b'{"prompt": "fine", "id": "a"}\n\n{"prompt": "  "}\n'
    r = admin.form(f"/admin/projects/{pid}/import/prompts", files={"file": ("mine.jsonl", bad)})
    assert r.status_code == 422 and "mine.jsonl:3: prompt: the prompt is empty" in r.text
    r = admin.form(f"/admin/projects/{pid}/import/prompts", files={"file": ("mine.jsonl", b'{"prompt": "x"}\nnot json\n')})
    assert r.status_code == 422 and "mine.jsonl:2: invalid JSON" in r.text
    with app.state.sessions() as db:
        assert db.scalars(select(Item)).all() == []  # the good first lines were not kept
    csv = b'id,prompt\nc1,"A prompt, with a comma"\nc2,"Two\nlines"\n'
    r = admin.form(f"/admin/projects/{pid}/import/prompts", files={"file": ("p.csv", csv)})
    assert r.status_code == 200 and "imported 2 prompts" in r.text
    r = admin.form(f"/admin/projects/{pid}/import/prompts", files={"file": ("p.csv", b"id,prompt\nc1,again\n")})
    assert r.status_code == 422 and "p.csv:2: id &#39;c1&#39; is already in the project" in r.text
    r = admin.form(f"/admin/projects/{pid}/import/completions",
                   files={"file": ("c.jsonl", jsonl([{"id": "c1", "prompt": "?", "completions": ["a", "b", "c"]}]))})
    assert r.status_code == 422 and "c.jsonl:1: completions: the project asks for 2 per prompt, got 3" in r.text
    r = admin.form(f"/admin/projects/{pid}/import/completions",
                   files={"file": ("c.jsonl", jsonl([{"id": "c1", "prompt": "?", "completions": ["same", "same"]}]))})
    assert r.status_code == 422 and "c.jsonl:1: completions: the same completion appears twice" in r.text
    r = admin.form(f"/admin/projects/{pid}/import/completions",
                   files={"file": ("c.jsonl", jsonl([{"id": "c2", "prompt": "?", "completions": ["x", "y"], "model": "m1"}]))})
    assert r.status_code == 200
    with app.state.sessions() as db:
        item = db.scalar(select(Item).where(Item.external_id == "c2"))
        assert item.prompt == "Two\nlines" and [c.text for c in item.completions] == ["x", "y"]
        assert item.completions[0].source == "m1"


def test_admin_pages_projects_and_users(app):
    admin, alice = clients(app, "admin", "alice")
    assert "New project" in admin.get("/admin").text
    r = admin.form("/admin/projects", {"name": "pw", "k": 3, "annotators_per_item": 1, "questions": ["pairwise"],
                                       "guidelines": "Long *guidelines* typed with care", "members": ["alice"]})
    assert r.status_code == 422 and "K to 2" in r.text
    # The form comes back as it was filled in.
    assert ">Long *guidelines* typed with care</textarea>" in r.text and 'value="pw"' in r.text
    assert re.search(r'value="pairwise"\s+checked', r.text) and re.search(r'value="alice"\s+checked', r.text)
    r = admin.form("/admin/projects", {"name": "bad", "k": 3, "annotators_per_item": 1, "questions": ["ranking", "pairwise"]})
    assert r.status_code == 422
    pid = create_project(admin, name="pw", k=2, annotators=1, questions=("pairwise",))
    assert admin.form("/admin/projects", {"name": "pw", "k": 2, "annotators_per_item": 1,
                                          "questions": ["ranking"]}).status_code == 409
    admin.form(f"/admin/projects/{pid}/import/completions",
               files={"file": ("c.jsonl", jsonl([{"prompt": "p", "completions": ["first", "second"]}]))})
    page, item_id = annotate_page(alice, pid)
    assert 'name="pairwise"' in page.text
    assert alice.form(f"/projects/{pid}/items/{item_id}/submit", {"k": 2, "pairwise": "b"}).status_code == 200
    pairs = admin.get(f"/admin/projects/{pid}/export/pairs").text
    assert json.loads(pairs) == {"prompt": "p", "chosen": "second", "rejected": "first"}

    r = admin.form("/admin/users", {"username": "dave", "password": "short", "role": "annotator"})
    assert r.status_code == 422 and "8 to 1024 characters" in r.text
    assert admin.form("/admin/users", {"username": "dave", "password": PASSWORD, "role": "annotator"}).status_code == 200
    dave = Client(app).login("dave")
    assert dave.get("/admin").status_code == 403
    with app.state.sessions() as db:
        dave_id, admin_id = (db.scalar(select(User.id).where(User.username == n)) for n in ("dave", "admin"))
    admin.form(f"/admin/users/{dave_id}/role", {"role": "admin"})
    assert dave.get("/admin").status_code == 200  # roles are checked on each request, not cached in the session
    r = admin.form(f"/admin/users/{admin_id}/role", {"role": "annotator"})
    assert r.status_code == 422 and "your own admin role" in r.text


def test_api_tokens_for_scripts(app):
    admin, alice, bob, pid = seeded(app)
    with app.state.sessions() as db:
        bob_id = db.scalar(select(User.id).where(User.username == "bob"))
    page = admin.form(f"/admin/users/{bob_id}/tokens", {"name": "labeller"}).text
    token = re.search(r'id="new-token">([^<]+)<', page).group(1)
    script = Client(app)
    auth = {"Authorization": f"Bearer {token}"}
    assert script.get("/api/me", headers=auth).json() == {"username": "bob", "role": "annotator"}
    assert script.get("/api/me", headers={"Authorization": "Bearer wrong"}).status_code == 401
    item = script.get(f"/api/projects/{pid}/next", headers=auth).json()
    ratings = [{"helpful": 2, "honest": 2, "harmless": 2}] * 3
    r = script.post(f"/api/projects/{pid}/items/{item['id']}/annotations", json={"ranks": [3, 2, 1], "ratings": ratings},
                    headers=auth)  # no CSRF token needed: a browser cannot send this header cross-site
    assert r.status_code == 201
    assert script.post(f"/api/projects/{pid}/items/{item['id'] + 1}/skip", headers=auth).status_code == 201
    assert script.get(f"/api/projects/{pid}/export/pairs", headers=auth).status_code == 403
    admin_token = re.search(r'id="new-token">([^<]+)<', admin.form("/admin/users/1/tokens").text).group(1)
    rankings = script.get(f"/api/projects/{pid}/export/rankings", headers={"Authorization": f"Bearer {admin_token}"})
    assert rankings.status_code == 200 and json.loads(rankings.text)["ranks"] == [3, 2, 1]
    assert script.get(f"/api/projects/{pid}/next", headers=auth).json()["id"] == item["id"] + 2
    script.post(f"/api/projects/{pid}/items/{item['id'] + 2}/skip", headers=auth)
    assert script.get(f"/api/projects/{pid}/next", headers=auth).status_code == 204
    schema = script.get("/api/openapi.json").json()["paths"]
    assert {"post", "put"} <= set(schema["/api/projects/{project_id}/items/{item_id}/annotations"])


def test_cli_create_admin_and_export(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()
    r = runner.invoke(cli_app, ["feedback", "create-admin", "--username", "root", "--database-url", url,
                                "--password-stdin"], input=PASSWORD + "\n")
    assert r.exit_code == 0, r.output
    from rlhfkit.feedback.app import create_app

    app = create_app(url)
    add_user(app, "alice")
    add_user(app, "bob")
    root, alice, bob = (Client(app).login(n) for n in ("root", "alice", "bob"))
    pid = create_project(root, name="cli", k=2, annotators=2, questions=("ranking",), members=("alice", "bob"))
    root.form(f"/admin/projects/{pid}/import/completions",
              files={"file": ("c.jsonl", jsonl([{"prompt": "p", "completions": ["good", "bad"]}]))})
    for client in (alice, bob):
        item = client.get(f"/api/projects/{pid}/next").json()
        client.post(f"/api/projects/{pid}/items/{item['id']}/annotations", json={"ranks": [1, 2]},
                    headers={"X-CSRF-Token": client.csrf})
    out = tmp_path / "pairs.jsonl"
    r = runner.invoke(cli_app, ["feedback", "export", "--project", "cli", "--kind", "pairs", "--output", str(out),
                                "--database-url", url])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text()) == {"prompt": "p", "chosen": "good", "rejected": "bad"}
    r = runner.invoke(cli_app, ["feedback", "export", "--project", "nope", "--kind", "sft", "--output",
                                str(tmp_path / "x.jsonl"), "--database-url", url])
    assert r.exit_code != 0 and "no project named 'nope'" in str(r.exception)


def test_cli_serve_migrates_and_runs_the_app(tmp_path, monkeypatch):
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(app=app, **kwargs))
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    r = CliRunner().invoke(cli_app, ["feedback", "serve", "--database-url", url, "--port", "8123"])
    assert r.exit_code == 0, r.output
    assert served["port"] == 8123 and served["host"] == "127.0.0.1" and "http://127.0.0.1:8123" in r.output
    add_user(served["app"], "alice")  # the schema is there: serve migrated the new database
    assert Client(served["app"]).login("alice").get("/api/me").json()["username"] == "alice"


def test_the_app_starts_without_torch():
    """The server imports torch only when a sampling job runs (a restart takes seconds, not tens of seconds)."""
    import subprocess
    import sys

    code = "import sys, rlhfkit.feedback.app, rlhfkit.feedback.cli; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
