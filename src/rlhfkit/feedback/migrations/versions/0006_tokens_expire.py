"""Every API token expires, and a deactivated user has none that works: tokens made "until revoked" get 90 days
from the upgrade, and the usable tokens of deactivated users are revoked (before, reactivating a user brought
their old tokens back).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 15:40:00
"""

import datetime as dt

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    op.execute(sa.text("UPDATE api_tokens SET expires_at = :expires WHERE expires_at IS NULL")
               .bindparams(expires=now + dt.timedelta(days=90)))
    op.execute(sa.text("UPDATE api_tokens SET revoked_at = :now WHERE revoked_at IS NULL AND user_id IN "
                       "(SELECT id FROM users WHERE NOT active)").bindparams(now=now))


def downgrade() -> None:
    pass  # expiry dates and revocations stand
