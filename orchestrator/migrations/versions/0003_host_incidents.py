"""Each host's failures and precursors, kept across jobs: what the lemon detector knows when a controller starts.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "host_incidents",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("host", sa.String(200), nullable=False, index=True),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),  # failure | precursor
        sa.Column("cause", sa.String(64), nullable=False),
        sa.Column("job", sa.String(200), nullable=False),
        sa.UniqueConstraint("host", "kind", "time", name="uq_host_incident"),
    )


def downgrade() -> None:
    op.drop_table("host_incidents")
