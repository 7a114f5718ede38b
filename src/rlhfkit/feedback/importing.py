"""Importing prompts (JSONL or CSV) and completions (JSONL) into a project.

An import is all or nothing, and it never holds the database for long: the whole file is read and checked first
(a bad line names the file and the line, and nothing is written); then the rows are written in chunks, each its
own short transaction, so annotators' requests go on in between. The rows carry the import's job id and stay
invisible (to the queue, the pages and the exports) until the job is marked done, in one small final
transaction. The rows of an import that failed, or was cut short by a server stop, stay invisible and are
deleted (in chunks) by the next import into the project, and in the background when the server starts.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field, ValidationError, field_validator
from sqlalchemy import delete, exists, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from rlhfkit.data.jsonl import parse_jsonl
from rlhfkit.data.records import PromptRecord
from rlhfkit.errors import DataError
from rlhfkit.feedback.db import ACTIVE_JOB, Completion, Item, Job, Project, utcnow, visible
from rlhfkit.feedback.jobs import claim_job
from rlhfkit.feedback.schemas import Text

logger = logging.getLogger(__name__)
CHUNK_ROWS = 1000  # rows per write transaction: short enough that annotators wait milliseconds, not seconds


class PromptIn(PromptRecord):
    """A prompts record as the database can store it (text without NUL or lone surrogates, ids that fit)."""

    prompt: Text
    id: Text | None = Field(None, max_length=200)


class CompletionsIn(PromptIn):
    """`{"prompt", "completions": [K], "id"?, "model"?}`: K completions for a prompt (new or already imported)."""

    completions: list[Text]
    model: Text | None = Field(None, max_length=300)

    @field_validator("completions")
    @classmethod
    def _distinct(cls, completions: list[str]) -> list[str]:
        if any(not c.strip() for c in completions):
            raise ValueError("a completion is empty")
        if len(set(completions)) != len(completions):
            raise ValueError("the same completion appears twice")
        return completions


def _problem(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg'].removeprefix('Value error, ')}"
                     for e in error.errors())


def _text(name: str, content: bytes) -> str:
    try:
        return content.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text (byte {e.start})") from None


def _jsonl_rows(name: str, content: bytes) -> Iterator[tuple[int, dict[str, Any]]]:
    # Lines end at "\n" only: str.splitlines() would also split at U+2028, U+0085 or 0x1E inside a JSON string.
    return parse_jsonl(name, _text(name, content).split("\n"))


def _csv_rows(name: str, content: bytes) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(_text(name, content), newline=""))
    try:
        if reader.fieldnames is None or "prompt" not in reader.fieldnames:
            raise DataError(f"{name}:1: the header needs a 'prompt' column (and optionally 'id')")
        for row in reader:
            yield reader.line_num, {k: v for k, v in row.items() if k in ("prompt", "id") and v not in (None, "")}
    except csv.Error as e:  # e.g. a field over csv.field_size_limit() (131,072 characters)
        raise DataError(f"{name}:{reader.line_num + 1}: {e} (JSONL has no such limit)") from None


def _records(name: str, rows: Iterator[tuple[int, dict[str, Any]]], model: type[PromptIn]) -> Iterator[tuple[str, PromptIn]]:
    for lineno, row in rows:
        try:
            yield f"{name}:{lineno}", model.model_validate(row)
        except ValidationError as e:
            raise DataError(f"{name}:{lineno}: {_problem(e)}") from None


@dataclass
class Plan:
    """What an import writes, checked in full before anything is."""

    items: list[dict[str, Any]] = field(default_factory=list)  # new items: external_id, prompt, position
    completions: list[tuple[str, list[str], str]] = field(default_factory=list)  # external_id, texts, source

    @property
    def records(self) -> int:
        """The file's records: one per prompt, or one per prompt given completions."""
        return len(self.completions) or len(self.items)

    @property
    def rows(self) -> int:
        """The rows written: new items, and the sets of completions."""
        return len(self.items) + len(self.completions)


class _Ids:
    """The project's item ids (external), and the positions new items take."""

    def __init__(self, db: Session, project: Project):
        self.taken = set(db.scalars(select(Item.external_id).where(Item.project_id == project.id,
                                                                   visible(Item.import_job_id))))
        self.position = (db.scalar(select(func.max(Item.position)).where(Item.project_id == project.id)) or 0) + 1

    def new(self, where: str, external_id: str | None) -> tuple[str, int]:
        external_id = external_id or f"p{self.position}"
        if external_id in self.taken:
            raise DataError(f"{where}: id {external_id!r} is already in the project")
        self.taken.add(external_id)
        self.position += 1
        return external_id, self.position - 1


def plan_prompts(db: Session, project: Project, name: str, content: bytes) -> Plan:
    rows = _csv_rows(name, content) if name.lower().endswith(".csv") else _jsonl_rows(name, content)
    ids, plan = _Ids(db, project), Plan()
    for where, record in _records(name, rows, PromptIn):
        external_id, position = ids.new(where, record.id)
        plan.items.append({"external_id": external_id, "prompt": record.prompt, "position": position})
    return plan


