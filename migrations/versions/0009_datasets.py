"""Uploaded text corpora (issue 12): the ``datasets`` table (``POST /datasets``; used by a job as
``settings.data.dataset = "upload:<id>"``; counted in the owner's storage quota).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``datasets`` (owner cascade-deleted with the user) and its ``(owner_id, created_at)`` index."""
    op.create_table(
        "datasets",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("owner_id", sa.String(36), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=True),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("text_column", sa.String(200), nullable=True),
        sa.Column("documents", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_datasets_owner_id_created_at", "datasets", ["owner_id", "created_at"])


def downgrade() -> None:
    """Drop what :func:`upgrade` created."""
    op.drop_index("ix_datasets_owner_id_created_at", "datasets")
    op.drop_table("datasets")
