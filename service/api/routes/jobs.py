"""Upgrade jobs: create, list, read, cancel, events, artifacts."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
from datetime import datetime

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import ValidationError
from sqlalchemy import and_, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from rsae.config import DEFAULT_DATASET
from rsae.models import model_shape
from service.api.deps import CeleryDep, LimitDep, SessionDep, SettingsDep
from service.auth import UserDep
from service.config import Settings
from service.events import job_event_stream
from service.jobs import add_event, build_upgrade_config, resolve_teacher, transition, upgrade_config_errors
from service.models import TERMINAL_STATUSES, Job, JobEvent, Sae, User, is_uuid
from service.problems import NotFound, ProblemError, problem_responses, validation_error
from service.schemas import ArtifactOut, EventOut, JobCreate, JobOut, JobPage, JobStatus
from service.webhooks import host_allowed, notify_in_background
from service.queue import enqueue_upgrade

log = logging.getLogger(__name__)
router = APIRouter(prefix="/jobs", tags=["jobs"], responses=problem_responses(400, 401, 413, 422))

_NOT_FOUND = problem_responses(404, s404="unknown job, or another user's (problem+json)")
MAX_IDEMPOTENCY_KEY_CHARS = 255


# -- helpers ---------------------------------------------------------------------------------------
def _job_or_404(session: Session, job_id: str, user: User) -> Job:
    """The job ``job_id`` of ``user``; another user's job is a 404 exactly like an unknown id."""
    job = session.get(Job, job_id, options=[selectinload(Job.artifacts)]) if is_uuid(job_id) else None
    if job is None or job.owner_id != user.id:
        raise NotFound("job", job_id)
    return job