def plan_completions(db: Session, project: Project, name: str, content: bytes) -> Plan:
    """K completions per line, matched to an item by id (else by prompt text; the first such item), or a new item."""
    existing = db.execute(select(Item.external_id, Item.prompt, exists().where(Completion.item_id == Item.id))
                          .where(Item.project_id == project.id, visible(Item.import_job_id))
                          .order_by(Item.position.desc())).all()
    by_id = {external_id: filled for external_id, _, filled in existing}
    by_prompt = {prompt: external_id for external_id, prompt, _ in existing}  # position descending: the first wins
    ids, plan, filled_here = _Ids(db, project), Plan(), set()
    for where, record in _records(name, _jsonl_rows(name, content), CompletionsIn):
        if len(record.completions) != project.k:
            raise DataError(f"{where}: completions: the project asks for {project.k} per prompt, got "
                            f"{len(record.completions)}")
        external_id = record.id if record.id is not None else by_prompt.get(record.prompt)
        if external_id is None or external_id not in by_id:
            external_id, position = ids.new(where, external_id)
            plan.items.append({"external_id": external_id, "prompt": record.prompt, "position": position})
            by_id[external_id] = False
            by_prompt.setdefault(record.prompt, external_id)
        elif by_id[external_id] or external_id in filled_here:
            raise DataError(f"{where}: item {external_id!r} has completions already")
        filled_here.add(external_id)
        plan.completions.append((external_id, record.completions, record.model or "import"))
    return plan


def run_import(db: Session, project: Project, name: str, plan: Plan, what: str) -> int:
    """Write `plan` in chunks under an import job; returns how many records it held. Raises DataError when the
    plan is empty or the project changed under it (nothing is kept), JobRunning when an import is under way."""
    if not plan.records:
        raise DataError(f"{name}: the file holds no {what}")
    job = claim_job(db, project, "import", total=plan.rows, params={"file": name, "what": what})
    try:
        remove_leftovers(db, project.id)  # an earlier import's rows may hold ids this one brings again
        _write(db, project, job, plan)
        job.status, job.message, job.updated_at = "done", f"imported {plan.records} {what} from {name}", utcnow()
        db.commit()
        _refresh_statistics(db)
    except IntegrityError:  # a sampling job (or another change) gave one of the file's items completions first
        _fail(db, project, job, "an item got completions from elsewhere during the import")
        raise DataError(f"{name}: an item got completions from elsewhere (a sampling job?) while the file was "
                        "imported; nothing was imported: import the file again") from None
    except BaseException:
        _fail(db, project, job, "the import failed")
        raise
    return plan.records


def _write(db: Session, project: Project, job: Job, plan: Plan) -> None:
    for start in range(0, len(plan.items), CHUNK_ROWS):
        rows = plan.items[start:start + CHUNK_ROWS]
        db.execute(insert(Item), [{**row, "project_id": project.id, "import_job_id": job.id} for row in rows])
        _progress(db, job, len(rows))
    for start in range(0, len(plan.completions), CHUNK_ROWS):
        chunk = plan.completions[start:start + CHUNK_ROWS]
        item_ids = dict(db.execute(select(Item.external_id, Item.id).where(
            Item.project_id == project.id, Item.external_id.in_([external_id for external_id, _, _ in chunk]))).all())
        db.execute(insert(Completion), [
            {"item_id": item_ids[external_id], "position": i, "text": text, "source": source, "import_job_id": job.id}
            for external_id, texts, source in chunk for i, text in enumerate(texts)])
        _progress(db, job, len(chunk))


def _refresh_statistics(db: Session) -> None:
    """PostgreSQL plans queries from table statistics, which autovacuum refreshes only a minute or so after a bulk
    load; planned from the old ones (a table of 300 rows that now has 100,000), the queue query took seconds while
    holding the project's lock. Its documentation's advice: ANALYZE after a bulk load (a sample; well under a
    second). SQLite's plans do not depend on statistics it has not been asked to gather."""
    if db.get_bind().dialect.name == "postgresql":
        db.execute(text("ANALYZE items"))
        db.execute(text("ANALYZE completions"))
        db.commit()


def _progress(db: Session, job: Job, rows: int) -> None:
    job.done, job.updated_at = job.done + rows, utcnow()
    db.commit()


def _fail(db: Session, project: Project, job: Job, reason: str) -> None:
    db.rollback()
    job.status, job.message, job.updated_at = "failed", f"{reason}; nothing of the file was kept", utcnow()
    db.commit()
    remove_leftovers(db, project.id)


def stop_unfinished_imports(db: Session) -> None:
    """At start: imports that were running when the server stopped will not finish. Marked so, their rows stay
    invisible until remove_leftovers deletes them."""
    db.execute(update(Job).where(Job.kind == "import", Job.status.in_(ACTIVE_JOB))
               .values(status="interrupted", message="the server stopped during the import; nothing of the file was kept"))
    db.commit()


def remove_leftovers(db: Session, project_id: int | None = None) -> None:
    """Delete the rows of imports that did not finish (of one project, or all), in chunks so that no transaction
    is long."""
    unfinished = select(Job.id).where(Job.kind == "import", Job.status.not_in(("done", *ACTIVE_JOB)))
    if project_id is not None:
        unfinished = unfinished.where(Job.project_id == project_id)
    for model in (Completion, Item):
        while ids := db.scalars(select(model.id).where(model.import_job_id.in_(unfinished)).limit(CHUNK_ROWS)).all():
            db.execute(delete(model).where(model.id.in_(ids)))
            db.commit()


def remove_all_leftovers(sessions: sessionmaker) -> None:
    """remove_leftovers for every project, in its own session (the server runs it in a thread as it starts)."""
    try:
        with sessions() as db:
            remove_leftovers(db)
    except Exception:  # the next import into the project removes them anyway
        logger.exception("removing the rows of unfinished imports failed")


def import_prompts(db: Session, project: Project, name: str, content: bytes) -> int:
    """Prompts from JSONL (`{"prompt", "id"?}`) or CSV (columns prompt, id); returns how many were added."""
    return run_import(db, project, name, plan_prompts(db, project, name, content), "prompts")


def import_completions(db: Session, project: Project, name: str, content: bytes) -> int:
    """Completions from JSONL; returns how many prompts got theirs."""
    return run_import(db, project, name, plan_completions(db, project, name, content), "completions")

