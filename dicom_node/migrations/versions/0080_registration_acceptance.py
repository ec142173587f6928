"""Jobs record who accepted an unreliable registration after review, and when.

Revision ID: 0080
Revises: 0050
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0080"
down_revision = "0050"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``jobs.registration_accepted_by`` and ``jobs.registration_accepted_at``."""
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("registration_accepted_by", sa.String(length=128), nullable=True)
        )
        batch.add_column(sa.Column("registration_accepted_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    """Drop the two columns."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("registration_accepted_at")
        batch.drop_column("registration_accepted_by")
