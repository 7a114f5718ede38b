"""The human loop without the browser: a prompt file into the app, the sampling job fills completions from the
tiny model, two annotators rank (API calls), the consensus export is read by train_reward_model as is, and PPO
runs against that reward model."""

from __future__ import annotations

import json
import time
from pathlib import Path

from feedback_helpers import Client, annotate_page, create_project, jsonl, make_app
from sqlalchemy import select
from typer.testing import CliRunner

from rlhfkit.cli import app as cli_app
from rlhfkit.config import PPOConfig, RewardConfig, load_config
from rlhfkit.data.jsonl import write_jsonl
from rlhfkit.feedback.db import Item, Job
from rlhfkit.online import train_ppo
from rlhfkit.reward.train import train_reward_model


def wait_for_job(client: Client, job_id: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still running after {timeout} s")


def latest_job(app) -> int:
    with app.state.sessions() as db:
        return db.scalar(select(Job.id).order_by(Job.id.desc()).limit(1))


def test_prompt_file_to_reward_model_to_ppo(tmp_path, tiny_model):
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    app = make_app(url, model_dir=Path(tiny_model))
    admin, alice, bob = (Client(app).login(n) for n in ("admin", "alice", "bob"))
    pid = create_project(admin, name="rm", k=3, annotators=2, questions=("ranking",))
    prompts = [{"prompt": f"Where is office number {i}?", "id": f"o{i}"} for i in range(4)]
    write_jsonl(tmp_path / "prompts.jsonl", prompts)
    assert admin.form(f"/admin/projects/{pid}/import/prompts", files={"file": ("prompts.jsonl", jsonl(prompts))}).status_code == 200

    r = admin.form(f"/admin/projects/{pid}/generate", {"model": tiny_model, "max_new_tokens": 8, "temperature": 1.0},
                   follow_redirects=False)
    assert r.status_code == 303
    job = wait_for_job(admin, latest_job(app))
    assert job["status"] == "done" and job["done"] == job["total"] == 4, job
    assert 'data-job-running' not in admin.get(f"/admin/projects/{pid}").text
    with app.state.sessions() as db:
        items = db.scalars(select(Item).where(Item.project_id == pid)).all()
        assert all(len(item.completions) == 3 and item.completions[0].source == tiny_model for item in items)

    # Both annotators prefer the shortest completion, ties broken by text: a consistent, learnable preference.
    for client in (alice, bob):
        while (response := client.get(f"/api/projects/{pid}/next")).status_code == 200:
            item = response.json()
            order = sorted(range(3), key=lambda i: (len(item["completions"][i]["text"]), item["completions"][i]["text"]))
            ranks = [order.index(i) + 1 for i in range(3)]
            r = client.post(f"/api/projects/{pid}/items/{item['id']}/annotations", json={"ranks": ranks},
                            headers={"X-CSRF-Token": client.csrf})
            assert r.status_code == 201, r.text
    assert "8 answers submitted" in admin.get(f"/admin/projects/{pid}").text

    pairs = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(cli_app, ["feedback", "export", "--project", "rm", "--kind", "pairs",
                                          "--output", str(pairs), "--database-url", url])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert len(records) == 12 and set(records[0]) == {"prompt", "chosen", "rejected"}
    cfg = load_config(RewardConfig, None, [f"model={tiny_model}", f"train_file={pairs}", f"output_dir={tmp_path / 'rm'}",
                                           "max_steps=2", "batch_size=2"])
    train_reward_model(cfg)
    assert (tmp_path / "rm" / "config.json").is_file()

    ppo = train_ppo(PPOConfig(model=tiny_model, prompts_file=tmp_path / "prompts.jsonl", output_dir=tmp_path / "ppo",
                              rewards=[{"scorer": str(tmp_path / "rm")}], steps=2, batch_size=4, mini_batch_size=2,
                              ppo_epochs=1, sampling={"max_new_tokens": 6}, preview={"num_prompts": 0}))
    assert ppo.steps == 2 and "reward/reward" in ppo.history[-1]
    assert (tmp_path / "ppo" / "adapter_config.json").is_file()


def test_generation_job_failure_is_visible(tmp_path):
    (tmp_path / "models" / "not-a-model").mkdir(parents=True)
    app = make_app(f"sqlite:///{tmp_path / 'feedback.db'}", model_dir=tmp_path / "models")
    admin = Client(app).login("admin")
    pid = create_project(admin, k=2)
    admin.form(f"/admin/projects/{pid}/import/prompts", files={"file": ("p.jsonl", jsonl([{"prompt": "hi"}]))})
    admin.form(f"/admin/projects/{pid}/generate", {"model": "not-a-model"})
    job = wait_for_job(admin, latest_job(app))
    assert job["status"] == "failed" and "not a model directory" in job["message"]
    assert "failed" in admin.get(f"/admin/projects/{pid}").text

    with app.state.sessions() as db:  # one job at a time per project: two would fill the same items
        db.add(Job(project_id=pid, kind="generate", status="running", params={"model": "m"}))
        db.commit()
    r = admin.form(f"/admin/projects/{pid}/generate", {"model": "smollm2-135m-instruct"})
    assert r.status_code == 409 and "still running" in r.text


def test_a_grounded_job_shows_annotators_the_passages_the_model_saw_escaped(tmp_path, tiny_model):
    from rlhfkit.config import RetrievalSettings

    doc = tmp_path / "handbook.md"
    doc.write_text("# Handbook\n\n## Boston office\nThe HR desk is on floor 3. <script>alert('x')</script> & <b>b</b>\n\n"
                   "## Lisbon office\nReception opens at 08:30.\n", encoding="utf-8")
    retrieval = RetrievalSettings(documents=[doc], top_k=1).model_dump(mode="json")
    app = make_app(f"sqlite:///{tmp_path / 'feedback.db'}", model_dir=Path(tiny_model), retrieval=retrieval)
    admin, alice = Client(app).login("admin"), Client(app).login("alice")
    pid = create_project(admin, k=2, annotators=1, questions=("ranking",))
    prompts = [{"prompt": "Where is the HR desk in Boston?"}]
    admin.form(f"/admin/projects/{pid}/import/prompts", files={"file": ("p.jsonl", jsonl(prompts))})
    admin.form(f"/admin/projects/{pid}/generate", {"model": tiny_model, "max_new_tokens": 4})
    job = wait_for_job(admin, latest_job(app))
    assert job["status"] == "done", job
    with app.state.sessions() as db:
        context = db.scalars(select(Item).where(Item.project_id == pid)).one().context
    # the system message the model was sampled with: the instruction, then the best passage
    assert context == (f"{RetrievalSettings.model_fields['instruction'].default}\n\n[1] Boston office\n"
                       "The HR desk is on floor 3. <script>alert('x')</script> & <b>b</b>")
    page, _ = annotate_page(alice, pid)
    assert "[1] Boston office" in page.text and "Lisbon" not in page.text
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &lt;b&gt;b&lt;/b&gt;" in page.text
    assert "<script>alert" not in page.text and "<b>b</b>" not in page.text
    assert alice.get(f"/api/projects/{pid}/next").json()["context"] == context
