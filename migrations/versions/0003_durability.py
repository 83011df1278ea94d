"""Durability: per-job deadline, last publish time, checkpoint and resume records, reaper index.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Add ``deadline_at``, ``enqueued_at``, ``checkpoint``, ``resumed_from`` to jobs, and the index the
    reaper scans (``status``, ``lease_expires_at``). All nullable: existing rows need no backfill."""
    with op.batch_alter_table("jobs") as b:
        b.add_column(sa.Column("deadline_at", TS, nullable=True))
        b.add_column(sa.Column("enqueued_at", TS, nullable=True))
        b.add_column(sa.Column("checkpoint", JSON, nullable=True))
        b.add_column(sa.Column("resumed_from", JSON, nullable=True))
    op.create_index("ix_jobs_status_lease_expires_at", "jobs", ["status", "lease_expires_at"])


def downgrade() -> None:
    """Drop everything :func:`upgrade` added."""
    op.drop_index("ix_jobs_status_lease_expires_at", "jobs")
    with op.batch_alter_table("jobs") as b:
        b.drop_column("resumed_from")
        b.drop_column("checkpoint")
        b.drop_column("enqueued_at")
        b.drop_column("deadline_at")
