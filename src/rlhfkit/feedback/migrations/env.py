"""Alembic environment: the connection comes from rlhfkit.feedback.db.migrate (or from sqlalchemy.url for
`alembic revision --autogenerate` during development)."""

from alembic import context
from sqlalchemy import create_engine

from rlhfkit.feedback.db import Base

config = context.config


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        with create_engine(config.get_main_option("sqlalchemy.url")).connect() as connection:
            _migrate(connection)
            connection.commit()
    else:
        _migrate(connection)


def _migrate(connection) -> None:
    # Batch mode lets later migrations alter SQLite tables (SQLite has almost no ALTER TABLE).
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run()
