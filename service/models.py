"""SQLAlchemy models. The schema itself is created only by Alembic (``migrations/``).

Types are portable between Postgres and SQLite: ids are UUID strings, JSON columns are ``sqlalchemy.JSON``
(JSONB on Postgres), timestamps are timezone-aware UTC (SQLite stores them naive; :class:`UTCDateTime`
re-attaches UTC on read).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from rsae_client.models import JOB_STATUSES as _API_JOB_STATUSES
from rsae_client.models import TERMINAL_STATUSES as _API_TERMINAL_STATUSES

# The statuses are the API's (shared with the thin client, so both list the same values).
JOB_STATUSES: tuple[str, ...] = _API_JOB_STATUSES
"""Every value of ``jobs.status``. ``publishing``: the pipeline finished and the lease holder committed to
publishing its staged artifacts (``jobs.publish_dir``); only ``succeeded`` follows (see ``worker.tasks``)."""
TERMINAL_STATUSES: frozenset[str] = _API_TERMINAL_STATUSES
"""Statuses a job never leaves."""
EVENT_TYPES: tuple[str, ...] = ("status", "progress", "metrics", "log")
"""Every value of ``job_events.type``."""
IDEMPOTENCY_STATES: tuple[str, ...] = ("in_flight", "done")
"""Every value of ``idempotency_keys.state``."""

JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


def new_id() -> str:
    """A new random UUID as a 36-character string."""
    return str(uuid.uuid4())


def is_uuid(value: str) -> bool:
    """True if ``value`` is a UUID in canonical 36-character form (the shape of every id here)."""
    try:
        return str(uuid.UUID(value)) == value.lower()
    except (ValueError, AttributeError, TypeError):
        return False


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class UTCDateTime(TypeDecorator):
    """``DateTime(timezone=True)`` that always binds and returns aware UTC datetimes (also on SQLite)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        """Reject naive datetimes; convert aware ones to UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; use service.models.utcnow()")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        """Attach UTC to the naive values SQLite returns."""
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    """Declarative base of the service's tables."""


