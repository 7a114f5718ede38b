"""Storage: the tables (SQLAlchemy 2), the engine for SQLite or PostgreSQL, and Alembic migrations run in code."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON, DateTime, Engine, Float, ForeignKey, Index, String, Text, UniqueConstraint, create_engine, event, or_, select, text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

ROLES = ("admin", "annotator")
# The questions a project can ask. "pairwise" is ranking restricted to two completions (A, B or tie).
QUESTIONS = ("ranking", "pairwise", "ratings", "flags", "ideal")
RATING_ASPECTS = ("helpful", "honest", "harmless")
HARM_FLAGS = ("violence", "hate", "sexual", "self_harm", "illegal", "privacy", "misinformation")
ACTIVE_JOB = ("queued", "running")
MAX_ID = 2**31 - 1  # ids are 32-bit integers on PostgreSQL; a larger one names nothing
MIGRATIONS = Path(__file__).parent / "migrations"


def utcnow() -> dt.datetime:
    """Naive UTC: SQLite drops time zones, so every timestamp is stored the same way on both databases."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    # None is SQL NULL, not the JSON text 'null': `IS NULL` finds it (a cleared control item is a regular item).
    type_annotation_map = {dict[str, Any]: JSON(none_as_null=True), list[Any]: JSON(none_as_null=True)}


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    username_key: Mapped[str] = mapped_column(String(64), unique=True)  # lower case: one account per name, any case
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    active: Mapped[bool] = mapped_column(default=True)  # a deactivated user cannot log in; their tokens stop working
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class AuthSession(Base):
    """A browser login. The cookie holds a random token; only its SHA-256 is stored."""

    __tablename__ = "sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)
    user: Mapped[User] = relationship()


class ApiToken(Base):
    """A bearer token for scripts; shown once at creation, stored as SHA-256. It works until it expires (every
    token does) or is revoked (revoked tokens are kept, so the list shows what existed and when it was stopped)."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime)  # None: never (none since migration 0006)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    user: Mapped[User] = relationship()

    def usable(self, now: dt.datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


class LoginDevice(Base):
    """A browser that has logged in as this user before (its cookie holds a random token; the SHA-256 is here).
    Failed logins from elsewhere cannot lock such a browser out (OWASP's "device cookies")."""

    __tablename__ = "login_devices"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    guidelines: Mapped[str] = mapped_column(Text, default="")  # Markdown
    k: Mapped[int]  # completions per prompt
    annotators_per_item: Mapped[int]
    questions: Mapped[list[Any]]  # names from QUESTIONS
    control_share: Mapped[float] = mapped_column(Float, default=0.1)  # of the items handed out, the control items
    archived_at: Mapped[dt.datetime | None] = mapped_column(DateTime)  # archived: closed to annotators, kept for export
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class ProjectMember(Base):
    """An annotator added to a project: annotators see and annotate only their projects' items (admins see all)."""

    __tablename__ = "project_members"

    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True)


class Item(Base):
    """One prompt of a project and its completions.

    A control item has a known answer (`control_ranks`: 1 = best, equal = tie, per completion position); it is
    handed to every member, mixed in with the others, and measures each annotator's accuracy.
    """

    __tablename__ = "items"
    __table_args__ = (UniqueConstraint("project_id", "external_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    external_id: Mapped[str] = mapped_column(String(200))
    prompt: Mapped[str] = mapped_column(Text)
    position: Mapped[int]
    import_job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)  # the import that added it
    control_ranks: Mapped[list[Any] | None]
    # what the model was shown beside the prompt: a grounded sampling job's system message (the passages), shown
    # to annotators so that they can judge whether the answers keep to them
    context: Mapped[str | None] = mapped_column(Text)
    completions: Mapped[list[Completion]] = relationship(order_by="Completion.position", cascade="all, delete-orphan")


class Completion(Base):
    __tablename__ = "completions"
    __table_args__ = (UniqueConstraint("item_id", "position"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    position: Mapped[int]
    text: Mapped[str] = mapped_column(Text)
    source: Mapped[str | None] = mapped_column(String(300))  # the model that sampled it, or "import"
    import_job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)


class Annotation(Base):
    """One annotator's answer to one item (or their skip). Lists run over the item's completions in order."""

    __tablename__ = "annotations"
    __table_args__ = (UniqueConstraint("item_id", "user_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16))  # "submitted" or "skipped"
    ranks: Mapped[list[Any] | None]  # 1 = best, equal = tie
    ratings: Mapped[list[Any] | None]  # per completion {aspect: 1..5}
    flags: Mapped[list[Any] | None]  # per completion [flag, ...]
    ideal_response: Mapped[str | None] = mapped_column(Text)
    seconds_spent: Mapped[float] = mapped_column(Float)  # from handing out to the first answer, measured here
    order_changed: Mapped[bool | None]  # did the annotator's ranking differ from the order shown? (None: API)
    revisions: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime | None] = mapped_column(DateTime)  # the last revision
    item: Mapped[Item] = relationship()
    user: Mapped[User] = relationship()


class Assignment(Base):
    """An item handed to an annotator and not answered yet. It holds the item's place for a while, so that
    concurrent annotators are not all handed the same item, and it records when the item was shown."""

    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("item_id", "user_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    served_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)


class Job(Base):
    """A job that fills a project (sampling completions, or an import); its progress lives here so any page or
    process can show it. At most one job of each kind is active per project (a unique partial index)."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_one_active_per_kind", "project_id", "kind", unique=True,
              sqlite_where=text("status IN ('queued', 'running')"),
              postgresql_where=text("status IN ('queued', 'running')")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))  # queued, running, done, failed, interrupted
    done: Mapped[int] = mapped_column(default=0)
    total: Mapped[int] = mapped_column(default=0)
    message: Mapped[str] = mapped_column(Text, default="")
    params: Mapped[dict[str, Any]]
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


def pending_imports():
    """Imports not finished: the items and completions they wrote so far stay invisible (an import is all or nothing)."""
    return select(Job.id).where(Job.kind == "import", Job.status != "done")


def visible(import_job_id) -> Any:
    """The condition that a row (an item or a completion) is not part of an unfinished import."""
    return or_(import_job_id.is_(None), import_job_id.not_in(pending_imports()))


def normalize_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here (SQLAlchemy's default driver for it, psycopg2, is not installed)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str, lock_timeout: float = 15.0) -> Engine:
    """An engine for `url`. A request that waits longer than `lock_timeout` seconds for a lock gives up (the app
    answers 503 with Retry-After) rather than holding its client until the client's own timeout."""
    url = normalize_url(url)
    # uvicorn runs sync endpoints on up to 40 threads; a pool that size keeps them from queueing on connections
    # (SQLAlchemy's default of 15 for SQLite made requests wait 30 s for one under load, then answer 503).
    pool = {"pool_size": 10, "max_overflow": 30, "pool_timeout": lock_timeout}
    if url.startswith("sqlite"):
        # One file shared by the server's worker threads; WAL lets readers run beside the single writer,
        # and the busy timeout makes concurrent writers wait instead of failing.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": lock_timeout}, **pool)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, connect_args={"options": f"-c lock_timeout={int(lock_timeout * 1000)}"},
                         **pool)


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)


def migrate(engine: Engine) -> None:
    """Bring the database to the newest schema (Alembic), so nobody runs alembic by hand."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as connection:
        if sqlite:
            # Batch migrations rebuild SQLite tables (copy, drop, rename); with foreign keys on, dropping the old
            # table would cascade deletes into every table that references it. The pragma only works outside a
            # transaction.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        with connection.begin():
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
        if sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            connection.commit()
