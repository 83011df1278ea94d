"""Idempotent ``POST /jobs``: the ``Idempotency-Key`` header, as Stripe's API and the IETF draft
"The Idempotency-Key HTTP Header Field" (draft-ietf-httpapi-idempotency-key-header) define it.

A key belongs to one user and lives in ``idempotency_keys`` (:class:`service.models.IdempotencyKey`):

1. :func:`claim` (its own committed transaction): a new key, or one whose row expired, is inserted
   ``in_flight`` for this request. A key already there with another request body is a 422
   (``idempotency_key_reused``); one ``done`` is a :class:`Replay` of the stored response (same status, same
   body, ``Idempotent-Replayed: true``); one still ``in_flight`` is a 409 (``idempotency_key_in_use``, with
   Retry-After) unless its request has been silent for :data:`IN_FLIGHT_TIMEOUT` (it died), which this request
   then takes over. The unique constraint on (owner, key) decides between concurrent first uses.
2. The request runs. :func:`bind_job` records the job on the key in the job's own transaction.
3. :func:`complete` stores the response (state ``done``); :func:`release` deletes the row instead when the
   request failed before it created anything that stays: a validation 4xx, the quota's 429, or the 503 of a
   failed enqueue (its job is marked failed), so a retry with the same key runs afresh.

Keys expire ``idempotency_key_ttl_seconds`` after their first use (free again from then on);
:func:`prune_expired` deletes the expired rows (the worker's reaper calls it every pass).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from fastapi import Response
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from .config import Settings
from .models import IdempotencyKey, Job, utcnow
from .problems import ProblemError
from .schemas import API_PREFIX, JobCreate, job_out

log = logging.getLogger(__name__)

MAX_KEY_CHARS = 255
"""Longest accepted ``Idempotency-Key`` header."""
IN_FLIGHT_TIMEOUT = timedelta(seconds=120)
"""A key ``in_flight`` for longer belongs to a request that died (an API process killed mid-request): the
next request with it takes it over instead of answering 409. Well above a submission's longest run
(validation plus ``enqueue_retries`` broker retries)."""
RETRY_AFTER_IN_USE = "1"
"""Retry-After (seconds) of the 409 for a key in flight."""


def check_key(key: str | None) -> str | None:
    """The ``Idempotency-Key`` header as given (None when absent).

    Raises:
        ProblemError: 422 naming ``Idempotency-Key`` unless it is 1-255 printable ASCII characters.
    """
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_KEY_CHARS or not key.isprintable() or not key.isascii():
        raise ProblemError(
            422,
            "validation_error",
            f"Idempotency-Key must be 1-{MAX_KEY_CHARS} printable ASCII characters",
            field="Idempotency-Key",
        )
    return key


def request_sha256(body: JobCreate) -> str:
    """SHA-256 (hex) of the request in canonical JSON (defaults filled in, keys sorted): equal bodies, equal
    hash."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Claim:
    """The key row this request holds ``in_flight`` (its id)."""

    id: int
    key: str


