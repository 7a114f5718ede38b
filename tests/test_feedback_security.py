"""The feedback app attacked: each test reproduces one hole found when the app was tried as an attacker (issue 14's
numbered list) and checks that it is closed. Tests taking `app` run on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from feedback_helpers import (  # noqa: F401
    PASSWORD, Client, add_user, annotate_page, clients, create_project, csrf_of, database_url, jsonl, make_app, seeded,
    serving,
)
from sqlalchemy import func, select
from typer.testing import CliRunner

from rlhfkit.cli import app as cli_app
from rlhfkit.data.jsonl import parse_jsonl
from rlhfkit.errors import DataError
from rlhfkit.feedback.auth import LoginRateLimiter
from rlhfkit.feedback.db import Annotation, Completion, Item, Job, User

RATINGS = [{"helpful": 3, "honest": 3, "harmless": 3}] * 3


@pytest.fixture
def app(database_url):
    return make_app(database_url)


def count(app, model) -> int:
    with app.state.sessions() as db:
        return db.scalar(select(func.count()).select_from(model))


def item_ids(app, pid: int) -> list[int]:
    with app.state.sessions() as db:
        return list(db.scalars(select(Item.id).where(Item.project_id == pid).order_by(Item.position)))


# 1. An item without completions took an empty ranking, and from then on the project's pages and exports failed.

def test_an_item_without_completions_takes_no_answer_and_old_bad_answers_break_nothing(app, tmp_path):
    admin, alice = clients(app, "admin", "alice")
    pid = create_project(admin, k=2, questions=("ranking",))
    admin.form(f"/admin/projects/{pid}/import/prompts", files={"file": ("p.jsonl", jsonl([{"prompt": "p", "id": "a"}]))})
    empty, = item_ids(app, pid)
    r = alice.post(f"/api/projects/{pid}/items/{empty}/annotations", json={"ranks": []}, headers={"X-CSRF-Token": alice.csrf})
    assert r.status_code == 409 and "no completions" in r.json()["detail"]
    assert count(app, Annotation) == 0

    # A database written before the fix may hold such an answer: pages, exports and the CLI must still work.
    with app.state.sessions() as db:
        alice_id = db.scalar(select(User.id).where(User.username == "alice"))
        db.add(Annotation(item_id=empty, user_id=alice_id, status="submitted", ranks=[], seconds_spent=1.0))
        db.commit()
    r = admin.form(f"/admin/projects/{pid}/import/completions",
                   files={"file": ("c.jsonl", jsonl([{"id": "a", "prompt": "p", "completions": ["x", "y"]}]))})
    assert r.status_code == 200 and "imported 1 completions" in r.text
    page = admin.get(f"/admin/projects/{pid}")
    assert page.status_code == 200 and "1 answer does not fit its item" in page.text
    for kind in ("rankings", "pairs", "sft"):
        assert admin.get(f"/admin/projects/{pid}/export/{kind}").text == ""
        assert admin.get(f"/api/projects/{pid}/export/{kind}").status_code == 200
    url = str(app.state.engine.url.render_as_string(hide_password=False))
    r = CliRunner().invoke(cli_app, ["feedback", "export", "--project", "demo", "--kind", "pairs",
                                     "--output", str(tmp_path / "pairs.jsonl"), "--database-url", url])
    assert r.exit_code == 0, r.output


# 2. Login rate limit: not atomic, fooled by X-Forwarded-For, and a way to lock anyone out.

def _login_form(client: httpx.Client) -> str:
    return csrf_of(client.get("/login").text)


def test_parallel_wrong_passwords_get_exactly_the_limit(tmp_path):
    app = make_app(f"sqlite:///{tmp_path / 'f.db'}")
    with serving(app) as base:
        browsers = [httpx.Client(base_url=base, timeout=120) for _ in range(30)]
        tokens = [_login_form(b) for b in browsers]
        answers = []

        def guess(browser, token):
            answers.append(browser.post("/login", data={"username": "bob", "password": "wrong guess!",
                                                        "csrf_token": token}).status_code)

        threads = [threading.Thread(target=guess, args=pair) for pair in zip(browsers, tokens)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(answers) == [401] * 5 + [429] * 25


def test_forwarded_for_is_ignored_unless_the_proxy_is_trusted(tmp_path, monkeypatch):
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(app=app, **kwargs))
    url = f"sqlite:///{tmp_path / 'f.db'}"
    assert CliRunner().invoke(cli_app, ["feedback", "serve", "--database-url", url]).exit_code == 0
    app = served.pop("app")
    served.pop("port")
    with serving(app, **served) as base, httpx.Client(base_url=base, timeout=60) as client:
        token = _login_form(client)
        statuses = [client.post("/login", headers={"X-Forwarded-For": f"10.0.{n // 250}.{n % 250}"},
                                data={"username": f"user{n}", "password": "wrong guess!", "csrf_token": token}).status_code
                    for n in range(31)]
    assert statuses == [401] * 30 + [429]  # 30 per address: the header did not make 31 addresses

    served.clear()
    assert CliRunner().invoke(cli_app, ["feedback", "serve", "--database-url", url, "--trusted-proxy", "127.0.0.1"]).exit_code == 0
    assert served["proxy_headers"] is True and served["forwarded_allow_ips"] == "127.0.0.1"


def test_wrong_passwords_do_not_lock_out_a_known_browser(app):
    admin_browser = Client(app).login("admin")  # logged in from this browser before: it holds a device cookie
    admin_browser.form("/logout")
    attacker = Client(app)
    token = csrf_of(attacker.get("/login").text)
    for _ in range(5):
        assert attacker.post("/login", data={"username": "admin", "password": "wrong guess!", "csrf_token": token}).status_code == 401
    assert attacker.post("/login", data={"username": "admin", "password": PASSWORD, "csrf_token": token}).status_code == 429
    assert admin_browser.login("admin")  # the attacker's failures did not lock the admin's own browser
    stranger = Client(app)  # a browser that never logged in as admin is held back until the window passes
    assert stranger.post("/login", data={"username": "admin", "password": PASSWORD,
                                         "csrf_token": csrf_of(stranger.get("/login").text)}).status_code == 429


def test_usernames_differing_in_case_share_one_limit(app):
    attacker = Client(app)
    token = csrf_of(attacker.get("/login").text)
    for name in ("bob", "Bob", "BOB", "bOb", "boB"):
        assert attacker.post("/login", data={"username": name, "password": "wrong guess!", "csrf_token": token}).status_code == 401
    assert attacker.post("/login", data={"username": "BoB", "password": "wrong guess!", "csrf_token": token}).status_code == 429


def test_the_limiter_forgets_keys_once_their_window_has_passed():
    now = [0.0]
    limiter = LoginRateLimiter(limit=5, window=300, clock=lambda: now[0])
    for n in range(10_000):
        assert limiter.reserve(f"user{n}") is not None  # a failed attempt: its reservation stands
    assert len(limiter) == 10_000
    now[0] = 301.0
    limiter.reserve("someone").release()
    assert len(limiter) == 0


# 4. Limits at submit: only items handed to you, never past the item's annotators, time measured by the server.

def test_answers_only_to_items_handed_out_and_within_the_limit(app):
    admin, alice, bob, pid = seeded(app, annotators=1)
    headers = {"X-CSRF-Token": alice.csrf}
    mine = alice.get(f"/api/projects/{pid}/next").json()["id"]
    other = next(i for i in item_ids(app, pid) if i != mine)
    r = alice.post(f"/api/projects/{pid}/items/{other}/annotations", json={"ranks": [1, 2, 3], "ratings": RATINGS},
                   headers=headers)
    assert r.status_code == 409 and "not handed to you" in r.json()["detail"]

    # Alice's hold on her item runs out, bob is handed it and answers: the one slot is taken.
    from sqlalchemy import update

    from rlhfkit.feedback.db import Assignment, utcnow
    with app.state.sessions() as db:
        db.execute(update(Assignment).where(Assignment.item_id == mine).values(expires_at=utcnow()))
        db.commit()
    bob_items = set()
    while (r := bob.get(f"/api/projects/{pid}/next")).status_code == 200:
        bob_items.add(r.json()["id"])
        bob.post(f"/api/projects/{pid}/items/{r.json()['id']}/annotations", json={"ranks": [1, 2, 3], "ratings": RATINGS},
                 headers={"X-CSRF-Token": bob.csrf})
    assert mine in bob_items
    r = alice.post(f"/api/projects/{pid}/items/{mine}/annotations",
                   json={"ranks": [3, 2, 1], "ratings": RATINGS, "seconds_spent": 86_000}, headers=headers)
    assert r.status_code == 409 and "all its annotators" in r.json()["detail"]
    with app.state.sessions() as db:
        assert db.scalar(select(func.count()).select_from(Annotation).where(Annotation.item_id == mine)) == 1


def test_time_spent_is_measured_by_the_server(app):
    admin, alice, bob, pid = seeded(app)
    item = alice.get(f"/api/projects/{pid}/next").json()
    r = alice.post(f"/api/projects/{pid}/items/{item['id']}/annotations",
                   json={"ranks": [1, 2, 3], "ratings": RATINGS, "seconds_spent": 86_000}, headers={"X-CSRF-Token": alice.csrf})
    assert r.status_code == 201 and r.json()["seconds_spent"] < 600


# 6. Malformed input: 4xx (never 500) and nothing half-stored.

BAD_BODIES = {
    "NaN": b'{"ranks": [1, 2, 3], "ideal_response": NaN}',
    "Infinity": b'{"ranks": [1, 2, 3], "ratings": [{"helpful": Infinity, "honest": 1, "harmless": 1}]}',
    "-Infinity": b'{"ranks": [1, -Infinity, 3]}',
    "1e400": b'{"ranks": [1, 2, 1e400]}',
    "lone surrogate": b'{"ranks": [1, 2, 3], "ideal_response": "\\ud800"}',
    "lone surrogate in a list": b'{"ranks": [1, 2, "\\ud800"]}',
    "deeply nested": b'{"ranks": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "nested just under the parser's limit": b'{"ranks": ' + b"[" * 980 + b"]" * 980 + b"}",
    "5000-digit integer": b'{"ranks": [1, 2, ' + b"9" * 5000 + b"]}",
    "NUL": b'{"ranks": [1, 2, 3], "ideal_response": "a\\u0000b"}',
    "not UTF-8": b'{"ranks": [1, 2, 3], "ideal_response": "\xff"}',
}


def test_malformed_json_bodies_get_4xx_and_store_nothing(app):
    admin, alice, bob, pid = seeded(app, questions=("ranking", "ratings", "ideal"))
    item = alice.get(f"/api/projects/{pid}/next").json()
    url = f"/api/projects/{pid}/items/{item['id']}/annotations"
    headers = {"X-CSRF-Token": alice.csrf, "content-type": "application/json"}
    for name, body in BAD_BODIES.items():
        r = alice.post(url, content=body, headers=headers)
        assert r.status_code in (400, 422), (name, r.status_code)
        assert isinstance(r.json()["detail"], (str, list)), name
    assert count(app, Annotation) == 0
    for too_large in (2**31, 2**63, "9" * 5000):  # ids beyond any column
        assert alice.get(f"/api/projects/{too_large}/next").status_code in (404, 422)
        assert alice.get(f"/api/annotations/{too_large}").status_code in (404, 422)
        assert admin.get(f"/admin/projects/{too_large}").status_code in (404, 422)


BAD_IMPORTS = {
    ("prompts", "deep.jsonl"): (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "deep.jsonl:1: invalid JSON"),
    ("prompts", "digits.jsonl"): (b'{"prompt": "x", "id": ' + b"9" * 5000 + b"}\n", "digits.jsonl:1: invalid JSON"),
    ("prompts", "surrogate.jsonl"): (b'{"prompt": "ok"}\n{"prompt": "\\ud800"}\n', "surrogate.jsonl:2: prompt"),
    ("completions", "surrogate.jsonl"): (b'{"prompt": "p", "completions": ["\\udfff", "b", "c"]}\n',
                                          "surrogate.jsonl:1: completions"),
    ("prompts", "nul.jsonl"): (b'{"prompt": "a\\u0000b"}\n', "nul.jsonl:1: prompt"),
    ("prompts", "long-id.jsonl"): (json.dumps({"prompt": "p", "id": "i" * 201}).encode(), "long-id.jsonl:1: id"),
    ("completions", "long-model.jsonl"): (json.dumps({"prompt": "p", "completions": ["a", "b", "c"],
                                                      "model": "m" * 301}).encode(), "long-model.jsonl:1: model"),
    ("prompts", "wide.csv"): (b"id,prompt\nx," + b"y" * 140_000 + b"\n", "wide.csv:2"),
}


def test_malformed_imports_get_422_naming_file_and_line_and_store_nothing(app):
    admin, = clients(app, "admin")
    pid = create_project(admin)
    for (what, name), (content, message) in BAD_IMPORTS.items():
        r = admin.form(f"/admin/projects/{pid}/import/{what}", files={"file": (name, content)})
        assert r.status_code == 422 and message in r.text, (name, r.status_code, r.text[-500:])
    assert count(app, Item) == count(app, Completion) == 0
    # Separators that str.splitlines() would break on are text inside a JSON string, not line ends.
    odd = "a\u2028b\u0085c\x1ed\x1cf"
    r = admin.form(f"/admin/projects/{pid}/import/prompts", files={"file": ("odd.jsonl", jsonl([{"prompt": odd}]))})
    assert r.status_code == 200 and "imported 1 prompts" in r.text
    with app.state.sessions() as db:
        assert db.scalar(select(Item.prompt)) == odd


def test_jsonl_parser_reports_nesting_and_huge_integers_as_file_and_line():
    for line in ("[" * 100_000 + "]" * 100_000, '{"a": ' + "1" * 5000 + "}"):
        with pytest.raises(DataError, match=r"^f\.jsonl:2: invalid JSON"):
            list(parse_jsonl("f.jsonl", ['{"ok": 1}', line]))


def test_malformed_form_fields_get_4xx_and_store_nothing(app):
    admin, = clients(app, "admin")
    pid = create_project(admin)
    nul = "a\x00b"
    assert admin.form("/admin/projects", {"name": nul, "k": 2, "annotators_per_item": 1, "questions": ["ranking"]}).status_code == 422
    assert admin.form("/admin/projects", {"name": "g", "k": 2, "annotators_per_item": 1, "questions": ["ranking"],
                                          "guidelines": nul}).status_code == 422
    assert admin.form("/admin/users", {"username": nul, "password": PASSWORD, "role": "annotator"}).status_code == 422
    assert admin.form("/admin/users", {"username": "eve", "password": nul * 5, "role": "annotator"}).status_code == 422
    assert admin.form(f"/admin/projects/{pid}/generate", {"model": nul}).status_code == 422
    assert admin.form("/admin/users/1/tokens", {"name": nul}).status_code == 422
    stranger = Client(app)
    r = stranger.post("/login", data={"username": nul, "password": PASSWORD, "csrf_token": csrf_of(stranger.get("/login").text)})
    assert r.status_code == 401
    assert count(app, User) == 4 and count(app, Job) == 0
    with app.state.sessions() as db:
        assert [p for p in db.scalars(select(func.count()).select_from(Item))] == [0]


# 8. Smaller holes.

@pytest.mark.parametrize("lookalike", ["Alice", "ALICE", "al\u200bice", "\u0430lice", "alice\u0301", "alice ", "al ice"])
def test_lookalike_usernames_are_refused(app, lookalike):
    admin, = clients(app, "admin")
    r = admin.form("/admin/users", {"username": lookalike, "password": PASSWORD, "role": "annotator"})
    assert r.status_code in (409, 422), lookalike
    assert count(app, User) == 4


def test_the_new_token_page_is_not_cached(app):
    admin, = clients(app, "admin")
    r = admin.form("/admin/users/2/tokens", {"name": "script"})
    assert r.status_code == 200 and 'id="new-token"' in r.text
    assert r.headers["cache-control"] == "no-store"


def test_the_model_field_does_not_tell_which_server_paths_exist(tmp_path, database_url):
    app = make_app(database_url, model_dir=tmp_path / "models")
    admin, = clients(app, "admin")
    pid = create_project(admin)
    answers = [admin.form(f"/admin/projects/{pid}/generate", {"model": path}) for path in
               ("/etc", "/etc/passwd", "/no/such/path", "../../etc", str(tmp_path))]
    assert {r.status_code for r in answers} == {422}
    messages = {r.text.split('role="alert">', 1)[1].split("<", 1)[0] for r in answers}
    assert len(messages) == 1 and "under" in messages.pop()
    assert count(app, Job) == 0
