"""The schema as it was before migrations: jobs, interruptions, hosts and their history.

A database created by an earlier Herdsman has these tables and no version; the store stamps it with this
revision and upgrades from here.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("state", sa.String(40), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float, nullable=True),
        sa.Column("target_step", sa.Integer, nullable=False),
        sa.Column("last_step", sa.Integer, nullable=False),
        sa.Column("productive_s", sa.Float, nullable=False),
        sa.Column("checkpoint_s", sa.Float, nullable=False),
        sa.Column("message", sa.String(2000), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
    )
    op.create_table(
        "interruptions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job", sa.String(200), nullable=False, index=True),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("cause", sa.String(64), nullable=False, index=True),
        sa.Column("verdict", sa.JSON, nullable=False),
        sa.Column("planned", sa.Integer, nullable=False),
        sa.Column("failed_at", sa.Float, nullable=False),
        sa.Column("detected_at", sa.Float, nullable=False),
        sa.Column("restarted_at", sa.Float, nullable=True),
        sa.Column("resumed_at", sa.Float, nullable=True),
        sa.Column("last_step", sa.Integer, nullable=False),
        sa.Column("resumed_step", sa.Integer, nullable=True),
        sa.Column("lost_work_s", sa.Float, nullable=False),
        sa.UniqueConstraint("job", "attempt", name="uq_interruption_job_attempt"),
    )
    op.create_table(
        "hosts",
        sa.Column("host", sa.String(200), primary_key=True),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("since", sa.Float, nullable=False),
        sa.Column("reason", sa.String(2000), nullable=False),
    )
    op.create_table(
        "host_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("host", sa.String(200), nullable=False, index=True),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("reason", sa.String(2000), nullable=False),
    )


def downgrade() -> None:
    for table in ("host_events", "hosts", "interruptions", "jobs"):
        op.drop_table(table)
