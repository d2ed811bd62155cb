"""Alembic's entry point for Herdsman's store. It is run by `orchestrator.store.migrate` on the connection the
store opened (there is no alembic.ini: the store is migrated on open, never by hand)."""

from alembic import context

from orchestrator.store import Base

connection = context.config.attributes["connection"]
# batch mode: SQLite cannot ALTER a table's constraints in place; Alembic copies the table instead
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
