"""Load test of the feedback app: N concurrent annotators with API tokens (threads with httpx posting JSON) and M
browser annotators (a session cookie from the login form, the annotate page, form posts with the session's CSRF
token) against a local server (a `rlhfkit feedback serve` subprocess on 127.0.0.1), while an admin imports a large
prompts file into the same project (uploaded once a quarter of the submissions are in, so that it is usually still
running at the kill); the server is killed (SIGKILL) and restarted when half the submissions are in.

At the end, every acknowledged submission (HTTP 201 from the API, 303 from the form) must be in the database with
its item and annotator, and no annotator request may have failed, for either kind of annotator: any answer but
200, 201 and 204 (tokens) or 200 and 303 (browsers) counts as a failure. Connections refused while the server is
down are retried (the next item is asked for again) and counted apart. An import cut short by the kill is started
again after the restart, as an admin would. Prints, per kind of annotator, submissions/s and submission latency
percentiles; the import's duration, and the failures. The run is bounded: it stops (and fails) after
--max-seconds.

    .venv/bin/python benchmarks/feedback_load.py                       # SQLite in a temporary directory
    .venv/bin/python benchmarks/feedback_load.py --database-url postgresql://user:password@host/db   # emptied first!
    .venv/bin/python benchmarks/feedback_load.py --import-prompts 0    # no concurrent import
    .venv/bin/python benchmarks/feedback_load.py --browsers 0          # API-token annotators only
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlalchemy import func, select, text

from rlhfkit.feedback.auth import create_api_token, create_user
from rlhfkit.feedback.db import Annotation, Item, Project, ProjectMember, User, make_engine, make_sessionmaker, migrate
from rlhfkit.feedback.importing import import_completions

PASSWORD = "load-test-password"
CSRF = re.compile(r'name="csrf_token" value="([^"]*)"')
SUBMIT_URL = re.compile(r'action="/projects/\d+/items/(\d+)/submit"')


@dataclass
class Setup:
    project_id: int
    tokens: dict[str, str]  # API-token annotators: username -> token
    browsers: list[str]  # browser annotators' usernames (they log in with PASSWORD)
    admin_token: str


def setup(database_url: str, annotators: int, browsers: int, items: int, k: int, per_item: int) -> Setup:
    """A project with `items` prompts of K completions, `annotators` members with API tokens, `browsers` members
    who will log in, an admin token."""
    engine = make_engine(database_url)
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            connection.execute(text("DROP SCHEMA public CASCADE"))
            connection.execute(text("CREATE SCHEMA public"))
    migrate(engine)
    with make_sessionmaker(engine)() as db:
        project = Project(name="load", k=k, annotators_per_item=per_item, questions=["ranking"], control_share=0.0)
        db.add(project)
        db.commit()
        lines = [json.dumps({"prompt": f"prompt {i}", "completions": [f"completion {i}.{j}" for j in range(k)]})
                 for i in range(items)]
        import_completions(db, project, "load.jsonl", "\n".join(lines).encode())
        names = [f"annotator{n:02d}" for n in range(annotators)] + [f"browser{n:02d}" for n in range(browsers)]
        users = [create_user(db, name, PASSWORD, "annotator") for name in names]
        db.add_all(ProjectMember(project_id=project.id, user_id=user.id) for user in users)
        tokens = {user.username: create_api_token(db, user, "load") for user in users[:annotators]}
        admin_token = create_api_token(db, create_user(db, "admin", PASSWORD, "admin"), "import")
        db.commit()
        return Setup(project.id, tokens, names[annotators:], admin_token)


class Unexpected(Exception):
    """An annotator request answered with a status that counts as a failure."""

    def __init__(self, what: str, response: httpx.Response):
        super().__init__(what)
        self.what, self.response = what, response


@dataclass
class Kind:
    """How one kind of annotator asks for an item and submits its ranking (an acknowledged submission: `ok`)."""

    name: str
    ok: int
    next_item: Callable[[httpx.Client, int], int | None]  # the item id, None when nothing is left
    submit: Callable[[httpx.Client, int, int, list[int]], httpx.Response]


def _api_next(client: httpx.Client, project_id: int) -> int | None:
    response = client.get(f"/api/projects/{project_id}/next")
    if response.status_code == 204:
        return None
    if response.status_code != 200:
        raise Unexpected("GET next", response)
    return response.json()["id"]


def _api_submit(client: httpx.Client, project_id: int, item_id: int, ranks: list[int]) -> httpx.Response:
    return client.post(f"/api/projects/{project_id}/items/{item_id}/annotations", json={"ranks": ranks})


def _page_next(client: httpx.Client, project_id: int) -> int | None:
    response = client.get(f"/projects/{project_id}/annotate")
    if response.status_code != 200 or "/login" in str(response.url):
        raise Unexpected("GET annotate page", response)
    match = SUBMIT_URL.search(response.text)
    return int(match.group(1)) if match else None


def _form_submit(client: httpx.Client, project_id: int, item_id: int, ranks: list[int]) -> httpx.Response:
    form = {"mode": "new", "csrf_token": client.csrf, **{f"rank_{i}": rank for i, rank in enumerate(ranks)}}
    return client.post(f"/projects/{project_id}/items/{item_id}/submit", data=form)


TOKEN = Kind("API token", 201, _api_next, _api_submit)
BROWSER = Kind("browser form", 303, _page_next, _form_submit)


def browser_login(base: str, username: str) -> httpx.Client:
    """A browser logged in through the login form, holding its session cookie and the session's CSRF token."""
    client = httpx.Client(base_url=base, timeout=120, follow_redirects=False)
    page = client.get("/login")
    response = client.post("/login", data={"username": username, "password": PASSWORD,
                                           "csrf_token": CSRF.search(page.text).group(1)})
    if response.status_code != 303:
        raise RuntimeError(f"{username} could not log in: HTTP {response.status_code}")
    client.csrf = CSRF.search(client.get("/", follow_redirects=True).text).group(1)
    return client


