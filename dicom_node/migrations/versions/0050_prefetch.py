"""Prefetch of MR series from the PACS: prefetches, their recorded steps, retrievals.

Revision ID: 0050
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0050"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create ``prefetches``, ``prefetch_events`` and ``retrievals``."""
    op.create_table(
        "prefetches",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("ct_series_uid", sa.String(length=64), nullable=False),
        sa.Column("ct_revision", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("issuer_of_patient_id", sa.String(length=64), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=True),
        sa.Column("not_before", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_prefetches_ct_series_uid", "prefetches", ["ct_series_uid"], unique=False)
    op.create_index("ix_prefetches_state", "prefetches", ["state"], unique=False)

    op.create_table(
        "prefetch_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("prefetch_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["prefetch_id"], ["prefetches.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_prefetch_events_prefetch_id", "prefetch_events", ["prefetch_id"], unique=False
    )

    op.create_table(
        "retrievals",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("prefetch_id", sa.Integer(), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("expected", sa.Integer(), nullable=False),
        sa.Column("completed", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("warning", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["prefetch_id"], ["prefetches.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_retrievals_prefetch_id", "retrievals", ["prefetch_id"], unique=False)
    op.create_index("ix_retrievals_series_uid", "retrievals", ["series_uid"], unique=False)


def downgrade() -> None:
    """Not supported: restore the database backup taken before the upgrade."""
    raise NotImplementedError("downgrades are not supported; restore a backup")
