"""Alembic environment: migrations run on the registry's own connection at start."""

from __future__ import annotations

from alembic import context

from modelplane.registry.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
