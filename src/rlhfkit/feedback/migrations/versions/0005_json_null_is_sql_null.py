"""JSON columns hold SQL NULL for "none", never the JSON text 'null' (which `IS NULL` does not find: a control
item cleared before this fix stayed out of the queue and broke the project's page).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 15:20:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

NULLABLE_JSON = {'items': ('control_ranks',), 'annotations': ('ranks', 'ratings', 'flags')}


def upgrade() -> None:
    for table, columns in NULLABLE_JSON.items():
        for column in columns:
            op.execute(sa.text(f"UPDATE {table} SET {column} = NULL WHERE CAST({column} AS TEXT) = 'null'"))


def downgrade() -> None:
    pass  # SQL NULL reads as None either way
