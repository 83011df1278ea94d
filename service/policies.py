"""What the API enforces about jobs, apart from the routes that call it (:mod:`service.api.routes.jobs`).

- ownership: :func:`job_or_404` (another user's job is a 404 exactly like an unknown id);
- admission: :func:`admit` (the submission's write lock, then :func:`check_quota`: 429),
  :func:`check_job_request` (:func:`validate_job_request`: server-side paths, webhook host, teacher, the core's
  configuration rules, hook site, layer and width; then the job bounds; 422 naming the field);
- publishing: :func:`publish_job` (enqueue after commit; a broker failure marks the job failed, 503);
- pagination: :func:`encode_cursor` / :func:`decode_cursor` (opaque keyset cursors of ``GET /v1/jobs`` and
  ``GET /v1/saes``); list filters: :func:`metadata_filters` (``?metadata[key]=value``);
- checkpoints: :func:`job_checkpoints` (``GET /v1/jobs/{id}/checkpoints``).

Idempotent submission (``Idempotency-Key``) is :mod:`service.idempotency`.

Every refusal is a :class:`service.problems.ProblemError` (problem+json) or an ``rsae.errors`` error that the
problem handlers turn into one.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from celery import Celery
from pydantic import ValidationError
from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session, joinedload

from rsae.data import resolve_conventions
from rsae.errors import DataError
from rsae.formats import teacher_hook_name
from rsae.hooknames import HookSite, choose_site, layout_for_config, site_width
from rsae.models import model_config, model_shape

from . import bounds
from .config import Settings
from .datasets import resolve_upload
from .db import lock_for_write
from .jobs import build_upgrade_config, resolve_teacher, transition, upgrade_config_errors
from .models import TERMINAL_STATUSES, Job, JobEvent, Sae, User, is_uuid
from .problems import NotFound, ProblemError, validation_error
from .queue import enqueue_upgrade
from .schemas import (
    API_PREFIX,
    METADATA_KEY_MAX_CHARS,
    METADATA_KEY_PATTERN,
    METADATA_MAX_KEYS,
    METADATA_VALUE_MAX_CHARS,
    Checkpoint,
    JobCreate,
)
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


def job_site(req: JobCreate, teacher_path: str = "") -> tuple[HookSite | None, dict | None]:
    """The hook site a job reads, chosen as the pipeline will (:func:`rsae.hooknames.choose_site`: ``layer``,
    ``hook``, the teacher's cfg ``hook_name`` read from ``teacher_path``, ``settings.data.allow_hook_override``),
    and the model's ``config.json`` when known without loading it (:func:`rsae.models.model_config`).

    Returns:
        ``(site, config)``; site None when only the worker can tell (a hub teacher and neither ``layer`` nor
        ``hook``), config None when the model is not at hand.

    Raises:
        rsae.errors.ModelError: malformed model spec (422, field ``model``).
        rsae.errors.HookError: 422 ``invalid_hook`` naming ``hook`` or ``layer``.
    """
    config = model_config(req.model) if req.model.strip() else None  # empty: the core's validation names it
    teacher_hook = teacher_hook_name(teacher_path) if teacher_path else None
    if not teacher_path and req.layer is None and req.hook is None:
        return None, config  # a hub teacher names its site in a cfg only the worker fetches
    choice = choose_site(
        req.layer,
        req.hook,
        teacher_hook,
        layout_for_config(config),
        allow_override=req.settings.data.allow_hook_override,
    )
    return choice.site, config


def check_model_fit(session: Session, req: JobCreate, teacher_path: str = "") -> None:
    """Reject, at submission, a hook site that contradicts the teacher's cfg, a layer the model does not have,
    or a teacher of another width than the activations at the site.

    The site is chosen as the pipeline will (:func:`rsae.hooknames.choose_site`: ``layer``, ``hook``, the
    teacher's cfg ``hook_name`` read from ``teacher_path``, ``settings.data.allow_hook_override``), on the
    model's layout when its ``config.json`` is known without loading it (:func:`rsae.models.model_config`:
    bundled models, local folders, hub ids already cached); what cannot be decided here (a hub teacher, whose
    cfg the worker fetches; a model not at hand) the worker checks when it runs.

    Raises:
        rsae.errors.ModelError: malformed model spec (422, field ``model``).
        rsae.errors.HookError: 422 ``invalid_hook`` naming ``hook`` or ``layer`` (a contradiction with the
            teacher's cfg, an unreadable name, no site at all).
        ProblemError: 422 naming ``layer`` (or ``hook``, when the layer came from it) or ``teacher.sae_id``.
    """
    site, config = job_site(req, teacher_path)
    if site is None:
        return
    shape = model_shape(req.model) if config is not None else None
    if shape is None:
        return
    n_layers, _ = shape
    if site.layer >= n_layers:
        field = "layer" if req.layer is not None else "hook"
        raise ProblemError(
            422,
            "invalid_layer",
            f"layer {site.layer} ({site.name}) out of range: {req.model} has {n_layers} blocks (0..{n_layers - 1})",
            field=field,
        )
    width = site_width(config, site)
    sae = session.get(Sae, req.teacher.sae_id) if req.teacher.sae_id is not None else None
    if sae is not None and width is not None and sae.d_in != width:
        raise ProblemError(
            422,
            "invalid_teacher",
            f"the teacher's d_in is {sae.d_in} but {req.model}'s activations at {site.name} are {width} wide",
            field="teacher.sae_id",
        )


def check_conventions(session: Session, req: JobCreate) -> None:
    """The context conventions of ``req`` (``settings.data``) together with its teacher's, when the teacher's
    cfg is at hand (an uploaded SAE): a malformed value on either side is refused now rather than by the worker
    (:func:`rsae.data.resolve_conventions`).

    Raises:
        ProblemError: 422 ``invalid_dataset`` naming ``settings.data.<key>`` (``settings.data.ctx_len`` for the
            context size).
    """
    meta: dict | None = None
    if req.teacher.sae_id is not None and is_uuid(req.teacher.sae_id):
        sae = session.get(Sae, req.teacher.sae_id)
        meta = ((sae.cfg if sae is not None else None) or {}).get("metadata")
    try:
        resolve_conventions(req.settings.data.requested_conventions(), meta if isinstance(meta, dict) else None)
    except DataError as e:
        raise ProblemError(422, e.code, e.message, field=f"settings.{e.field}") from None


def check_job_request(session: Session, settings: Settings, req: JobCreate, user: User) -> None:
    """Everything a job request must pass before its row is written: :func:`validate_job_request`, then the job
    bounds (:func:`service.bounds.check_request_bounds`: allowed model, token and disk budgets, hub download
    size; the last asks the hub's metadata).

    Raises:
        ProblemError: 422 naming the field (see the checks above; configuration errors name ``settings.*``).
        rsae.errors.RSAEError: a bad teacher or model (422 naming the field).
    """
    validate_job_request(session, settings, req, user)
    bounds.check_request_bounds(session, settings, req)


def validate_job_request(session: Session, settings: Settings, req: JobCreate, user: User) -> str:
    """What makes a job request well-formed, apart from the server's budgets, in this order: server-side paths
    (:func:`check_local_paths`), webhook host (:func:`check_webhook`), the teacher
    (:func:`service.jobs.resolve_teacher`, owned by ``user``; hub references checked without network), an
    uploaded corpus (``upload:<id>``, owned by ``user``: :func:`service.datasets.resolve_upload`), the
    core's own configuration rules (:func:`service.jobs.build_upgrade_config`), the context conventions, the hook
    site against the teacher's cfg, layer and width (:func:`check_model_fit`). ``POST /v1/jobs`` and
    ``POST /v1/jobs/estimate`` both run it, so both answer the same 422s.

    Returns:
        The teacher folder (:func:`service.jobs.resolve_teacher`; ``""`` for a hub teacher, which only the
        worker fetches).

    Raises:
        ProblemError: 422 naming the field (see the checks above; configuration errors name ``settings.*``).
        rsae.errors.RSAEError: a bad teacher or model (422 naming the field).
    """
    check_local_paths(req, settings)
    check_webhook(req, settings)
    teacher = resolve_teacher(session, settings, req.teacher, owner_id=user.id)
    resolve_upload(session, settings, req.settings.data.dataset, user.id)  # upload:<id>: the user's own corpus
    check_conventions(session, req)
    try:
        build_upgrade_config(req, teacher)
    except ValidationError as e:
        raise validation_error(upgrade_config_errors(e)) from None
    check_model_fit(session, req, teacher)
    return teacher


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
            headers={"Location": f"{API_PREFIX}/jobs/{job_id}", "Retry-After": "30"},
        ) from None


# -- pagination ------------------------------------------------------------------------------------
def encode_cursor(created_at: datetime, row_id: str) -> str:
    """The opaque ``next_cursor`` after the row (a job or an SAE) created at ``created_at`` with id ``row_id``:
    the pair as unpadded URL-safe base64 JSON."""
    raw = json.dumps([created_at.isoformat(), row_id]).encode()
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


def keyset_page(session: Session, q: Select, model: Any, limit: int, after: str | None) -> tuple[list[Any], str | None]:
    """One page of ``q`` (a ``select(model)`` with its filters) newest first: at most ``limit`` rows after the
    cursor ``after`` (:func:`decode_cursor`), ordered by ``(created_at, id)`` descending, and the
    ``next_cursor`` (None on the last page). ``model`` has ``created_at`` and ``id`` columns (jobs, SAEs,
    datasets).

    Raises:
        ProblemError: 422 ``invalid_cursor`` naming ``after``.
    """
    q = q.order_by(model.created_at.desc(), model.id.desc())
    if after is not None:
        created, row_id = decode_cursor(after)
        q = q.where(or_(model.created_at < created, and_(model.created_at == created, model.id < row_id)))
    rows = list(session.scalars(q.limit(limit + 1)))
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, encode_cursor(rows[-1].created_at, rows[-1].id)


_METADATA_PARAM = re.compile(r"metadata\[(.*)\]", re.DOTALL)


def metadata_filters(query: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The ``?metadata[key]=value`` filters among the query parameters ``query``, as ``{key: value}``.

    Raises:
        ProblemError: 422 naming ``metadata[key]`` for a key that could not be set on a job (empty, over
            ``METADATA_KEY_MAX_CHARS`` characters or outside ``[A-Za-z0-9_.:-]``), a value over
            ``METADATA_VALUE_MAX_CHARS``, the same key twice, or more than ``METADATA_MAX_KEYS`` filters.
    """
    out: dict[str, str] = {}
    for name, value in query:
        if not name.startswith("metadata"):
            continue
        m = _METADATA_PARAM.fullmatch(name)
        field = name[:MAX_FILTER_FIELD_CHARS]
        if m is None:
            raise ProblemError(422, "validation_error", "filter by metadata as metadata[key]=value", field=field)
        key = m.group(1)
        if not (0 < len(key) <= METADATA_KEY_MAX_CHARS and re.fullmatch(METADATA_KEY_PATTERN, key)):
            raise ProblemError(
                422,
                "validation_error",
                f"a metadata key has 1-{METADATA_KEY_MAX_CHARS} characters among A-Z a-z 0-9 _ . : -",
                field=field,
            )
        if len(value) > METADATA_VALUE_MAX_CHARS:
            raise ProblemError(
                422,
                "validation_error",
                f"a metadata value has at most {METADATA_VALUE_MAX_CHARS} characters",
                field=field,
            )
        if key in out:
            raise ProblemError(422, "validation_error", f"metadata[{key}] given twice", field=field)
        out[key] = value
    if len(out) > METADATA_MAX_KEYS:
        raise ProblemError(422, "validation_error", f"at most {METADATA_MAX_KEYS} metadata filters", field="metadata")
    return out


MAX_FILTER_FIELD_CHARS = 60
"""Longest query parameter name echoed as a problem's ``field``."""

CHECKPOINT_EVENT_KEY = "checkpoint"
"""Key of the ``log`` event the worker writes for every saved checkpoint (``worker.tasks.JobReporter``)."""


def job_checkpoints(session: Session, job: Job) -> list[Checkpoint]:
    """The checkpoints the worker saved for ``job``, oldest first, each with its metrics.

    Source: the ``log`` events carrying ``checkpoint`` (``{name, stage, step, at}``, one per checkpoint saved,
    written by the worker with ``jobs.checkpoint``); a job run before those events existed shows only
    ``jobs.checkpoint``, its last one. ``metrics`` is the ``metrics`` event of the same stage (and, in
    fine-tuning, the same run: ``finetune-rsae`` -> ``run: rsae``) at the checkpoint's step, else the last one
    recorded before the checkpoint; its ``stage`` and ``run`` keys are dropped (they are the checkpoint's).
    """
    rows = session.scalars(
        select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.type.in_(("log", "metrics"))).order_by(JobEvent.id)
    )
    seen: list[dict[str, Any]] = []
    out: list[Checkpoint] = []
    for e in rows:
        if e.type == "metrics":
            seen.append(e.data)
            continue
        info = e.data.get(CHECKPOINT_EVENT_KEY)
        if isinstance(info, dict):
            out.append(_checkpoint(info, e.created_at, seen))
    if not out and job.checkpoint:
        at = job.checkpoint.get("at")
        when = datetime.fromisoformat(at) if isinstance(at, str) else job.updated_at
        out.append(_checkpoint(job.checkpoint, when, seen))
    return out


def _checkpoint(info: dict[str, Any], when: datetime, seen: list[dict[str, Any]]) -> Checkpoint:
    name, stage, step = info.get("name"), info.get("stage"), info.get("step")
    run = name.split("-", 1)[1] if isinstance(name, str) and name.startswith("finetune-") else None
    candidates = [m for m in seen if m.get("stage") == stage and (run is None or m.get("run") in (None, run))]
    if step is not None:
        at_or_before = [m for m in candidates if isinstance(m.get("step"), int) and m["step"] <= step]
        exact = [m for m in at_or_before if m["step"] == step]
        candidates = exact or at_or_before
    metrics = candidates[-1] if candidates else None
    return Checkpoint(
        name=name,
        stage=stage,
        step=step,
        attempt=info.get("attempt"),
        created_at=when,
        metrics={k: v for k, v in metrics.items() if k not in ("stage", "run")} if metrics else None,
    )