def start_server(database_url: str, port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "rlhfkit.cli", "feedback", "serve", "--database-url", database_url,
                               "--port", str(port)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/me", timeout=1).status_code == 401:
                return server
        except httpx.TransportError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("the server did not start within 60 s")


def prompts_file(count: int) -> bytes:
    """`count` prompts of about 47 bytes a line (100,000: 4.7 MB, the size of the file in issue 14)."""
    return "".join(json.dumps({"prompt": f"Imported question number {i:06d}, please?"}) + "\n"
                   for i in range(count)).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", help="default: SQLite in a temporary directory")
    parser.add_argument("--annotators", type=int, default=50, help="annotators with API tokens")
    parser.add_argument("--browsers", type=int, default=10, help="annotators in a browser (login form, form posts)")
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--per-item", type=int, default=3, help="annotators per item")
    parser.add_argument("--import-prompts", type=int, default=100_000,
                        help="prompts the admin imports meanwhile (0: none)")
    parser.add_argument("--max-seconds", type=float, default=900, help="stop (and fail) after this long")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="feedback-load-") as workdir:
        ok = run(args, args.database_url or f"sqlite:///{Path(workdir) / 'load.db'}")
    sys.exit(0 if ok else 1)


class Tally:
    """What the annotators saw, per kind: acknowledged submissions (item id, annotator), their latencies, the
    requests that failed (with a few examples) and the connections refused while the server was down."""

    def __init__(self):
        self.acknowledged: dict[str, list[tuple[int, str]]] = defaultdict(list)
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.failures: Counter = Counter()  # (kind, what, status)
        self.examples: list[str] = []
        self.retried: Counter = Counter()
        self.crashed: list[str] = []  # annotators stopped by an exception
        self.finished: set[str] = set()  # annotators who got to the end of their queue
        self.lock = threading.Lock()

    def count(self) -> int:
        return sum(map(len, self.acknowledged.values()))

    def ack(self, kind: str, item_id: int, username: str, seconds: float) -> None:
        with self.lock:
            self.acknowledged[kind].append((item_id, username))
            self.latencies[kind].append(seconds)

    def failed(self, kind: str, what: str, response: httpx.Response) -> None:
        with self.lock:
            self.failures[kind, what, response.status_code] += 1
            if len(self.examples) < 5:
                self.examples.append(f"{kind}: {what} {response.status_code} {response.text[:200]}")

    def percentile(self, kind: str, p: float) -> float:
        latencies = sorted(self.latencies[kind])
        return 1000 * latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] if latencies else float("nan")


