"""Drop the table of the hand-written schema versioning (replaced by Alembic).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Drop ``schema_version`` where an earlier version of the node left it."""
    if sa.inspect(op.get_bind()).has_table("schema_version"):
        op.drop_table("schema_version")


def downgrade() -> None:
    """Not supported: restore the database backup taken before the upgrade."""
    raise NotImplementedError("downgrades are not supported; restore a backup")
