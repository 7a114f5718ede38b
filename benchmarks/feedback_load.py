"""Load test of the feedback app: N concurrent annotators (threads with httpx and API tokens) against a local
server (a `rlhfkit feedback serve` subprocess), while an admin imports a large prompts file into the same project
(uploaded once a quarter of the submissions are in, so that it is usually still running at the kill); the server
is killed (SIGKILL) and restarted when half the submissions are in.

At the end, every acknowledged submission (HTTP 201) must be in the database with its item and annotator, and
no annotator request may have failed: any answer but 200, 201 and 204 counts as a failure. Connections refused
while the server is down are retried (the next item is asked for again) and counted apart. An import cut short by the kill is
started again after the restart, as an admin would. Prints submissions/s, submission latency percentiles, the
import's duration, and the failures.

    .venv/bin/python benchmarks/feedback_load.py                       # SQLite in a temporary directory
    .venv/bin/python benchmarks/feedback_load.py --database-url postgresql://user:password@host/db   # emptied first!
    .venv/bin/python benchmarks/feedback_load.py --import-prompts 0    # no concurrent import
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from sqlalchemy import func, select, text

from rlhfkit.feedback.auth import create_api_token, create_user
from rlhfkit.feedback.db import Annotation, Item, Project, ProjectMember, User, make_engine, make_sessionmaker, migrate
from rlhfkit.feedback.importing import import_completions


def setup(database_url: str, annotators: int, items: int, k: int, per_item: int) -> tuple[int, dict[str, str], str]:
    """A project with `items` prompts of K completions, `annotators` members with API tokens, an admin token."""
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
        tokens = {}
        for n in range(annotators):
            user = create_user(db, f"annotator{n:02d}", "load-test-password", "annotator")
            db.add(ProjectMember(project_id=project.id, user_id=user.id))
            tokens[user.username] = create_api_token(db, user, "load")
        admin_token = create_api_token(db, create_user(db, "admin", "load-test-password", "admin"), "import")
        db.commit()
        return project.id, tokens, admin_token


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
    parser.add_argument("--annotators", type=int, default=50)
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--per-item", type=int, default=3, help="annotators per item")
    parser.add_argument("--import-prompts", type=int, default=100_000,
                        help="prompts the admin imports meanwhile (0: none)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="feedback-load-") as workdir:
        ok = run(args, args.database_url or f"sqlite:///{Path(workdir) / 'load.db'}")
    sys.exit(0 if ok else 1)


def run(args: argparse.Namespace, database_url: str) -> bool:
    project_id, tokens, admin_token = setup(database_url, args.annotators, args.items, args.k, args.per_item)
    expected = args.items * args.per_item
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"

    acknowledged: list[tuple[int, int, str]] = []  # (annotation id, item id, annotator)
    latencies: list[float] = []
    failures: Counter = Counter()  # (method, status) of annotator requests that failed
    failure_examples: list[str] = []
    retried = Counter()
    lock = threading.Lock()

    def failed(what: str, response: httpx.Response) -> None:
        with lock:
            failures[what, response.status_code] += 1
            if len(failure_examples) < 5:
                failure_examples.append(f"{what} {response.status_code} {response.text[:200]}")

    def annotator(username: str, token: str) -> None:
        rng = random.Random(username)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=120) as client:
            while True:
                try:
                    response = client.get(f"/api/projects/{project_id}/next")
                    if response.status_code == 204:
                        return  # nothing left for this annotator
                    if response.status_code != 200:
                        failed("GET next", response)
                        time.sleep(0.2)
                        continue
                    item = response.json()
                    ranks = rng.sample(range(1, args.k + 1), args.k)
                    started = time.perf_counter()
                    response = client.post(f"/api/projects/{project_id}/items/{item['id']}/annotations",
                                           json={"ranks": ranks})
                    elapsed = time.perf_counter() - started
                except httpx.TransportError:  # the server is down (being restarted): try again shortly
                    with lock:
                        retried["annotator"] += 1
                    time.sleep(0.2)
                    continue
                if response.status_code == 201:
                    with lock:
                        acknowledged.append((response.json()["id"], item["id"], username))
                        latencies.append(elapsed)
                else:
                    failed("POST annotation", response)

    import_log: list[str] = []

    def importer() -> None:
        """Upload the prompts file; after a kill cut it short (the server removes such an import), upload again."""
        content = prompts_file(args.import_prompts)
        while len(acknowledged) < expected // 4:
            time.sleep(0.05)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin_token}"}, timeout=600) as client:
            while True:
                started = time.perf_counter()
                try:
                    response = client.post(f"/admin/projects/{project_id}/import/prompts",
                                           files={"file": ("big.jsonl", content)})
                except httpx.TransportError:
                    import_log.append(f"cut short by the kill after {time.perf_counter() - started:.1f} s")
                    retried["import"] += 1
                    while True:  # wait for the restarted server
                        try:
                            client.get("/api/me")
                            break
                        except httpx.TransportError:
                            time.sleep(0.2)
                    continue
                import_log.append(f"HTTP {response.status_code} after {time.perf_counter() - started:.1f} s")
                return

    server = start_server(database_url, port)
    started = time.perf_counter()
    threads = [threading.Thread(target=annotator, args=item, daemon=True) for item in tokens.items()]
    if args.import_prompts:
        threads.append(threading.Thread(target=importer, daemon=True))
    for t in threads:
        t.start()
    while len(acknowledged) < expected // 2 and any(t.is_alive() for t in threads):
        time.sleep(0.01)
    acknowledged_before_restart = len(acknowledged)
    server.send_signal(signal.SIGKILL)  # no graceful shutdown: acknowledged means committed, or the test fails
    server.wait()
    restart_began = time.perf_counter()
    server = start_server(database_url, port)
    downtime = time.perf_counter() - restart_began
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    server.send_signal(signal.SIGTERM)
    server.wait()

    with make_sessionmaker(make_engine(database_url))() as db:
        stored = {a.id: (a.item_id, a.user.username) for a in db.scalars(select(Annotation).join(User))}
        items = db.scalar(select(func.count()).select_from(Item))
    missing = [a for a in acknowledged if stored.get(a[0]) != (a[1], a[2])]
    latencies.sort()

    def percentile(p: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))]

    print(f"database: {make_engine(database_url).dialect.name}; {args.annotators} annotators; "
          f"{args.items} items x {args.per_item} annotators, K = {args.k}")
    print(f"acknowledged submissions: {len(acknowledged)} ({acknowledged_before_restart} before the kill); "
          f"stored: {len(stored)}; expected about {expected}")
    print(f"server killed and restarted halfway: {downtime:.1f} s down, {retried['annotator']} annotator "
          f"connections refused meanwhile and retried")
    print(f"throughput: {len(acknowledged) / elapsed:.1f} submissions/s over {elapsed:.1f} s (restart included)")
    print(f"submission latency: p50 {percentile(50):.0f} ms, p90 {percentile(90):.0f} ms, p99 {percentile(99):.0f} ms")
    if args.import_prompts:
        print(f"import of {args.import_prompts} prompts ({len(prompts_file(args.import_prompts)) / 1e6:.1f} MB) "
              f"meanwhile: {'; '.join(import_log)}; items in the database at the end: {items} "
              f"(expected {args.items + args.import_prompts})")
    print(f"failed annotator requests: {sum(failures.values())}"
          + (f" {dict(failures)}, e.g. {failure_examples}" if failures else ""))
    ok = not missing and not failures and (not args.import_prompts or items == args.items + args.import_prompts)
    if missing:
        print(f"FAIL: {len(missing)} acknowledged submissions are not in the database, e.g. {missing[:3]}")
    print("OK: every acknowledged submission is in the database and no annotator request failed" if ok else "FAIL")
    return ok


if __name__ == "__main__":
    main()