def annotate(kind: Kind, client: httpx.Client, username: str, project_id: int, k: int, tally: Tally,
             deadline: float) -> None:
    """Ask for the next item and rank it at random, until nothing is left (or the run's time is up)."""
    rng = random.Random(username)
    try:
        while time.monotonic() < deadline:
            if not submit_one(kind, client, username, project_id, rng.sample(range(1, k + 1), k), tally):
                tally.finished.add(username)
                return
    except Exception as e:  # anything else ends this annotator: the run fails
        with tally.lock:
            tally.crashed.append(f"{username}: {e!r}")
        raise
    finally:
        client.close()


def submit_one(kind: Kind, client: httpx.Client, username: str, project_id: int, ranks: list[int], tally: Tally) -> bool:
    """Ask for the next item and submit `ranks` for it; False when nothing is left for this annotator."""
    try:
        item_id = kind.next_item(client, project_id)
        if item_id is None:
            return False
        started = time.perf_counter()
        response = kind.submit(client, project_id, item_id, ranks)
        elapsed = time.perf_counter() - started
    except Unexpected as e:
        tally.failed(kind.name, e.what, e.response)
        time.sleep(0.2)
        return True
    except httpx.TransportError:  # the server is down (being restarted): try again shortly
        with tally.lock:
            tally.retried[kind.name] += 1
        time.sleep(0.2)
        return True
    if response.status_code == kind.ok:
        tally.ack(kind.name, item_id, username, elapsed)
    else:
        tally.failed(kind.name, "submit", response)
    return True


def import_until_done(args: argparse.Namespace, base: str, made, tally: Tally, import_log: list[str],
                      deadline: float) -> None:
    """The admin's import: upload the prompts file once a quarter of the submissions are in; after a kill cut it
    short (the server removes such an import), upload again."""
    content = prompts_file(args.import_prompts)
    while tally.count() < args.items * args.per_item // 4:
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {made.admin_token}"}, timeout=600) as client:
        while True:
            started = time.perf_counter()
            try:
                response = client.post(f"/admin/projects/{made.project_id}/import/prompts",
                                       files={"file": ("big.jsonl", content)})
            except httpx.TransportError:
                import_log.append(f"cut short by the kill after {time.perf_counter() - started:.1f} s")
                tally.retried["import"] += 1
                while True:  # wait for the restarted server
                    try:
                        client.get("/api/me")
                        break
                    except httpx.TransportError:
                        time.sleep(0.2)
                continue
            import_log.append(f"HTTP {response.status_code} after {time.perf_counter() - started:.1f} s")
            return


