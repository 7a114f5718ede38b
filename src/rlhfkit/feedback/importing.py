"""Importing prompts (JSONL or CSV) and completions (JSONL) into a project. One import is one transaction:
a bad line names the file and the line, and nothing of that file is stored."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from rlhfkit.data.jsonl import parse_jsonl
from rlhfkit.data.records import PromptRecord
from rlhfkit.errors import DataError
from rlhfkit.feedback.db import Completion, Item, Project


class CompletionsRecord(BaseModel):
    """`{"prompt", "completions": [K], "id"?, "model"?}`: K completions for a prompt (new or already imported)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    completions: list[str]
    id: str | None = None
    model: str | None = None

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


def _jsonl_rows(name: str, content: bytes) -> Iterator[tuple[int, dict[str, Any]]]:
    return parse_jsonl(name, _text(name, content).splitlines())


def _csv_rows(name: str, content: bytes) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(_text(name, content), newline=""))
    if reader.fieldnames is None or "prompt" not in reader.fieldnames:
        raise DataError(f"{name}:1: the header needs a 'prompt' column (and optionally 'id')")
    for row in reader:
        yield reader.line_num, {k: v for k, v in row.items() if k in ("prompt", "id") and v not in (None, "")}


def _text(name: str, content: bytes) -> str:
    try:
        return content.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text (byte {e.start})") from None


def _next_position(db: Session, project: Project) -> int:
    return (db.scalar(select(func.max(Item.position)).where(Item.project_id == project.id)) or 0) + 1


def _check_new_id(db: Session, project: Project, seen: set[str], external_id: str, where: str) -> None:
    if external_id in seen or db.scalar(select(Item.id).where(Item.project_id == project.id,
                                                               Item.external_id == external_id)):
        raise DataError(f"{where}: id {external_id!r} is already in the project")
    seen.add(external_id)


def import_prompts(db: Session, project: Project, name: str, content: bytes) -> int:
    """Prompts from JSONL (`{"prompt", "id"?}`) or CSV (columns prompt, id); returns how many were added."""
    rows = _csv_rows(name, content) if name.lower().endswith(".csv") else _jsonl_rows(name, content)
    position, seen, added = _next_position(db, project), set(), 0
    try:
        for lineno, row in rows:
            try:
                record = PromptRecord.model_validate(row)
            except ValidationError as e:
                raise DataError(f"{name}:{lineno}: {_problem(e)}") from None
            external_id = record.id or f"p{position}"
            _check_new_id(db, project, seen, external_id, f"{name}:{lineno}")
            db.add(Item(project_id=project.id, external_id=external_id, prompt=record.prompt, position=position))
            position, added = position + 1, added + 1
        if not added:
            raise DataError(f"{name}: the file holds no prompts")
        db.commit()
    except BaseException:
        db.rollback()
        raise
    return added


def import_completions(db: Session, project: Project, name: str, content: bytes) -> int:
    """K completions per line, matched to an item by id (else by prompt text), or a new item; returns the count."""
    position, seen, added = _next_position(db, project), set(), 0
    try:
        for lineno, row in _jsonl_rows(name, content):
            where = f"{name}:{lineno}"
            try:
                record = CompletionsRecord.model_validate(row)
            except ValidationError as e:
                raise DataError(f"{where}: {_problem(e)}") from None
            if len(record.completions) != project.k:
                raise DataError(f"{where}: completions: the project asks for {project.k} per prompt, got "
                                f"{len(record.completions)}")
            match = Item.external_id == record.id if record.id is not None else Item.prompt == record.prompt
            item = db.scalar(select(Item).where(Item.project_id == project.id, match).order_by(Item.position).limit(1))
            if item is None:
                external_id = record.id or f"p{position}"
                _check_new_id(db, project, seen, external_id, where)
                item = Item(project_id=project.id, external_id=external_id, prompt=record.prompt, position=position)
                db.add(item)
                position += 1
            elif item.completions:
                raise DataError(f"{where}: item {item.external_id!r} has completions already")
            item.completions = [Completion(position=i, text=text, source=record.model or "import")
                                for i, text in enumerate(record.completions)]
            db.flush()
            added += 1
        if not added:
            raise DataError(f"{name}: the file holds no records")
        db.commit()
    except BaseException:
        db.rollback()
        raise
    return added
