"""Background jobs: sampling K completions per prompt from a model, with progress stored in the jobs table.

The job runs in a thread of the server process; the page polls /api/jobs/{id}. torch and transformers are
imported only here, inside the job, so the app starts fast and the server never needs them otherwise.
"""

from __future__ import annotations

import logging
import threading

from pydantic import BaseModel, Field
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from rlhfkit.feedback.db import Completion, Item, Job, Project, utcnow

logger = logging.getLogger(__name__)
RESAMPLE_ROUNDS = 3  # tries to get K distinct, non-empty completions for a prompt


class GenerationParams(BaseModel):
    model: str = Field(min_length=1, max_length=300)  # alias, local directory or hub id
    max_new_tokens: int = Field(128, ge=1, le=2048)
    temperature: float = Field(0.9, gt=0, le=5)
    top_p: float = Field(0.95, gt=0, le=1)
    batch_size: int = Field(8, ge=1, le=256)
    system_prompt: str | None = Field(None, max_length=5000)


def load_generator(model: str):
    """The one model-loading function of the app: a causal LM and its tokenizer, by name."""
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer

    return load_causal_lm(model), load_tokenizer(model)


def interrupt_unfinished_jobs(sessions: sessionmaker) -> None:
    """Jobs that were running when the server stopped will not resume; say so instead of showing them running."""
    with sessions() as db:
        db.execute(update(Job).where(Job.status.in_(("queued", "running")))
                   .values(status="interrupted", message="the server stopped while the job ran; start it again"))
        db.commit()


class JobRunning(Exception):
    """The project has a sampling job under way; two would fill the same items."""


def start_generation(sessions: sessionmaker, project: Project, params: GenerationParams) -> Job:
    with sessions() as db:
        if db.scalar(select(Job.id).where(Job.project_id == project.id, Job.status.in_(("queued", "running")))):
            raise JobRunning("a sampling job is still running for this project; wait for it to end")
        empty = db.scalars(select(Item.id).where(Item.project_id == project.id, ~Item.completions.any())).all()
        job = Job(project_id=project.id, kind="generate", status="queued", total=len(empty),
                  params=params.model_dump())
        db.add(job)
        db.commit()
    threading.Thread(target=run_generation, args=(sessions, job.id), name=f"feedback-job-{job.id}", daemon=True).start()
    return job


def _set(db: Session, job: Job, **values) -> None:
    for key, value in values.items():
        setattr(job, key, value)
    job.updated_at = utcnow()
    db.commit()


def run_generation(sessions: sessionmaker, job_id: int) -> None:
    """Fill every item without completions with K samples; commits after each batch so progress is visible."""
    with sessions() as db:
        job = db.get(Job, job_id)
        project = db.get(Project, job.project_id)
        params = GenerationParams.model_validate(job.params)
        try:
            _set(db, job, status="running", message=f"loading {params.model}")
            from rlhfkit.rollout import generate_responses

            model, tokenizer = load_generator(params.model)
            _set(db, job, message="sampling")
            items = db.scalars(select(Item).where(Item.project_id == project.id, ~Item.completions.any())
                               .order_by(Item.position)).all()
            per_batch = max(1, params.batch_size // project.k)
            for start in range(0, len(items), per_batch):
                batch = items[start:start + per_batch]
                samples: list[list[str]] = [[] for _ in batch]
                for _ in range(RESAMPLE_ROUNDS):
                    wanted = [(i, project.k - len(s)) for i, s in enumerate(samples) if len(s) < project.k]
                    if not wanted:
                        break
                    prompts = [batch[i].prompt for i, n in wanted for _ in range(n)]
                    answers = iter(generate_responses(
                        model, tokenizer, prompts, max_new_tokens=params.max_new_tokens, do_sample=True,
                        temperature=params.temperature, top_p=params.top_p, batch_size=params.batch_size,
                        system_prompt=params.system_prompt))
                    for i, n in wanted:
                        for text in (next(answers) for _ in range(n)):
                            if text.strip() and text not in samples[i] and len(samples[i]) < project.k:
                                samples[i].append(text)
                for item, texts in zip(batch, samples):
                    # An item that still has fewer than K distinct answers keeps what it has (at least 2 to be served).
                    item.completions = [Completion(position=p, text=t, source=params.model) for p, t in enumerate(texts)]
                _set(db, job, done=job.done + len(batch))
            _set(db, job, status="done", message=f"sampled {project.k} completions for {job.done} prompts")
        except Exception as e:  # a job must end in a visible state whatever went wrong
            logger.exception("generation job %s failed", job_id)
            db.rollback()
            _set(db, job, status="failed", message=f"{type(e).__name__}: {e}")