def _request_sha256(body: JobCreate) -> str:
    """SHA-256 of the request in canonical JSON (defaults filled in, keys sorted): equal bodies, equal hash."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _check_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS or not key.isprintable() or not key.isascii():
        raise ProblemError(422, "validation_error", f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_CHARS} "
                           "printable ASCII characters", field="Idempotency-Key")
    return key


def _replay(session: Session, user: User, key: str, digest: str, response: Response) -> JobOut | None:
    """The job created earlier with Idempotency-Key ``key`` (same body), or None if the key is new.

    Raises:
        ProblemError: 422 ``idempotency_key_reused`` when the key was used with a different body.
    """
    job = session.scalar(select(Job).options(selectinload(Job.artifacts))
                         .where(Job.owner_id == user.id, Job.idempotency_key == key))
    if job is None:
        return None
    if job.request_sha256 != digest:
        raise ProblemError(422, "idempotency_key_reused", "this Idempotency-Key was already used with a "
                           f"different request body (job {job.id}); use a new key for a new job",
                           field="Idempotency-Key", job_id=job.id)
    response.status_code = 200
    response.headers["Location"] = f"/jobs/{job.id}"
    response.headers["Idempotent-Replayed"] = "true"
    return JobOut.from_row(job)


def _check_quota(session: Session, user: User, settings: Settings) -> None:
    """429 with Retry-After when ``user`` already has ``max_active_jobs_per_user`` unfinished jobs."""
    active = session.scalar(select(func.count()).select_from(Job).where(
        Job.owner_id == user.id, Job.status.not_in(tuple(TERMINAL_STATUSES))))
    if active >= settings.max_active_jobs_per_user:
        raise ProblemError(429, "too_many_jobs", f"you have {active} unfinished jobs, the limit is "
                           f"{settings.max_active_jobs_per_user}; wait for some to finish or cancel them",
                           headers={"Retry-After": "60"})


def _is_local_path(value: str) -> bool:
    return os.path.isabs(value) or value.startswith(("./", "../", "~")) or value in (".", "..")


def _check_local_paths(req: JobCreate, settings: Settings) -> None:
    """Server-side paths are refused unless ``allow_local_paths``; allowed ones must be absolute folders."""
    dataset = req.settings.data.dataset
    candidates = {"teacher.path": req.teacher.path,
                  "model": req.model if _is_local_path(req.model) else None,
                  "settings.data.dataset": dataset if dataset != DEFAULT_DATASET and _is_local_path(dataset)
                  else None}
    if not settings.allow_local_paths:
        field = next((f for f, v in candidates.items() if v is not None), None)
        if field is not None:
            raise ProblemError(422, "local_paths_disabled", f"{field}: server-side paths are disabled on "
                               "this server (RSAE_ALLOW_LOCAL_PATHS=false); upload teachers with POST /saes",
                               field=field)
    path = req.teacher.path
    if path is not None and not (os.path.isabs(path) and os.path.isdir(path)):
        raise ProblemError(422, "invalid_teacher", f"teacher.path {path!r} is not an absolute path to an "
                           "existing folder", field="teacher.path")


def _check_model_fit(session: Session, req: JobCreate) -> None:
    """Reject, at submission, a layer the model does not have or a teacher of another width.

    Only when the model's shape is known without loading it (:func:`rsae.models.model_shape`: bundled
    models, local folders, hub ids already cached); otherwise the worker checks it when the model loads.

    Raises:
        rsae.errors.ModelError: malformed model spec (422, field ``model``).
        ProblemError: 422 naming ``layer`` or ``teacher.sae_id``.
    """
    shape = model_shape(req.model)
    if shape is None:
        return
    n_layers, d_model = shape
    if req.layer >= n_layers:
        raise ProblemError(422, "invalid_layer", f"layer {req.layer} out of range: {req.model} has {n_layers} "
                           f"blocks (0..{n_layers - 1})", field="layer")
    sae = session.get(Sae, req.teacher.sae_id) if req.teacher.sae_id is not None else None
    if sae is not None and sae.d_in != d_model:
        raise ProblemError(422, "invalid_teacher", f"the teacher's d_in is {sae.d_in} but {req.model}'s "
                           f"residual stream has d_model {d_model}", field="teacher.sae_id")


def _encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        when = datetime.fromisoformat(created)
        if when.tzinfo is None:
            raise ValueError("naive timestamp")
        return when, str(job_id)
    except (binascii.Error, ValueError, TypeError):
        raise ProblemError(422, "invalid_cursor", "'after' is not a cursor returned by this API",
                           field="after") from None


# -- routes ----------------------------------------------------------------------------------------
@router.post("", status_code=202, responses={
    200: {"description": "replay: a job was already created with this Idempotency-Key and body",
          "model": JobOut},
    **problem_responses(429, 503, s503="job recorded as failed: the broker is unreachable (code "
                        "enqueue_failed; problem+json)")})
def create_job(body: JobCreate, response: Response, session: SessionDep, settings: SettingsDep,
               celery: CeleryDep, user: UserDep,
               idempotency_key: str | None = Header(
                   None, alias="Idempotency-Key", description="Client-chosen key (1-255 printable ASCII "
                   "characters): the same key with the same body returns the same job (200) instead of "
                   "creating another; the same key with another body is a 422.")) -> JobOut:
    """Create an upgrade job: validate it fully, commit the row (status ``queued``), then enqueue its id.

    If publishing to the broker fails after the commit, the job is marked ``failed`` with error code
    ``enqueue_failed`` (so it never lingers as ``queued``) and the answer is a 503 problem carrying
    ``job_id``. The user's row is locked for the duration, so one user's concurrent submissions are
    serialised (the quota and the idempotency check cannot be raced).
    """
    key = _check_idempotency_key(idempotency_key)
    digest = _request_sha256(body)
    session.scalar(select(User.id).where(User.id == user.id).with_for_update())  # no-op lock on SQLite
    if key is not None and (replay := _replay(session, user, key, digest, response)) is not None:
        return replay
    _check_quota(session, user, settings)
    _check_local_paths(body, settings)
    if body.webhook is not None and not host_allowed(body.webhook.url, settings.webhook_allowed_hosts):
        raise ProblemError(422, "webhook_not_allowed", "webhook.url: its host is not in this server's "
                           "RSAE_WEBHOOK_ALLOWED_HOSTS" + ("" if settings.webhook_allowed_hosts else
                                                           " (webhooks are disabled here)"), field="webhook.url")
    teacher = resolve_teacher(session, settings, body.teacher, owner_id=user.id)
    _check_model_fit(session, body)
    try:
        build_upgrade_config(body, teacher)
    except ValidationError as e:
        raise validation_error(upgrade_config_errors(e)) from None
    job = Job(status="queued", stage=None, progress=0.0, attempt=0, request=body.model_dump(mode="json"),
              owner_id=user.id, idempotency_key=key, request_sha256=digest)
    session.add(job)
    try:
        session.flush()
    except IntegrityError:  # the same key committed by a concurrent request (only without the row lock)
        session.rollback()
        if key is not None and (replay := _replay(session, user, key, digest, response)) is not None:
            return replay
        raise
    add_event(session, job.id, "status", {"status": "queued"})
    session.commit()
    try:
        enqueue_upgrade(celery, job.id, retries=settings.enqueue_retries)
    except Exception as e:  # noqa: BLE001 - any publish failure: record it on the row, answer 503
        log.exception("enqueue of job %s failed", job.id)
        transition(session, job.id, {"queued"}, "failed",
                   error={"code": "enqueue_failed", "detail": f"broker unreachable: {e}", "field": None})
        session.commit()
        raise ProblemError(503, "enqueue_failed", "the job was recorded but could not be queued (broker "
                           "unreachable); it is marked failed, submit it again later", job_id=job.id,
                           headers={"Location": f"/jobs/{job.id}", "Retry-After": "30"}) from None
    session.refresh(job)
    response.headers["Location"] = f"/jobs/{job.id}"
    return JobOut.from_row(job)


@router.get("")
def list_jobs(session: SessionDep, limit: LimitDep, user: UserDep,
              after: str | None = Query(None, description="next_cursor of the previous page."),
              status: JobStatus | None = Query(None, description="Only jobs in this status.")  # type: ignore[valid-type]
              ) -> JobPage:
    """Your jobs, newest first, ``limit`` per page; follow ``next_cursor`` (null on the last page)."""
    q = (select(Job).options(selectinload(Job.artifacts)).where(Job.owner_id == user.id)
         .order_by(Job.created_at.desc(), Job.id.desc()))
    if status is not None:
        q = q.where(Job.status == status)
    if after is not None:
        created, job_id = _decode_cursor(after)
        q = q.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    rows = list(session.scalars(q.limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return JobPage(items=[JobOut.from_row(j) for j in rows],
                   next_cursor=_encode_cursor(rows[-1]) if more else None)


@router.get("/{job_id}", responses=_NOT_FOUND)
def get_job(job_id: str, session: SessionDep, user: UserDep) -> JobOut:
    """One job: status, stage, progress, timestamps, request echo, metrics, error, artifacts."""
    return JobOut.from_row(_job_or_404(session, job_id, user))


@router.post("/{job_id}/cancel", responses=_NOT_FOUND)
def cancel_job(job_id: str, request: Request, session: SessionDep, settings: SettingsDep,
               user: UserDep) -> JobOut:
    """Cooperative cancel, safe to repeat: queued -> cancelled; running -> cancelling (the worker stops
    at its next check and sets cancelled); any other status is left as it is."""
    job = _job_or_404(session, job_id, user)
    cancelled_now = transition(session, job_id, {"queued"}, "cancelled")
    if not cancelled_now:
        transition(session, job_id, {"running"}, "cancelling")
    session.commit()
    if cancelled_now:
        notify_in_background(request.app.state.sessionmaker, settings, job_id)
    session.refresh(job)
    return JobOut.from_row(job)


@router.get("/{job_id}/events", response_model=list[EventOut], responses={
    200: {"description": "the events as a JSON list, or, with 'Accept: text/event-stream', as a live "
          "server-sent event stream that ends when the job is terminal",
          "content": {"text/event-stream": {"schema": {"type": "string"}, "example":
                      'id: 12\nevent: progress\ndata: {"id":12,"type":"progress","created_at":'
                      '"2026-11-23T10:00:00Z","data":{"stage":"finetune","progress":0.52}}\n\n'}}},
    **_NOT_FOUND})
def list_events(job_id: str, request: Request, session: SessionDep, limit: LimitDep, user: UserDep,
                after: int | None = Query(None, ge=0, le=2**63 - 1,
                                         description="Id of the last event already seen."),
                last_event_id: str | None = Header(
                    None, alias="Last-Event-ID", description="SSE resumption: id of the last event received "
                    "(takes precedence over 'after').")) -> list[EventOut] | Response:
    """The job's events in order (status, progress, metrics, log), after event id ``after``.

    With ``Accept: text/event-stream`` the answer is a server-sent event stream instead
    (:mod:`service.events`): past events after ``after`` / ``Last-Event-ID`` first, then new ones as they
    happen, ending after the job's terminal status event.
    """
    _job_or_404(session, job_id, user)
    if "text/event-stream" in request.headers.get("accept", ""):
        start = after or 0
        if last_event_id is not None:
            if not last_event_id.isdigit() or int(last_event_id) >= 2**63:
                raise ProblemError(422, "validation_error", "Last-Event-ID must be an event id",
                                   field="Last-Event-ID")
            start = int(last_event_id)
        return StreamingResponse(job_event_stream(request, request.app.state.sessionmaker, job_id, start),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    q = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id).limit(limit)
    if after is not None:
        q = q.where(JobEvent.id > after)
    return [EventOut.from_row(e) for e in session.scalars(q)]


@router.get("/{job_id}/artifacts", responses=_NOT_FOUND)
def list_artifacts(job_id: str, session: SessionDep, user: UserDep) -> list[ArtifactOut]:
    """The job's files: name, kind, content type, size, sha256, download url."""
    return [ArtifactOut.from_row(a) for a in _job_or_404(session, job_id, user).artifacts]