def json_body(content: Any) -> str:
    """``content`` as the JSON text of a response (compact, UTF-8, as FastAPI's ``JSONResponse`` writes it);
    stored as text so that a replay sends the very same bytes."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


@dataclass(frozen=True)
class Replay:
    """A stored response to send again: its HTTP status, its JSON text and the job it created."""

    status: int
    body: str
    job_id: str | None

    def response(self) -> Response:
        """The replayed response: the stored status and body, ``Idempotent-Replayed: true`` and the job's
        ``Location``."""
        headers = {"Idempotent-Replayed": "true"}
        if self.job_id is not None:
            headers["Location"] = f"{API_PREFIX}/jobs/{self.job_id}"
        return Response(self.body, status_code=self.status, headers=headers, media_type="application/json")


def claim(session: Session, user_id: str, key: str, digest: str, settings: Settings) -> Claim | Replay:
    """Take ``key`` of ``user_id`` for a request whose body hashes to ``digest`` (commits).

    Returns:
        A :class:`Claim` when this request may run (the key was new, expired, or held by a dead request);
        a :class:`Replay` when the key already finished with the same body.

    Raises:
        ProblemError: 422 ``idempotency_key_reused`` (another body; names ``Idempotency-Key``, carries the
            earlier ``job_id``), 409 ``idempotency_key_in_use`` with Retry-After (a request with this key is
            running).
    """
    now = utcnow()
    session.commit()  # whatever the request did before (authentication) is not part of the claim
    row = _row(session, user_id, key)
    if row is not None and row.expires_at <= now:
        session.execute(
            delete(IdempotencyKey).where(IdempotencyKey.id == row.id, IdempotencyKey.expires_at <= now),
            execution_options={"synchronize_session": False},
        )
        row = None
    if row is None:
        fresh = IdempotencyKey(
            owner_id=user_id,
            key=key,
            request_sha256=digest,
            state="in_flight",
            locked_at=now,
            created_at=now,
            expires_at=now + timedelta(seconds=settings.idempotency_key_ttl_seconds),
        )
        session.add(fresh)
        try:
            session.commit()
            return Claim(fresh.id, key)
        except IntegrityError:  # a concurrent request inserted it first
            session.rollback()
            row = _row(session, user_id, key)
            if row is None:  # ... and released it again already: let the client retry
                raise _in_use(key) from None
    session.commit()
    if row.request_sha256 != digest:
        raise ProblemError(
            422,
            "idempotency_key_reused",
            "this Idempotency-Key was already used with a different request body"
            + (f" (job {row.job_id})" if row.job_id else "")
            + "; use a new key for a new job",
            field="Idempotency-Key",
            job_id=row.job_id,
        )
    if row.state == "done":
        return _replay(session, row)
    if row.locked_at > now - IN_FLIGHT_TIMEOUT:
        raise _in_use(key)
    # The request holding the key died. If it had created its job, that job is the answer; else run again.
    if row.job_id is not None:
        job = session.get(Job, row.job_id, options=[selectinload(Job.artifacts)])
        body = json_body(job_out(job).model_dump(mode="json")) if job is not None else None
        if body is not None and _set_done(session, row.id, row.locked_at, 202, body):
            log.warning("idempotency key %r: its request died after creating job %s; finished it", key, row.job_id)
            return Replay(202, body, row.job_id)
        raise _in_use(key)
    taken = session.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.id == row.id, IdempotencyKey.locked_at == row.locked_at)
        .values(locked_at=now),
        execution_options={"synchronize_session": False},
    ).rowcount
    session.commit()
    if taken != 1:
        raise _in_use(key)
    log.warning("idempotency key %r: its request died before creating a job; this request takes it over", key)
    return Claim(row.id, key)


def bind_job(session: Session, held: Claim, job_id: str) -> None:
    """Record ``job_id`` on the held key, in the transaction that creates the job (no commit)."""
    session.execute(
        update(IdempotencyKey).where(IdempotencyKey.id == held.id).values(job_id=job_id),
        execution_options={"synchronize_session": False},
    )


def complete(session: Session, held: Claim, status: int, body: str) -> None:
    """Store the response (status, JSON text from :func:`json_body`) of the request holding the key (state
    ``done``; commits)."""
    session.rollback()
    session.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.id == held.id)
        .values(state="done", response_status=status, response_body=body),
        execution_options={"synchronize_session": False},
    )
    session.commit()


def release(session: Session, held: Claim) -> None:
    """Free the key: its request failed before creating anything that stays (deletes the row; commits).

    Errors are logged, not raised (the request's own error is the answer); a row left behind is freed by
    :data:`IN_FLIGHT_TIMEOUT`.
    """
    try:
        session.rollback()
        session.execute(
            delete(IdempotencyKey).where(IdempotencyKey.id == held.id, IdempotencyKey.state == "in_flight"),
            execution_options={"synchronize_session": False},
        )
        session.commit()
    except Exception:  # noqa: BLE001 - best effort, see the docstring
        log.exception("could not release idempotency key %r", held.key)


def prune_expired(make_session: sessionmaker[Session], now: datetime | None = None) -> int:
    """Delete the keys whose ``expires_at`` passed (``now``, default the current time). Returns how many."""
    with make_session.begin() as s:
        return s.execute(
            delete(IdempotencyKey).where(IdempotencyKey.expires_at <= (now or utcnow())),
            execution_options={"synchronize_session": False},
        ).rowcount


# -- helpers ---------------------------------------------------------------------------------------
def _row(session: Session, user_id: str, key: str) -> IdempotencyKey | None:
    return session.scalar(
        select(IdempotencyKey)
        .where(IdempotencyKey.owner_id == user_id, IdempotencyKey.key == key)
        .execution_options(populate_existing=True)
    )


def _replay(session: Session, row: IdempotencyKey) -> Replay:
    if row.response_body is not None:
        return Replay(row.response_status or 200, row.response_body, row.job_id)
    # A key carried over from jobs.idempotency_key (migration 0004): no stored body, show the job.
    job = session.get(Job, row.job_id, options=[selectinload(Job.artifacts)]) if row.job_id else None
    if job is None:
        raise ProblemError(
            409,
            "idempotency_key_in_use",
            "this Idempotency-Key was used for a job that no longer exists; use a new key",
            field="Idempotency-Key",
        )
    return Replay(row.response_status or 202, json_body(job_out(job).model_dump(mode="json")), job.id)


def _set_done(session: Session, row_id: int, locked_at: datetime, status: int, body: str) -> bool:
    done = session.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.id == row_id, IdempotencyKey.locked_at == locked_at, IdempotencyKey.state == "in_flight")
        .values(state="done", response_status=status, response_body=body),
        execution_options={"synchronize_session": False},
    ).rowcount
    session.commit()
    return done == 1


def _in_use(key: str) -> ProblemError:
    return ProblemError(
        409,
        "idempotency_key_in_use",
        f"a request with Idempotency-Key {key!r} is still being processed; retry after it finished",
        field="Idempotency-Key",
        headers={"Retry-After": RETRY_AFTER_IN_USE},
    )
