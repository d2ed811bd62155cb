"""Each job keeps its time accounts (orchestrator/accounts.py): the controller's own marks (when each attempt was
scheduled, waited for hosts, was launched; operator pauses) and the split of its wall time they give, so the
postmortem reads the same buckets the controller showed and a restarted controller carries its marks on.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("accounts", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("accounts")
