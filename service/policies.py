"""What the API enforces about jobs, apart from the routes that call it (:mod:`service.api.routes.jobs`).

- ownership: :func:`job_or_404` (another user's job is a 404 exactly like an unknown id);
- admission: :func:`admit` (the submission's write lock, then :func:`check_quota`: 429),
  :func:`check_job_request` (server-side paths, webhook host, teacher, layer and width, the core's
  configuration rules, job bounds; 422 naming the field);
- publishing: :func:`publish_job` (enqueue after commit; a broker failure marks the job failed, 503);
- pagination: :func:`encode_cursor` / :func:`decode_cursor` (opaque keyset cursors of ``GET /jobs``).

Idempotent submission (``Idempotency-Key``) is :mod:`service.idempotency`.

Every refusal is a :class:`service.problems.ProblemError` (problem+json) or an ``rsae.errors`` error that the
problem handlers turn into one.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from datetime import datetime

from celery import Celery
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session, joinedload

from rsae.models import model_shape

from . import bounds
from .config import Settings
from .db import lock_for_write
from .jobs import build_upgrade_config, resolve_teacher, transition, upgrade_config_errors
from .models import TERMINAL_STATUSES, Job, Sae, User, is_uuid
from .problems import NotFound, ProblemError, validation_error
from .queue import enqueue_upgrade
from .schemas import JobCreate
from .webhooks import Policy, WebhookRefused, check_url

log = logging.getLogger(__name__)


# -- ownership -------------------------------------------------------------------------------------
def job_or_404(session: Session, job_id: str, user: User) -> Job:
    """The job ``job_id`` of ``user`` (artifacts loaded in the same query, a LEFT OUTER JOIN: one statement,
    about half the CPU of a second ``SELECT ... IN``; this is read on every poll of a job).

    Raises:
        NotFound: unknown or malformed id, or another user's job (indistinguishable on purpose).
    """
    job = session.get(Job, job_id, options=[joinedload(Job.artifacts)]) if is_uuid(job_id) else None
    if job is None or job.owner_id != user.id:
        raise NotFound("job", job_id)
    return job


# -- admission -------------------------------------------------------------------------------------
def check_quota(session: Session, user: User, settings: Settings) -> None:
    """Refuse a new job while ``user`` already has ``max_active_jobs_per_user`` unfinished ones (exact only
    inside :func:`admit`'s transaction).

    Raises:
        ProblemError: 429 ``too_many_jobs`` with ``Retry-After: 60``.
    """
    active = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.owner_id == user.id, Job.status.not_in(tuple(TERMINAL_STATUSES)))
    )
    if active >= settings.max_active_jobs_per_user:
        raise ProblemError(
            429,
            "too_many_jobs",
            f"you have {active} unfinished jobs, the limit is "
            f"{settings.max_active_jobs_per_user}; wait for some to finish or cancel them",
            headers={"Retry-After": "60"},
        )


def admit(session: Session, user: User, settings: Settings) -> None:
    """Begin the transaction that inserts ``user``'s new job, serialised with every other submission of
    ``user``, and check the quota in it: the count cannot change before that transaction commits.

    SQLite: the transaction starts with ``BEGIN IMMEDIATE`` (:func:`service.db.lock_for_write`; the whole
    database's write lock). Postgres: the user's row is locked (``SELECT ... FOR UPDATE``), so one user's
    submissions queue behind each other and other users are not held up. Call it right after a commit, then
    insert the job and commit (or roll back) promptly: the lock is held until then.

    Raises:
        ProblemError: 429 ``too_many_jobs`` (see :func:`check_quota`); the caller rolls back.
    """
    lock_for_write(session)
    session.scalar(select(User.id).where(User.id == user.id).with_for_update())
    check_quota(session, user, settings)


def check_local_paths(req: JobCreate, settings: Settings) -> None:
    """Server-side paths (``teacher.path``, a model or dataset that is not a bundled name or hub id) only when
    ``allow_local_paths`` is on, absolute, under ``local_path_roots`` once resolved, and existing
    (:func:`service.bounds.check_local_paths`).

    Raises:
        ProblemError: 422 ``local_paths_disabled``, ``path_not_allowed``, ``invalid_teacher``, ``invalid_model``
            or ``invalid_dataset`` naming ``teacher.path``, ``model`` or ``settings.data.dataset``.
        rsae.errors.ModelError: the model is a URL (422 naming ``model``).
    """
    bounds.check_local_paths(req, settings)


def check_webhook(req: JobCreate, settings: Settings) -> None:
    """A job's webhook must go to a host in ``webhook_allowed_hosts``, on a port in ``webhook_allowed_ports``,
    and, when the host is an IP literal, to an allowed address (:func:`service.webhooks.check_url`; names
    are resolved and their addresses checked at every delivery attempt, not here).

    Raises:
        ProblemError: 422 ``webhook_not_allowed`` naming ``webhook.url``.
    """
    if req.webhook is None:
        return
    try:
        check_url(req.webhook.url, Policy.from_settings(settings))
    except WebhookRefused as e:
        if e.outcome == "refused: host not allowed":
            why = "its host is not in this server's RSAE_WEBHOOK_ALLOWED_HOSTS" + (
                "" if settings.webhook_allowed_hosts else " (webhooks are disabled here)"
            )
        elif e.outcome == "refused: port not allowed":
            why = "its port is not in this server's RSAE_WEBHOOK_ALLOWED_PORTS " + str(settings.webhook_allowed_ports)
        else:
            why = "its address is loopback, private, link-local or otherwise not public"
        raise ProblemError(422, "webhook_not_allowed", f"webhook.url: {why}", field="webhook.url") from None


def check_model_fit(session: Session, req: JobCreate) -> None:
    """Reject, at submission, a layer the model does not have or a teacher of another width.

    Only when the model's shape is known without loading it (:func:`rsae.models.model_shape`: bundled
    models, local folders, hub ids already cached); otherwise the worker checks it when the model loads.

    Raises:
        rsae.errors.ModelError: malformed model spec (422, field ``model``).
        ProblemError: 422 naming ``layer`` or ``teacher.sae_id``.
    """
    shape = model_shape(req.model) if req.model.strip() else None  # empty: the core's validation names it
    if shape is None:
        return
    n_layers, d_model = shape
    if req.layer >= n_layers:
        raise ProblemError(
            422,
            "invalid_layer",
            f"layer {req.layer} out of range: {req.model} has {n_layers} blocks (0..{n_layers - 1})",
            field="layer",
        )
    sae = session.get(Sae, req.teacher.sae_id) if req.teacher.sae_id is not None else None
    if sae is not None and sae.d_in != d_model:
        raise ProblemError(
            422,
            "invalid_teacher",
            f"the teacher's d_in is {sae.d_in} but {req.model}'s residual stream has d_model {d_model}",
            field="teacher.sae_id",
        )


def check_job_request(session: Session, settings: Settings, req: JobCreate, user: User) -> None:
    """Everything a job request must pass before its row is written, in this order: server-side paths
    (:func:`check_local_paths`), webhook host (:func:`check_webhook`), the teacher
    (:func:`service.jobs.resolve_teacher`, owned by ``user``; hub references checked without network),
    layer and width (:func:`check_model_fit`), the core's own configuration rules
    (:func:`service.jobs.build_upgrade_config`), and the job bounds (:func:`service.bounds.check_request_bounds`:
    allowed model, token and disk budgets, hub download size; the last asks the hub's metadata).

    Raises:
        ProblemError: 422 naming the field (see the checks above; configuration errors name ``settings.*``).
        rsae.errors.RSAEError: a bad teacher or model (422 naming the field).
    """
    check_local_paths(req, settings)
    check_webhook(req, settings)
    teacher = resolve_teacher(session, settings, req.teacher, owner_id=user.id)
    check_model_fit(session, req)
    try:
        build_upgrade_config(req, teacher)
    except ValidationError as e:
        raise validation_error(upgrade_config_errors(e)) from None
    bounds.check_request_bounds(session, settings, req)


# -- publishing ------------------------------------------------------------------------------------
def publish_job(session: Session, celery: Celery, settings: Settings, job_id: str) -> None:
    """Publish committed job ``job_id`` to the broker (:func:`service.queue.enqueue_upgrade`, retried
    ``enqueue_retries`` times).

    If publishing fails, the job is marked ``failed`` with error code ``enqueue_failed`` (committed), so it
    never lingers as ``queued``.

    Raises:
        ProblemError: 503 ``enqueue_failed`` carrying ``job_id``, with ``Location`` and ``Retry-After: 30``.
    """
    try:
        enqueue_upgrade(celery, job_id, retries=settings.enqueue_retries)
    except Exception as e:  # noqa: BLE001 - any publish failure: record it on the row, answer 503
        log.exception("enqueue of job %s failed", job_id)
        transition(
            session,
            job_id,
            {"queued"},
            "failed",
            # the exception names the broker's host and port: the log has it, the user gets its type only
            error={"code": "enqueue_failed", "detail": f"broker unreachable ({type(e).__name__})", "field": None},
        )
        session.commit()
        raise ProblemError(
            503,
            "enqueue_failed",
            "the job was recorded but could not be queued (broker "
            "unreachable); it is marked failed, submit it again later",
            job_id=job_id,
            headers={"Location": f"/jobs/{job_id}", "Retry-After": "30"},
        ) from None


# -- pagination ------------------------------------------------------------------------------------
def encode_cursor(job: Job) -> str:
    """The opaque ``next_cursor`` after ``job``: its (created_at, id) as unpadded URL-safe base64 JSON."""
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """``(created_at, id)`` of a cursor made by :func:`encode_cursor`.

    Raises:
        ProblemError: 422 ``invalid_cursor`` naming ``after``.
    """
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        when = datetime.fromisoformat(created)
        if when.tzinfo is None:
            raise ValueError("naive timestamp")
        return when, str(job_id)
    except (binascii.Error, ValueError, TypeError):
        raise ProblemError(
            422, "invalid_cursor", "'after' is not a cursor returned by this API", field="after"
        ) from None