class User(Base):
    """A person or service account. Owns jobs, uploaded SAEs and API tokens."""

    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("name", name="uq_users_name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiToken(Base):
    """A bearer token of a user. Only its SHA-256 is stored; ``prefix`` (first characters) identifies it
    in listings. Revoked tokens stay for the record and are refused."""

    __tablename__ = "api_tokens"
    __table_args__ = (
        UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
        Index("ix_api_tokens_user_id", "user_id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(String(36), ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str | None] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    user: Mapped[User] = relationship()


class Sae(Base):
    """An uploaded teacher SAE. Its files live in ``<uploads_dir>/<path>``."""

    __tablename__ = "saes"
    __table_args__ = (Index("ix_saes_owner_id_created_at", "owner_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str | None] = mapped_column(String(200))
    family: Mapped[str] = mapped_column(String(32))
    architecture: Mapped[str] = mapped_column(String(32))
    d_in: Mapped[int] = mapped_column(Integer)
    d_sae: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text, doc="Folder relative to the uploads dir.")
    cfg: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    size_bytes: Mapped[int | None] = mapped_column(
        BigInteger, doc="Bytes of the stored folder (storage quota); NULL: not measured yet (older rows)."
    )


class Dataset(Base):
    """An uploaded text corpus (``POST /datasets``), usable by its owner as ``settings.data.dataset =
    "upload:<id>"``. Its file lives in ``<datasets_dir>/<path>/corpus.<format>``."""

    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_owner_id_created_at", "owner_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str | None] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(16), doc="'txt', 'jsonl' or 'parquet' (the form field it came in).")
    text_column: Mapped[str | None] = mapped_column(
        String(200), doc="Column read from a table (None: auto, 'input_ids'/'tokens' then 'text'; .txt: None)."
    )
    documents: Mapped[int] = mapped_column(Integer, doc="Non-empty documents (rows) found when it was checked.")
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger, doc="Bytes of the stored file (storage quota).")
    path: Mapped[str] = mapped_column(Text, doc="Folder relative to the datasets dir.")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Job(Base):
    """One upgrade job. This row is the single source of truth about the job (never Celery's state)."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("status", JOB_STATUSES), name="ck_jobs_status"),
        CheckConstraint("progress >= 0 AND progress <= 1", name="ck_jobs_progress"),
        Index("ix_jobs_created_at_id", "created_at", "id"),
        Index("ix_jobs_status_created_at", "status", "created_at"),
        Index("ix_jobs_owner_id_created_at", "owner_id", "created_at"),
        Index("ix_jobs_status_lease_expires_at", "status", "lease_expires_at"),
        Index("ix_jobs_deleted_at", "deleted_at"),
        Index("ix_jobs_status_finished_at", "status", "finished_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("users.id", ondelete="CASCADE"))
    # A record of the submission's Idempotency-Key (not unique: a key freed by a failed enqueue or by its expiry
    # may create another job); the key's state and stored response are ``idempotency_keys``.
    idempotency_key: Mapped[str | None] = mapped_column(String(255), doc="Client's Idempotency-Key header.")
    request_sha256: Mapped[str | None] = mapped_column(String(64), doc="Hash of the canonical request body.")
    status: Mapped[str] = mapped_column(String(16), default="queued")
    # One of rsae.config.STAGES; checked in code, not by a constraint, so the core can add a stage
    # without a migration.
    stage: Mapped[str | None] = mapped_column(String(32))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    request: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # ``metadata`` is a reserved attribute of declarative classes: the column keeps the API's name.
    job_metadata: Mapped[dict[str, str] | None] = mapped_column(
        "metadata", JSONType, doc="The job's string labels (API field 'metadata'; list filter ?metadata[k]=v)."
    )
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Worker lease (worker/lease.py): the worker that runs the job renews lease_expires_at by heartbeat;
    # the reaper re-queues running jobs whose lease expired. ``attempt`` counts the starts (claims).
    lease_owner: Mapped[str | None] = mapped_column(String(200), doc="'<host>:<pid>:<random>' of the runner.")
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    deadline_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime, doc="Wall-clock limit; set at the first start (RSAE_JOB_DEADLINE_SECONDS) unless preset."
    )
    enqueued_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime, doc="Last time the reaper published a message for this row (None: at creation only)."
    )
    checkpoint: Mapped[dict[str, Any] | None] = mapped_column(
        JSONType, doc="Last checkpoint the worker saved: {'stage', 'step', 'at'}."
    )
    resumed_from: Mapped[dict[str, Any] | None] = mapped_column(
        JSONType, doc="Where the latest attempt resumed: {'attempt', 'stage', 'step', 'reused'}."
    )
    publish_dir: Mapped[str | None] = mapped_column(
        Text,
        doc="While 'publishing': the staging folder (relative to the artifacts dir) being moved to "
        "'<job>/sae'; whoever finishes the publish (the worker, or the reaper after a crash) reads it here.",
    )
    deleted_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime, doc="DELETE asked while unfinished: the reaper removes the row once the job ends."
    )
    expired_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime, doc="When the retention rule (RSAE_RETENTION_DAYS) deleted the job's artifacts."
    )

    artifacts: Mapped[list["Artifact"]] = relationship(
        back_populates="job", order_by="Artifact.name", cascade="all, delete-orphan", passive_deletes=True
    )


class Artifact(Base):
    """A file a job produced. ``path`` is relative to the artifacts dir; clients only ever give ``name``."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_artifacts_job_id_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(32))
    content_type: Mapped[str] = mapped_column(String(100))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    job: Mapped[Job] = relationship(back_populates="artifacts")


class JobEvent(Base):
    """An append-only record of what happened to a job (status change, progress, metrics, log line)."""

    __tablename__ = "job_events"
    __table_args__ = (
        CheckConstraint(_in("type", EVENT_TYPES), name="ck_job_events_type"),
        Index("ix_job_events_job_id_id", "job_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    type: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]] = mapped_column(JSONType)


DELIVERY_STATES: tuple[str, ...] = ("pending", "delivered", "failed")
"""Every value of ``webhook_deliveries.state``."""


class WebhookDelivery(Base):
    """One webhook notice of a finished job (the outbox of :mod:`service.webhooks`).

    Written in the same transaction as the job's terminal status; ``id`` is the notice's ``webhook-id``,
    the same on every attempt, so receivers de-duplicate on it. ``payload`` is the exact JSON body sent on
    every attempt. ``pending`` rows with ``next_attempt_at`` in the past are due; a deliverer claims one by
    moving ``next_attempt_at`` ahead and counting the attempt. ``last_outcome`` is generic
    ("delivered", "refused: address not allowed", "failed after 7 attempts"); details go to the logs.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint(_in("state", DELIVERY_STATES), name="ck_webhook_deliveries_state"),
        Index("ix_webhook_deliveries_state_next_attempt_at", "state", "next_attempt_at"),
        Index("ix_webhook_deliveries_job_id", "job_id"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    payload: Mapped[str] = mapped_column(Text, doc="The JSON body, exactly as signed and sent.")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    last_outcome: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class IdempotencyKey(Base):
    """An ``Idempotency-Key`` of a user's ``POST /jobs`` (:mod:`service.idempotency`, as Stripe keys work).

    ``in_flight`` while the request that took it runs (a concurrent request with the key answers 409);
    ``done`` with the response to replay (status and JSON body). A request that failed before it created
    anything deletes its row, so the key is free again; so does expiry (``expires_at``, the worker's reaper
    deletes expired rows).
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        CheckConstraint(_in("state", IDEMPOTENCY_STATES), name="ck_idempotency_keys_state"),
        UniqueConstraint("owner_id", "key", name="uq_idempotency_keys_owner_id_key"),
        Index("ix_idempotency_keys_expires_at", "expires_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    owner_id: Mapped[str] = mapped_column(String(36), ForeignKey("users.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    request_sha256: Mapped[str] = mapped_column(String(64), doc="Hash of the canonical request body.")
    state: Mapped[str] = mapped_column(String(16), default="in_flight")
    locked_at: Mapped[datetime] = mapped_column(UTCDateTime, doc="When the request now holding the key took it.")
    response_status: Mapped[int | None] = mapped_column(Integer, doc="HTTP status to replay (state done).")
    response_body: Mapped[str | None] = mapped_column(
        Text, doc="JSON body to replay byte for byte (state done); None for keys migrated from jobs: the job is shown."
    )
    job_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="SET NULL"), doc="The job the request created."
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, doc="After this the key is free again.")
