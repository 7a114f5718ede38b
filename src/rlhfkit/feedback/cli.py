"""`rlhfkit feedback ...`: serve the app, create the first admin, import and export from the command line."""

from __future__ import annotations

import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from rlhfkit.errors import ConfigError, OutputExistsError

feedback_app = typer.Typer(no_args_is_help=True, help="The human-feedback web app: annotate, measure agreement, export.")
DEFAULT_DATABASE = "sqlite:///feedback.db"
DatabaseUrl = Annotated[str, typer.Option(help="sqlite:///path.db (default: ./feedback.db) or postgresql://user:pass@host/db",
                                          envvar="RLHFKIT_FEEDBACK_DATABASE_URL")]


class ExportKind(str, Enum):
    rankings = "rankings"
    pairs = "pairs"
    sft = "sft"


def _quiet_migrations() -> None:
    logging.getLogger("alembic").setLevel(logging.WARNING)  # one INFO line per plugin and step otherwise


def _sessions(database_url: str):
    from rlhfkit.feedback.db import make_engine, make_sessionmaker, migrate

    _quiet_migrations()
    engine = make_engine(database_url)
    migrate(engine)
    return make_sessionmaker(engine)


def _retrieval_settings(path: Path | None) -> dict | None:
    """The settings in `path`, checked (the documents are read once) before the server starts."""
    if path is None:
        return None
    from rlhfkit.config import RetrievalSettings, load_config
    from rlhfkit.retrieval import load_passages

    settings = load_config(RetrievalSettings, path)
    load_passages(settings.documents, settings.max_passage_words)
    return settings.model_dump(mode="json")


@feedback_app.command()
def serve(
    database_url: DatabaseUrl = DEFAULT_DATABASE,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_dir: Annotated[Path, typer.Option(help="sampling jobs load local models only from under this directory")] = Path("."),
    trusted_proxy: Annotated[list[str] | None, typer.Option(
        help="address of a reverse proxy whose X-Forwarded-For to believe (repeat for several); without it the "
             "header is ignored, so clients cannot choose the address the login limit counts")] = None,
    retrieval: Annotated[Path | None, typer.Option(
        help="a YAML file of retrieval settings (documents, top_k, ...; as a config's `retrieval:` block): sampling "
             "jobs ground the prompts in these documents and annotators see the passages")] = None,
    max_token_days: Annotated[int, typer.Option(min=1, help="the longest an API token may be valid, in days")] = 365,
) -> None:
    """Start the web app (the database schema is created or upgraded first)."""
    import uvicorn
    from sqlalchemy import make_url

    from rlhfkit.feedback.app import create_app

    _quiet_migrations()
    app = create_app(database_url, model_dir=model_dir, retrieval=_retrieval_settings(retrieval),
                     max_token_days=max_token_days)
    shown = make_url(database_url).render_as_string(hide_password=True)
    typer.echo(f"rlhfkit feedback on http://{host}:{port} (database {shown}); Ctrl-C stops it")
    uvicorn.run(app, host=host, port=port, log_level="warning", proxy_headers=bool(trusted_proxy),
                forwarded_allow_ips=",".join(trusted_proxy) if trusted_proxy else None)


@feedback_app.command("create-admin")
def create_admin(
    username: Annotated[str, typer.Option(help="the admin's login name")],
    database_url: DatabaseUrl = DEFAULT_DATABASE,
    password_stdin: Annotated[bool, typer.Option(help="read the password from standard input (for scripts)")] = False,
) -> None:
    """Create an admin account. There is no default password: this is how the first admin comes to be."""
    from rlhfkit.feedback.auth import create_user

    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    with _sessions(database_url)() as db:
        try:
            create_user(db, username, password, "admin")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        db.commit()
    typer.echo(f"admin {username!r} created")


@feedback_app.command()
def export(
    project: Annotated[str, typer.Option(help="the project's name")],
    kind: Annotated[ExportKind, typer.Option(help="rankings (per annotator), pairs (consensus), or sft (ideal responses)")],
    output: Annotated[Path, typer.Option(help="JSONL file to write")],
    database_url: DatabaseUrl = DEFAULT_DATABASE,
    min_accuracy: Annotated[float | None, typer.Option(
        min=0, max=1, help="leave out annotators whose accuracy on the control items is below this (and those who "
                           "answered none)")] = None,
) -> None:
    """Write a project's rankings, consensus pairs or SFT examples as JSONL (the same files as the admin page)."""
    from rlhfkit.data.jsonl import write_jsonl
    from rlhfkit.feedback.export import EXPORTS

    if output.exists():
        raise OutputExistsError(f"{output} exists; choose another --output or remove it first")
    with _sessions(database_url)() as db:
        records = EXPORTS[kind.value](db, _project(db, project), min_accuracy=min_accuracy)
    write_jsonl(output, records)
    typer.echo(f"{len(records)} {kind.value} records written to {output}")


def _project(db, name: str):
    """The project named `name`, or a ConfigError that lists the projects there are."""
    from sqlalchemy import select

    from rlhfkit.feedback.db import Project

    found = db.scalar(select(Project).where(Project.name == name))
    if found is None:
        names = ", ".join(db.scalars(select(Project.name))) or "none"
        raise ConfigError(f"no project named {name!r} (projects: {names})")
    return found


@feedback_app.command("import")
def import_file(
    project: Annotated[str, typer.Option(help="the project's name")],
    file: Annotated[Path, typer.Argument(help="JSONL: {prompt, completions: [K], id?, model?} per line (e.g. the "
                                              "items_file of `rlhfkit simulate`), or prompts with --prompts")],
    prompts: Annotated[bool, typer.Option(help="the file holds prompts ({prompt, id?} JSONL, or CSV)")] = False,
    database_url: DatabaseUrl = DEFAULT_DATABASE,
) -> None:
    """Import completions to rank (or prompts to sample for) into a project, as its admin page does: all or nothing."""
    from rlhfkit.errors import DataError, RlhfkitError
    from rlhfkit.feedback.importing import import_completions, import_prompts
    from rlhfkit.feedback.jobs import JobRunning

    if not file.is_file():
        raise DataError(f"{file} not found")
    with _sessions(database_url)() as db:
        try:
            count = (import_prompts if prompts else import_completions)(db, _project(db, project), file.name,
                                                                       file.read_bytes())
        except JobRunning as e:
            raise RlhfkitError(str(e)) from None
    typer.echo(f"imported {count} {'prompts' if prompts else 'completions'} records from {file} into {project!r}")
