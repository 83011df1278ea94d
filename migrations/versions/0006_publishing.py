"""Publishing: the ``publishing`` job status (committed before the artifacts move) and ``jobs.publish_dir``.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = ("queued", "running", "succeeded", "failed", "cancelling", "cancelled")
NEW = ("queued", "running", "publishing", "succeeded", "failed", "cancelling", "cancelled")


def _in(values: tuple[str, ...]) -> str:
    return f"status IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    """Allow status ``publishing`` (check constraint ``ck_jobs_status``) and add the nullable
    ``publish_dir`` column (existing rows need no backfill). Batch mode, so SQLite recreates the table."""
    with op.batch_alter_table("jobs") as b:
        b.add_column(sa.Column("publish_dir", sa.Text(), nullable=True))
        b.drop_constraint("ck_jobs_status", type_="check")
        b.create_check_constraint("ck_jobs_status", _in(NEW))


def downgrade() -> None:
    """Undo :func:`upgrade`; a job caught ``publishing`` goes back to ``running`` (its lease then lapses and
    the reaper re-queues it: the pipeline resumes from its checkpoint and publishes again)."""
    op.execute("UPDATE jobs SET status = 'running' WHERE status = 'publishing'")
    with op.batch_alter_table("jobs") as b:
        b.drop_constraint("ck_jobs_status", type_="check")
        b.create_check_constraint("ck_jobs_status", _in(OLD))
        b.drop_column("publish_dir")