def run(args: argparse.Namespace, database_url: str) -> bool:
    made = setup(database_url, args.annotators, args.browsers, args.items, args.k, args.per_item)
    expected = args.items * args.per_item
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    tally = Tally()
    import_log: list[str] = []

    server = start_server(database_url, port)
    workers = [(TOKEN, httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=120), name)
               for name, token in made.tokens.items()]
    workers += [(BROWSER, browser_login(base, name), name) for name in made.browsers]
    started = time.perf_counter()
    deadline = time.monotonic() + args.max_seconds
    threads = [threading.Thread(target=annotate, args=(kind, client, name, made.project_id, args.k, tally, deadline),
                                daemon=True) for kind, client, name in workers]
    if args.import_prompts:
        threads.append(threading.Thread(target=import_until_done, args=(args, base, made, tally, import_log, deadline),
                                        daemon=True))
    for t in threads:
        t.start()
    while tally.count() < expected // 2 and any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        time.sleep(0.01)
    acknowledged_before_restart = tally.count()
    server.send_signal(signal.SIGKILL)  # no graceful shutdown: acknowledged means committed, or the test fails
    server.wait()
    restart_began = time.perf_counter()
    server = start_server(database_url, port)
    downtime = time.perf_counter() - restart_began
    for t in threads:
        t.join(max(0.0, deadline + 5 - time.monotonic()))
    elapsed = time.perf_counter() - started
    timed_out = len(tally.finished) < len(workers)
    server.send_signal(signal.SIGTERM)
    server.wait()
    return report(args, database_url, tally, import_log, elapsed, downtime, acknowledged_before_restart, timed_out)


def report(args: argparse.Namespace, database_url: str, tally: Tally, import_log: list[str], elapsed: float,
           downtime: float, acknowledged_before_restart: int, timed_out: bool) -> bool:
    """Print what the run did and whether it passed: every acknowledged submission stored, no annotator request
    failed, done in time, and the import complete."""
    expected = args.items * args.per_item
    with make_sessionmaker(make_engine(database_url))() as db:
        stored = set(db.execute(select(Annotation.item_id, User.username).join(User)).all())
        items = db.scalar(select(func.count()).select_from(Item))
    acknowledged = [a for kind in tally.acknowledged.values() for a in kind]
    missing = [a for a in acknowledged if a not in stored]

    print(f"database: {make_engine(database_url).dialect.name}; {args.annotators} API-token annotators and "
          f"{args.browsers} browser annotators; {args.items} items x {args.per_item} annotators, K = {args.k}")
    print(f"acknowledged submissions: {len(acknowledged)} ({acknowledged_before_restart} before the kill); "
          f"stored: {len(stored)}; expected about {expected}")
    print(f"server killed and restarted halfway: {downtime:.1f} s down, connections refused meanwhile and retried: "
          f"{dict(tally.retried)}")
    print(f"throughput: {len(acknowledged) / elapsed:.1f} submissions/s over {elapsed:.1f} s (restart included)")
    for kind in (TOKEN, BROWSER):
        done = tally.acknowledged[kind.name]
        print(f"  {kind.name}: {len(done)} acknowledged, {len(done) / elapsed:.1f} /s; submission latency p50 "
              f"{tally.percentile(kind.name, 50):.0f} ms, p90 {tally.percentile(kind.name, 90):.0f} ms, "
              f"p99 {tally.percentile(kind.name, 99):.0f} ms; failed requests: "
              f"{sum(n for (name, *_), n in tally.failures.items() if name == kind.name)}")
    if args.import_prompts:
        print(f"import of {args.import_prompts} prompts ({len(prompts_file(args.import_prompts)) / 1e6:.1f} MB) "
              f"meanwhile: {'; '.join(import_log)}; items in the database at the end: {items} "
              f"(expected {args.items + args.import_prompts})")
    failures = sum(tally.failures.values())
    print(f"failed annotator requests: {failures}"
          + (f" {dict(tally.failures)}, e.g. {tally.examples}" if failures else ""))
    if tally.crashed:
        print(f"FAIL: annotators stopped by an exception: {tally.crashed[:3]}")
    if timed_out:
        print(f"FAIL: not done after {args.max_seconds:.0f} s")
    if missing:
        print(f"FAIL: {len(missing)} acknowledged submissions are not in the database, e.g. {missing[:3]}")
    ok = not (missing or failures or timed_out or tally.crashed) and (not args.import_prompts or items == args.items + args.import_prompts)
    print("OK: every acknowledged submission is in the database and no annotator request failed" if ok else "FAIL")
    return ok


if __name__ == "__main__":
    main()
