"""Load test of the feedback app: N concurrent annotators (threads with httpx and API tokens) against a local
server (a `rlhfkit feedback serve` subprocess), which is killed (SIGKILL) and restarted halfway through.
At the end, every acknowledged submission (HTTP 201) must be in the database with its item and annotator.
Prints submissions/s and the submission latency percentiles.

    .venv/bin/python benchmarks/feedback_load.py                       # SQLite in a temporary directory
    .venv/bin/python benchmarks/feedback_load.py --database-url postgresql://user:password@host/db   # emptied first!
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
from pathlib import Path

import httpx
from sqlalchemy import select, text

from rlhfkit.feedback.auth import create_api_token, create_user
from rlhfkit.feedback.db import Annotation, Project, User, make_engine, make_sessionmaker, migrate
from rlhfkit.feedback.importing import import_completions


def setup(database_url: str, annotators: int, items: int, k: int, per_item: int) -> tuple[int, dict[str, str]]:
    engine = make_engine(database_url)
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            connection.execute(text("DROP SCHEMA public CASCADE"))
            connection.execute(text("CREATE SCHEMA public"))
    migrate(engine)
    with make_sessionmaker(engine)() as db:
        project = Project(name="load", k=k, annotators_per_item=per_item, questions=["ranking"])
        db.add(project)
        db.commit()
        lines = [json.dumps({"prompt": f"prompt {i}", "completions": [f"completion {i}.{j}" for j in range(k)]})
                 for i in range(items)]
        import_completions(db, project, "load.jsonl", "\n".join(lines).encode())
        tokens = {}
        for n in range(annotators):
            user = create_user(db, f"annotator{n:02d}", "load-test-password", "annotator")
            tokens[user.username] = create_api_token(db, user, "load")
        db.commit()
        return project.id, tokens


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", help="default: SQLite in a temporary directory")
    parser.add_argument("--annotators", type=int, default=50)
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--per-item", type=int, default=3, help="annotators per item")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="feedback-load-") as workdir:
        run(args, args.database_url or f"sqlite:///{Path(workdir) / 'load.db'}")


def run(args: argparse.Namespace, database_url: str) -> None:
    project_id, tokens = setup(database_url, args.annotators, args.items, args.k, args.per_item)
    expected = args.items * args.per_item
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"

    acknowledged: list[tuple[int, int, str]] = []  # (annotation id, item id, annotator)
    latencies: list[float] = []
    transport_errors = 0
    lock = threading.Lock()

    def annotator(username: str, token: str) -> None:
        nonlocal transport_errors
        rng = random.Random(username)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
            while True:
                try:
                    response = client.get(f"/api/projects/{project_id}/next")
                    if response.status_code == 204:
                        return  # nothing left for this annotator
                    response.raise_for_status()
                    item = response.json()
                    ranks = rng.sample(range(1, args.k + 1), args.k)
                    started = time.perf_counter()
                    response = client.post(f"/api/projects/{project_id}/items/{item['id']}/annotations",
                                           json={"ranks": ranks, "seconds_spent": 1.0})
                    elapsed = time.perf_counter() - started
                except httpx.TransportError:  # the server is down (being restarted): try again shortly
                    with lock:
                        transport_errors += 1
                    time.sleep(0.2)
                    continue
                if response.status_code == 201:
                    with lock:
                        acknowledged.append((response.json()["id"], item["id"], username))
                        latencies.append(elapsed)
                elif response.status_code != 409:  # 409: stored before the restart, its answer lost in transit
                    raise RuntimeError(f"{username}: HTTP {response.status_code} {response.text}")

    server = start_server(database_url, port)
    started = time.perf_counter()
    threads = [threading.Thread(target=annotator, args=item, daemon=True) for item in tokens.items()]
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
    missing = [a for a in acknowledged if stored.get(a[0]) != (a[1], a[2])]
    latencies.sort()

    def percentile(p: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))]

    print(f"database: {make_engine(database_url).dialect.name}; {args.annotators} annotators; "
          f"{args.items} items x {args.per_item} annotators, K = {args.k}")
    print(f"acknowledged submissions: {len(acknowledged)} ({acknowledged_before_restart} before the kill); "
          f"stored: {len(stored)}; expected about {expected}")
    print(f"server killed and restarted halfway: {downtime:.1f} s down, {transport_errors} failed connections retried")
    print(f"throughput: {len(acknowledged) / elapsed:.1f} submissions/s over {elapsed:.1f} s (restart included)")
    print(f"submission latency: p50 {percentile(50):.0f} ms, p90 {percentile(90):.0f} ms, p99 {percentile(99):.0f} ms")
    if missing:
        print(f"FAIL: {len(missing)} acknowledged submissions are not in the database, e.g. {missing[:3]}")
        sys.exit(1)
    print("OK: every acknowledged submission is in the database")


if __name__ == "__main__":
    main()
