"""Alembic's environment: runs the revisions on the connection :func:`dicom_node.db.migrate`
passes in (``config.attributes["connection"]``), inside one transaction."""

from __future__ import annotations

from alembic import context

from dicom_node.models import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite has no ALTER COLUMN
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
