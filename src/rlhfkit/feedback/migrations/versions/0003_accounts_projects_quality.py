"""Accounts and tokens (case-insensitive usernames, deactivation, token expiry and revocation, known browsers),
project members and archiving, control items, answer revisions, all-or-nothing imports, one active job per kind.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 06:56:04.878076
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

ACTIVE = sa.text("status IN ('queued', 'running')")


def upgrade() -> None:
    op.create_table('login_devices',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('expires_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token_hash')
    )
    with op.batch_alter_table('login_devices', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_login_devices_user_id'), ['user_id'], unique=False)

    op.create_table('project_members',
    sa.Column('project_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('project_id', 'user_id')
    )
    with op.batch_alter_table('project_members', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_project_members_user_id'), ['user_id'], unique=False)
    # Before members existed every annotator saw every project: keep it so for the projects already there.
    op.execute("INSERT INTO project_members (project_id, user_id) SELECT projects.id, users.id FROM projects, users "
               "WHERE users.role = 'annotator'")

    with op.batch_alter_table('annotations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('order_changed', sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column('revisions', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('updated_at', sa.DateTime(), nullable=True))

    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.add_column(sa.Column('expires_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('revoked_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('last_used_at', sa.DateTime(), nullable=True))

    with op.batch_alter_table('completions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('import_job_id', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_completions_import_job_id'), ['import_job_id'], unique=False)
        batch_op.create_foreign_key('fk_completions_import_job_id_jobs', 'jobs', ['import_job_id'], ['id'])

    with op.batch_alter_table('items', schema=None) as batch_op:
        batch_op.add_column(sa.Column('import_job_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('control_ranks', sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f('ix_items_import_job_id'), ['import_job_id'], unique=False)
        batch_op.create_foreign_key('fk_items_import_job_id_jobs', 'jobs', ['import_job_id'], ['id'])

    # Two active jobs of a kind could have been started at once before; the index needs at most one.
    op.execute("UPDATE jobs SET status = 'interrupted' WHERE status IN ('queued', 'running')")
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_one_active_per_kind', ['project_id', 'kind'], unique=True,
                              sqlite_where=ACTIVE, postgresql_where=ACTIVE)

    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.add_column(sa.Column('control_share', sa.Float(), nullable=False, server_default='0.1'))
        batch_op.add_column(sa.Column('archived_at', sa.DateTime(), nullable=True))

    _add_username_keys()


def _add_username_keys() -> None:
    """Usernames become unique whatever their case: fill the lower-case key, refusing to merge two accounts."""
    connection = op.get_bind()
    clashes = connection.execute(sa.text(
        "SELECT lower(username) FROM users GROUP BY lower(username) HAVING count(*) > 1")).scalars().all()
    if clashes:
        raise RuntimeError(f"usernames that differ only in case: {', '.join(clashes)}; give each of these accounts "
                           "a distinct name in the database (UPDATE users SET username = ...), then start again")
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('username_key', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('active', sa.Boolean(), nullable=False, server_default=sa.true()))
    op.execute("UPDATE users SET username_key = lower(username)")
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.alter_column('username_key', existing_type=sa.String(length=64), nullable=False)
        batch_op.create_unique_constraint('uq_users_username_key', ['username_key'])


def downgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_constraint('uq_users_username_key', type_='unique')
        batch_op.drop_column('active')
        batch_op.drop_column('username_key')

    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.drop_column('archived_at')
        batch_op.drop_column('control_share')

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_one_active_per_kind', sqlite_where=ACTIVE, postgresql_where=ACTIVE)

    with op.batch_alter_table('items', schema=None) as batch_op:
        batch_op.drop_constraint('fk_items_import_job_id_jobs', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_items_import_job_id'))
        batch_op.drop_column('control_ranks')
        batch_op.drop_column('import_job_id')

    with op.batch_alter_table('completions', schema=None) as batch_op:
        batch_op.drop_constraint('fk_completions_import_job_id_jobs', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_completions_import_job_id'))
        batch_op.drop_column('import_job_id')

    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.drop_column('last_used_at')
        batch_op.drop_column('revoked_at')
        batch_op.drop_column('expires_at')

    with op.batch_alter_table('annotations', schema=None) as batch_op:
        batch_op.drop_column('updated_at')
        batch_op.drop_column('revisions')
        batch_op.drop_column('order_changed')

    with op.batch_alter_table('project_members', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_project_members_user_id'))

    op.drop_table('project_members')
    with op.batch_alter_table('login_devices', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_login_devices_user_id'))

    op.drop_table('login_devices')
