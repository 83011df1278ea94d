"""Users, hashed API tokens, job/SAE ownership and idempotency keys.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create ``users`` and ``api_tokens``; add ``owner_id`` to jobs and saes, idempotency columns to jobs.

    Rows created before this revision have no owner and are visible to no one (ownership is checked on
    every route); the service had no users before.
    """
    op.create_table(
        "users",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("name", name="uq_users_name"),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("user_id", sa.String(36), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(100), nullable=True),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_used_at", TS, nullable=True),
        sa.Column("revoked_at", TS, nullable=True),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
    )
    op.create_index("ix_api_tokens_user_id", "api_tokens", ["user_id"])
    with op.batch_alter_table("jobs") as b:
        b.add_column(sa.Column("owner_id", sa.String(36), nullable=True))
        b.add_column(sa.Column("idempotency_key", sa.String(255), nullable=True))
        b.add_column(sa.Column("request_sha256", sa.String(64), nullable=True))
        b.create_foreign_key("fk_jobs_owner_id", "users", ["owner_id"], ["id"], ondelete="CASCADE")
        b.create_unique_constraint("uq_jobs_owner_id_idempotency_key", ["owner_id", "idempotency_key"])
    op.create_index("ix_jobs_owner_id_created_at", "jobs", ["owner_id", "created_at"])
    with op.batch_alter_table("saes") as b:
        b.add_column(sa.Column("owner_id", sa.String(36), nullable=True))
        b.create_foreign_key("fk_saes_owner_id", "users", ["owner_id"], ["id"], ondelete="CASCADE")
    op.create_index("ix_saes_owner_id_created_at", "saes", ["owner_id", "created_at"])


def downgrade() -> None:
    """Drop everything :func:`upgrade` added."""
    op.drop_index("ix_saes_owner_id_created_at", "saes")
    with op.batch_alter_table("saes") as b:
        b.drop_constraint("fk_saes_owner_id", type_="foreignkey")
        b.drop_column("owner_id")
    op.drop_index("ix_jobs_owner_id_created_at", "jobs")
    with op.batch_alter_table("jobs") as b:
        b.drop_constraint("uq_jobs_owner_id_idempotency_key", type_="unique")
        b.drop_constraint("fk_jobs_owner_id", type_="foreignkey")
        b.drop_column("request_sha256")
        b.drop_column("idempotency_key")
        b.drop_column("owner_id")
    op.drop_index("ix_api_tokens_user_id", "api_tokens")
    op.drop_table("api_tokens")
    op.drop_table("users")
