"""Storage bounds (issue 11): uploaded SAE sizes for the per-user quota, job deletion and artifact retention.

- ``saes.size_bytes``: bytes of the stored teacher folder (NULL on rows uploaded before this revision: they
  are measured on disk the first time the owner's usage is computed, :func:`service.storage.storage_usage`);
- ``jobs.deleted_at``: ``DELETE /jobs/{id}`` on an unfinished job; the reaper removes the row once it ends;
- ``jobs.expired_at``: the job's artifacts were deleted by the retention rule (``RSAE_RETENTION_DAYS``);
- indexes for the reaper's scans of both.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Add ``saes.size_bytes``, ``jobs.deleted_at``, ``jobs.expired_at`` (all nullable: no backfill needed)
    and the indexes ``ix_jobs_deleted_at`` and ``ix_jobs_status_finished_at``."""
    with op.batch_alter_table("saes") as b:
        b.add_column(sa.Column("size_bytes", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("jobs") as b:
        b.add_column(sa.Column("deleted_at", TS, nullable=True))
        b.add_column(sa.Column("expired_at", TS, nullable=True))
    op.create_index("ix_jobs_deleted_at", "jobs", ["deleted_at"])
    op.create_index("ix_jobs_status_finished_at", "jobs", ["status", "finished_at"])


def downgrade() -> None:
    """Drop everything :func:`upgrade` added."""
    op.drop_index("ix_jobs_status_finished_at", "jobs")
    op.drop_index("ix_jobs_deleted_at", "jobs")
    with op.batch_alter_table("jobs") as b:
        b.drop_column("expired_at")
        b.drop_column("deleted_at")
    with op.batch_alter_table("saes") as b:
        b.drop_column("size_bytes")
