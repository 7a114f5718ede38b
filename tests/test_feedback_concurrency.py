"""The feedback app under concurrent requests (issue 14, holes 5 and 7): admin actions racing each other, a
sampling job racing an import, lock waits answered 503 with Retry-After, and large imports written in chunks that
stay invisible until done and never hold annotators up. Tests taking `database_url` run on SQLite and PostgreSQL."""

from __future__ import annotations

import threading

import httpx
import pytest
from feedback_helpers import (  # noqa: F401
    PASSWORD, Client, clients, create_project, csrf_of, database_url, jsonl, logged_in, make_app, seeded, serving,
)
from sqlalchemy import create_engine, func, select, text

from rlhfkit.feedback import importing, jobs
from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.db import Completion, Item, Job, Project, User, normalize_url

RATINGS = [{"helpful": 3, "honest": 3, "harmless": 3}] * 3


def at_once(calls) -> list[int]:
    """Run the calls in parallel threads, released together; their status codes."""
    start, codes = threading.Barrier(len(calls)), []

    def run(call):
        start.wait()
        codes.append(call().status_code)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes


def test_simultaneous_creations_of_one_name_give_one_and_409s(database_url):
    app = make_app(database_url)
    with serving(app) as base:
        admins = logged_in(base, "admin", 12)
        project = {"name": "race", "k": 2, "annotators_per_item": 1, "questions": "ranking"}
        codes = at_once([lambda c=c, t=t: c.post("/admin/projects", data={**project, "csrf_token": t}) for c, t in admins])
        assert sorted(codes) == [303] + [409] * 11
        names = ["dave", "Dave", "DAVE", "dAve"] * 3  # one account, whatever the case
        codes = at_once([lambda c=c, t=t, n=n: c.post("/admin/users", data={"username": n, "password": "a long password",
                                                                           "role": "annotator", "csrf_token": t})
                         for (c, t), n in zip(admins, names)])
        assert sorted(codes) == [303] + [409] * 11
    with app.state.sessions() as db:
        assert db.scalar(select(func.count()).select_from(Project)) == 1
        assert db.scalar(select(func.count()).select_from(User).where(User.username_key == "dave")) == 1


@pytest.fixture
def fake_sampler(monkeypatch):
    """A sampler that holds each batch until the test releases it, and answers "sample N of <prompt>"."""
    from rlhfkit import rollout

    gate = {"started": threading.Event(), "go": threading.Event(), "count": 0}

    def generate_responses(model, tokenizer, prompts, num_samples=1, **kwargs):
        gate["started"].set()
        assert gate["go"].wait(30), "the test never released the sampler"
        gate["count"] += 1
        return [f"sample {gate['count']}.{i} of {p}" for i, p in enumerate(p for p in prompts for _ in range(num_samples))]

    monkeypatch.setattr(jobs, "load_generator", lambda model: (None, None))
    monkeypatch.setattr(rollout, "generate_responses", generate_responses)
    return gate


def wait_for(app, job_id: int) -> Job:
    import time

    for _ in range(600):
        with app.state.sessions() as db:
            job = db.get(Job, job_id)
            if job.status not in ("queued", "running"):
                return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end")


def test_simultaneous_starts_of_sampling_create_one_job(database_url, fake_sampler):
    app = make_app(database_url)
    admin, = clients(app, "admin")
    pid = create_project(admin, k=2)
    admin.form(f"/admin/projects/{pid}/import/prompts", files={"file": ("p.jsonl", jsonl([{"prompt": "hi"}]))})
    with serving(app) as base:
        admins = logged_in(base, "admin", 8)
        codes = at_once([lambda c=c, t=t: c.post(f"/admin/projects/{pid}/generate",
                                                 data={"model": "smollm2-135m-instruct", "csrf_token": t})
                         for c, t in admins])
    assert sorted(codes) == [303] + [409] * 7
    fake_sampler["go"].set()
    with app.state.sessions() as db:
        job_ids = db.scalars(select(Job.id).where(Job.kind == "generate")).all()
    assert len(job_ids) == 1 and wait_for(app, job_ids[0]).status == "done"


def test_completions_imported_during_sampling_are_kept_and_the_job_fills_the_rest(database_url, fake_sampler):
    app = make_app(database_url)
    admin, = clients(app, "admin")
    pid = create_project(admin, k=2, questions=("ranking",))
    prompts = [{"prompt": f"Question {i}?", "id": f"q{i}"} for i in range(4)]
    admin.form(f"/admin/projects/{pid}/import/prompts", files={"file": ("p.jsonl", jsonl(prompts))})
    admin.form(f"/admin/projects/{pid}/generate", {"model": "smollm2-135m-instruct", "max_new_tokens": 8})
    assert fake_sampler["started"].wait(30)  # the job has read the empty items and is sampling the first batch
    imported = [{"id": "q0", "prompt": "Question 0?", "completions": ["mine A", "mine B"]},
                {"id": "q3", "prompt": "Question 3?", "completions": ["mine C", "mine D"]}]
    r = admin.form(f"/admin/projects/{pid}/import/completions", files={"file": ("c.jsonl", jsonl(imported))})
    assert r.status_code == 200 and "imported 2 completions" in r.text
    fake_sampler["go"].set()
    with app.state.sessions() as db:
        job = wait_for(app, db.scalar(select(Job.id).where(Job.kind == "generate")))
        assert job.status == "done" and "2 got completions from an import" in job.message, job.message
        texts = {item.external_id: [c.text for c in item.completions] for item in db.scalars(select(Item))}
    assert texts["q0"] == ["mine A", "mine B"] and texts["q3"] == ["mine C", "mine D"]
    assert all(len(t) == 2 and t[0].startswith("sample") for key, t in texts.items() if key in ("q1", "q2"))


