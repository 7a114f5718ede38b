"""Jobs that fill a project: sampling K completions per prompt from a model (a background thread), and the
bookkeeping shared with imports (at most one active job of a kind per project; progress in the jobs table).

The sampling job runs in a thread of the server process; the page polls /api/jobs/{id}. torch and transformers
are imported only here, inside the job, so the app starts fast and the server never needs them otherwise.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from rlhfkit.feedback.db import ACTIVE_JOB, Completion, Item, Job, Project, utcnow, visible
from rlhfkit.feedback.schemas import Text

logger = logging.getLogger(__name__)
RESAMPLE_ROUNDS = 3  # tries to get K distinct, non-empty completions for a prompt
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
JOB_NAMES = {"generate": "sampling job", "import": "import"}


MAX_MODEL_NAME = 300  # the length of completions.source, where the name is recorded


class GenerationParams(BaseModel):
    model: Text = Field(min_length=1, max_length=MAX_MODEL_NAME)  # alias, directory under the model directory, or hub id
    max_new_tokens: int = Field(128, ge=1, le=2048)
    temperature: float = Field(0.9, gt=0, le=5)
    top_p: float = Field(0.95, gt=0, le=1)
    batch_size: int = Field(8, ge=1, le=256)
    system_prompt: Text | None = Field(None, max_length=5000)
    max_prompt_length: int = Field(1024, ge=16, le=32768)  # tokens of a grounded prompt: its passages are cut to fit


def check_model_name(name: str, model_dir: Path) -> str:
    """What to load for `name`: a bundled alias or a hub id as given, a directory under `model_dir` as its
    absolute path. Anything else is refused with one message, whether or not it exists, so that the field
    cannot be used to find out which paths exist on the server."""
    from rlhfkit.models.registry import BUNDLED_MODELS  # here: rlhfkit.models imports torch, which the app avoids

    root = model_dir.resolve()
    if name in BUNDLED_MODELS:
        return name
    if ".." not in Path(name).parts:
        local = (root / name).resolve()
        if local.is_relative_to(root) and local.is_dir() and len(str(local)) <= MAX_MODEL_NAME:
            return str(local)
        if HUB_ID.fullmatch(name) and not Path(name).exists():
            return name
    raise ValueError(f"give a bundled alias ({', '.join(BUNDLED_MODELS)}), a hub id (owner/name), or a model "
                     f"directory under {root} (its path at most {MAX_MODEL_NAME} characters)")


def load_generator(model: str):
    """The one model-loading function of the app: a causal LM and its tokenizer, by name."""
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer

    return load_causal_lm(model), load_tokenizer(model)


def interrupt_unfinished_jobs(db: Session) -> None:
    """Sampling jobs that were running when the server stopped will not resume; say so instead of showing them
    running (imports: importing.stop_unfinished_imports)."""
    db.execute(update(Job).where(Job.kind != "import", Job.status.in_(ACTIVE_JOB))
               .values(status="interrupted", message="the server stopped while the job ran; start it again"))
    db.commit()


class JobRunning(Exception):
    """The project has a job of that kind under way (two sampling jobs would fill the same items)."""


def claim_job(db: Session, project: Project, kind: str, total: int, params: dict[str, Any]) -> Job:
    """A new running job of `kind` for `project`. Raises JobRunning when one is active already; between two
    simultaneous requests, the unique index on active jobs lets exactly one in."""
    job = Job(project_id=project.id, kind=kind, status="running", total=total, params=params)
    db.add(job)
    try:
        db.commit()
    except IntegrityError:
        db.rollback()
        raise JobRunning(f"a {JOB_NAMES[kind]} is still running for this project; wait for it to end") from None
    return job


def _empty_items(project: Project):
    return select(Item).where(Item.project_id == project.id, visible(Item.import_job_id), ~Item.completions.any())


def start_generation(sessions: sessionmaker, project: Project, params: GenerationParams,
                     retrieval: dict | None = None) -> Job:
    """Start a sampling job; with `retrieval` (the server's RetrievalSettings as a dict) the prompts are grounded."""
    with sessions() as db:
        total = len(db.scalars(_empty_items(project).with_only_columns(Item.id)).all())
        job = claim_job(db, project, "generate", total=total, params={**params.model_dump(), "retrieval": retrieval})
    threading.Thread(target=run_generation, args=(sessions, job.id), name=f"feedback-job-{job.id}", daemon=True).start()
    return job


def _set(db: Session, job: Job, **values) -> None:
    for key, value in values.items():
        setattr(job, key, value)
    job.updated_at = utcnow()
    db.commit()


def load_grounding(retrieval: dict | None):
    """The grounding of a job's prompts (rlhfkit.retrieval), or None."""
    if retrieval is None:
        return None
    from rlhfkit.config import RetrievalSettings
    from rlhfkit.retrieval import Grounding

    return Grounding.from_settings(RetrievalSettings.model_validate(retrieval))


def shown_context(tokenizer, prompt: str, params: GenerationParams, grounding) -> str | None:
    """The system message a grounded prompt was sampled with (the instruction and the passages, as cut to fit)."""
    if grounding is None:
        return None
    from rlhfkit.data.chat import prompt_messages

    messages = prompt_messages(tokenizer, prompt, params.system_prompt, grounding, params.max_prompt_length)
    return messages[0]["content"] if messages[0]["role"] == "system" else None


def _store(db: Session, item: Item, texts: list[str], source: str, context: str | None = None) -> bool:
    """Give `item` the sampled `texts` (and the `context` the model saw), unless it got completions meanwhile (an
    import): then keep those. Returns whether the samples were stored. The unique (item, position) index settles a
    race with an import."""
    if db.scalar(select(exists().where(Completion.item_id == item.id))):
        return False
    item.context = context
    db.add_all(Completion(item_id=item.id, position=p, text=t, source=source) for p, t in enumerate(texts))
    try:
        db.commit()
    except IntegrityError:
        db.rollback()
        return False
    return True


def run_generation(sessions: sessionmaker, job_id: int) -> None:
    """Fill every item without completions with K samples; commits after each item so progress is visible."""
    with sessions() as db:
        job = db.get(Job, job_id)
        project = db.get(Project, job.project_id)
        params = GenerationParams.model_validate(job.params)
        skipped = 0
        try:
            _set(db, job, message=f"loading {params.model}")
            from rlhfkit.rollout import generate_responses

            model, tokenizer = load_generator(params.model)
            grounding = load_grounding(job.params.get("retrieval"))
            _set(db, job, message="sampling")
            items = db.scalars(_empty_items(project).order_by(Item.position)).all()
            per_batch = max(1, params.batch_size // project.k)
            for start in range(0, len(items), per_batch):
                batch = items[start:start + per_batch]
                samples: list[list[str]] = [[] for _ in batch]
                for _ in range(RESAMPLE_ROUNDS):  # K samples of each prompt still short of K distinct answers
                    wanted = [i for i, s in enumerate(samples) if len(s) < project.k]
                    if not wanted:
                        break
                    answers = generate_responses(
                        model, tokenizer, [batch[i].prompt for i in wanted], max_new_tokens=params.max_new_tokens,
                        do_sample=True, temperature=params.temperature, top_p=params.top_p, num_samples=project.k,
                        batch_size=params.batch_size, system_prompt=params.system_prompt, grounding=grounding,
                        max_prompt_length=params.max_prompt_length if grounding else None)
                    for j, i in enumerate(wanted):
                        for text in answers[j * project.k:(j + 1) * project.k]:
                            if text.strip() and text not in samples[i] and len(samples[i]) < project.k:
                                samples[i].append(text)
                # An item that still has fewer than K distinct answers keeps what it has (at least 2 to be served).
                contexts = [shown_context(tokenizer, item.prompt, params, grounding) for item in batch]
                skipped += sum(not _store(db, item, texts, params.model, context)
                               for item, texts, context in zip(batch, samples, contexts))
                _set(db, job, done=job.done + len(batch))
            kept = f"; {skipped} got completions from an import meanwhile and kept those" if skipped else ""
            _set(db, job, status="done", message=f"sampled {project.k} completions for {job.done - skipped} prompts{kept}")
        except Exception as e:  # a job must end in a visible state whatever went wrong
            logger.exception("generation job %s failed", job_id)
            db.rollback()
            _set(db, job, status="failed", message=f"{type(e).__name__}: {e}")
