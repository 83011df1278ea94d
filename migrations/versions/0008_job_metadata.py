"""Job metadata (issue 15): ``jobs.metadata``, the client's string labels of a job (JSON, nullable).

Filtered with ``GET /v1/jobs?metadata[key]=value`` through the JSON operators of each database (``->>`` on
Postgres, ``JSON_EXTRACT`` on SQLite), within one owner's jobs (``ix_jobs_owner_id_created_at``): no index of
its own.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``jobs.metadata`` (JSON, JSONB on Postgres; nullable: older jobs have none)."""
    with op.batch_alter_table("jobs") as b:
        b.add_column(sa.Column("metadata", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=True))


def downgrade() -> None:
    """Drop ``jobs.metadata``."""
    with op.batch_alter_table("jobs") as b:
        b.drop_column("metadata")
