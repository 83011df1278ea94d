"""Idempotency keys in their own table (issue 11): in-flight/done state, the stored response, expiry.

``jobs.idempotency_key`` stays as a record of the key a job was submitted with, without its unique
constraint (a key freed by a failed enqueue, or by expiry, may create another job). Keyed jobs submitted
before this revision become ``done`` keys that replay the job as it is now (no stored body), expiring 24 h
after the job's creation; keys of jobs whose enqueue failed are not carried over (they are free).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta, timezone

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)
LEGACY_TTL = timedelta(hours=24)
"""Life of the keys carried over from ``jobs`` (the default of RSAE_IDEMPOTENCY_KEY_TTL_SECONDS)."""


def upgrade() -> None:
    """Create ``idempotency_keys``, carry the keys of existing jobs over, drop the jobs' unique constraint."""
    keys = op.create_table(
        "idempotency_keys",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("owner_id", sa.String(36), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("request_sha256", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("locked_at", TS, nullable=False),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("response_body", sa.Text(), nullable=True),
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.CheckConstraint("state IN ('in_flight', 'done')", name="ck_idempotency_keys_state"),
        sa.UniqueConstraint("owner_id", "key", name="uq_idempotency_keys_owner_id_key"),
    )
    op.create_index("ix_idempotency_keys_expires_at", "idempotency_keys", ["expires_at"])
    jobs = sa.table(
        "jobs",
        sa.column("id", sa.String),
        sa.column("owner_id", sa.String),
        sa.column("idempotency_key", sa.String),
        sa.column("request_sha256", sa.String),
        sa.column("status", sa.String),
        sa.column("error", JSON),
        sa.column("created_at", TS),
    )
    rows = op.get_bind().execute(
        sa.select(jobs).where(
            jobs.c.idempotency_key.is_not(None), jobs.c.owner_id.is_not(None), jobs.c.request_sha256.is_not(None)
        )
    )
    carried = []
    for r in rows:
        if r.status == "failed" and (r.error or {}).get("code") == "enqueue_failed":
            continue
        created = r.created_at if r.created_at.tzinfo else r.created_at.replace(tzinfo=timezone.utc)
        carried.append(
            {
                "owner_id": r.owner_id,
                "key": r.idempotency_key,
                "request_sha256": r.request_sha256,
                "state": "done",
                "locked_at": created,
                "response_status": 202,
                "job_id": r.id,
                "created_at": created,
                "expires_at": created + LEGACY_TTL,
            }
        )
    if carried:
        op.bulk_insert(keys, carried)
    with op.batch_alter_table("jobs") as b:
        b.drop_constraint("uq_jobs_owner_id_idempotency_key", type_="unique")


def downgrade() -> None:
    """Drop ``idempotency_keys`` and restore the unique constraint on ``jobs`` (older duplicates of a key
    lose it: the newest job keeps it)."""
    op.drop_index("ix_idempotency_keys_expires_at", "idempotency_keys")
    op.drop_table("idempotency_keys")
    jobs = sa.table(
        "jobs",
        sa.column("id", sa.String),
        sa.column("owner_id", sa.String),
        sa.column("idempotency_key", sa.String),
        sa.column("created_at", TS),
    )
    bind = op.get_bind()
    seen: set[tuple[str, str]] = set()
    rows = bind.execute(
        sa.select(jobs.c.id, jobs.c.owner_id, jobs.c.idempotency_key)
        .where(jobs.c.idempotency_key.is_not(None))
        .order_by(jobs.c.created_at.desc())
    ).all()
    for job_id, owner, key in rows:
        if (owner, key) in seen:
            bind.execute(sa.update(jobs).where(jobs.c.id == job_id).values(idempotency_key=None))
        seen.add((owner, key))
    with op.batch_alter_table("jobs") as b:
        b.create_unique_constraint("uq_jobs_owner_id_idempotency_key", ["owner_id", "idempotency_key"])