def _hold_the_lock(database_url: str, project_id: int):
    """A connection from outside the app that holds the lock an annotator's request needs: SQLite's write lock,
    or on PostgreSQL the project's row."""
    engine = create_engine(normalize_url(database_url))
    connection = engine.connect()
    if engine.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        connection.execute(text("SELECT id FROM projects WHERE id = :id FOR UPDATE"), {"id": project_id})
    return engine, connection


def test_a_lock_wait_ends_in_503_with_retry_after(database_url):
    make_app(database_url)  # users
    app = create_app(database_url, lock_timeout=0.5)
    admin, alice = clients(app, "admin", "alice")
    pid = create_project(admin, k=2, questions=("ranking",))
    admin.form(f"/admin/projects/{pid}/import/completions",
               files={"file": ("c.jsonl", jsonl([{"prompt": "p", "completions": ["a", "b"]}]))})
    engine, connection = _hold_the_lock(database_url, pid)
    try:
        api = alice.get(f"/api/projects/{pid}/next")
        page = alice.get(f"/projects/{pid}/annotate")
    finally:
        connection.rollback()
        connection.close()
        engine.dispose()
    assert api.status_code == 503 and api.headers["retry-after"] == "5" and "busy" in api.json()["detail"]
    assert page.status_code == 503 and page.headers["retry-after"] == "5" and "busy" in page.text
    assert alice.get(f"/api/projects/{pid}/next").status_code == 200  # and all is well once the lock is gone


def test_a_large_import_lets_annotators_through_and_shows_only_when_done(database_url, monkeypatch):
    make_app(database_url)  # users
    app = create_app(database_url, lock_timeout=0.5)
    admin, alice, bob, pid = seeded(app, questions=("ranking",), annotators=1)
    monkeypatch.setattr(importing, "CHUNK_ROWS", 10)
    midway, go_on = threading.Event(), threading.Event()
    write_chunk = importing._progress

    def pausing_progress(db, job, rows):
        write_chunk(db, job, rows)  # the chunk is committed ...
        if job.done == 45:  # the 35 new items and 10 of their sets of completions
            midway.set()  # ... and the import waits here until the annotators have had their turn
            assert go_on.wait(30)

    monkeypatch.setattr(importing, "_progress", pausing_progress)
    lines = [{"prompt": f"p{i}", "id": f"new{i}", "completions": [f"x{i}", f"y{i}", f"z{i}"]} for i in range(35)]
    answers = {}
    importer = threading.Thread(target=lambda: answers.setdefault("import", admin.form(
        f"/admin/projects/{pid}/import/completions", files={"file": ("big.jsonl", jsonl(lines))})))
    importer.start()
    assert midway.wait(30)
    with app.state.sessions() as db:
        written = db.scalar(select(func.count()).select_from(Item).where(Item.external_id.like("new%")))
    seen = []
    while (r := alice.get(f"/api/projects/{pid}/next")).status_code == 200:  # lock wait limit 0.5 s: no waiting
        seen.append(r.json()["id"])
        assert alice.post(f"/api/projects/{pid}/items/{seen[-1]}/annotations", json={"ranks": [1, 2, 3]},
                          headers={"X-CSRF-Token": alice.csrf}).status_code == 201
    page = admin.get(f"/admin/projects/{pid}")
    go_on.set()
    importer.join()
    assert written == 35 and len(seen) == 3  # the import's rows were there, but the queue served only the old items
    assert "3 prompts" in page.text  # nor did the admin page count them
    assert answers["import"].status_code == 200 and "imported 35 completions" in answers["import"].text
    assert alice.get(f"/api/projects/{pid}/progress").json()["available"] == 35  # all of them at once


def test_an_import_cut_short_by_a_server_stop_is_removed_and_can_run_again(database_url):
    app = make_app(database_url)
    admin, = clients(app, "admin")
    pid = create_project(admin, k=2)
    admin.form(f"/admin/projects/{pid}/import/prompts", files={"file": ("p.jsonl", jsonl([{"prompt": "kept", "id": "k"}]))})
    with app.state.sessions() as db:  # what a server killed halfway through an import leaves behind
        job = Job(project_id=pid, kind="import", status="running", total=2, done=1, params={"file": "big.jsonl"})
        db.add(job)
        db.flush()
        db.add(Item(project_id=pid, external_id="half", prompt="half", position=2, import_job_id=job.id))
        db.flush()
        kept = db.scalar(select(Item.id).where(Item.external_id == "k"))
        db.add(Completion(item_id=kept, position=0, text="half", import_job_id=job.id))
        db.commit()
        job_id = job.id
    assert "1 prompts" in admin.get(f"/admin/projects/{pid}").text  # never visible
    restarted = create_app(database_url)
    admin = Client(restarted).login("admin")
    with restarted.state.sessions() as db:
        job = db.get(Job, job_id)
        assert job.status == "interrupted" and "nothing of the file was kept" in job.message
    # Imported again at once (the rows left behind may not be deleted yet): the same ids are free.
    r = admin.form(f"/admin/projects/{pid}/import/prompts", files={"file": ("big.jsonl", jsonl([{"prompt": "again", "id": "half"}]))})
    assert r.status_code == 200, r.text
    restarted.state.cleanup.join(30)
    with restarted.state.sessions() as db:
        assert sorted(db.scalars(select(Item.prompt))) == ["again", "kept"]
        assert db.scalars(select(Completion)).all() == []
