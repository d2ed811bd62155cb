"""Host events are keyed by (host, state, time): a write retried after a lost commit cannot record one twice.

Duplicates an earlier Herdsman may have written are removed first (the oldest row of each key is kept).

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DELETE FROM host_events WHERE id NOT IN "
               "(SELECT keep FROM (SELECT MIN(id) AS keep FROM host_events GROUP BY host, state, time) AS k)")
    with op.batch_alter_table("host_events") as batch:
        batch.create_unique_constraint("uq_host_event", ["host", "state", "time"])


def downgrade() -> None:
    with op.batch_alter_table("host_events") as batch:
        batch.drop_constraint("uq_host_event", type_="unique")
