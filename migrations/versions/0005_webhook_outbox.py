"""Webhook outbox: one row per notice of a finished job, written with the job's terminal status.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create ``webhook_deliveries`` (see ``service.models.WebhookDelivery``) and the index deliverers scan
    (``state``, ``next_attempt_at``). Jobs finished before this revision get no outbox row (their
    notices were sent, or not, by the old code)."""
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", TS, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("last_outcome", sa.String(200), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=True),
        sa.Column("delivered_at", TS, nullable=True),
        sa.CheckConstraint("state IN ('pending', 'delivered', 'failed')", name="ck_webhook_deliveries_state"),
    )
    with op.batch_alter_table("webhook_deliveries") as b:
        b.create_index("ix_webhook_deliveries_state_next_attempt_at", ["state", "next_attempt_at"])
        b.create_index("ix_webhook_deliveries_job_id", ["job_id"])


def downgrade() -> None:
    """Drop ``webhook_deliveries`` (undelivered notices are lost)."""
    op.drop_table("webhook_deliveries")