@router.get("/{job_id}/artifacts/{name}", response_class=FileResponse, responses={
    200: {"description": "the file; ETag is its sha256; byte ranges supported",
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                                   "example": "<the file's bytes>"}}},
    206: {"description": "partial content (Range: bytes=0-1023)",
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                                   "example": "<bytes 0-1023>"}}},
    304: {"description": "not modified (If-None-Match: the ETag)"}, **_NOT_FOUND})
def download_artifact(job_id: str, name: str, request: Request, session: SessionDep,
                      settings: SettingsDep, user: UserDep) -> Response:
    """Download one file. The name is looked up in the artifacts table, never joined into a path."""
    art = next((a for a in _job_or_404(session, job_id, user).artifacts if a.name == name), None)
    if art is None:
        raise ProblemError(404, "artifact_not_found", f"job {job_id} has no artifact {name!r}", field="name")
    root = settings.artifacts_dir
    path = (root / art.path).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        log.error("artifact %s of job %s missing on disk at %s", name, job_id, path)
        raise ProblemError(500, "artifact_missing", f"artifact {name!r} is registered but its file is missing")
    etag = f'"{art.sha256}"'
    headers = {"ETag": etag, "X-Checksum-Sha256": art.sha256,
               "Repr-Digest": f"sha-256=:{base64.b64encode(bytes.fromhex(art.sha256)).decode()}:"}
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    return FileResponse(path, media_type=art.content_type, filename=art.name, headers=headers)
