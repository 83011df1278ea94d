"""Upgrade jobs: create, list, read, cancel, events, artifacts."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from datetime import datetime

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse
from pydantic import ValidationError
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session, selectinload

from rsae.config import DEFAULT_DATASET
from service.api.deps import CeleryDep, LimitDep, SessionDep, SettingsDep
from service.config import Settings
from service.jobs import add_event, build_upgrade_config, resolve_teacher, transition, upgrade_config_errors
from service.models import Job, JobEvent, is_uuid
from service.problems import NotFound, ProblemError, validation_error
from service.schemas import ArtifactOut, EventOut, JobCreate, JobOut, JobPage, JobStatus
from worker.celery_app import enqueue_upgrade

log = logging.getLogger(__name__)
router = APIRouter(prefix="/jobs", tags=["jobs"])

_NOT_FOUND = {404: {"description": "unknown job (problem+json)"}}


# -- helpers ---------------------------------------------------------------------------------------
def _job_or_404(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id, options=[selectinload(Job.artifacts)]) if is_uuid(job_id) else None
    if job is None:
        raise NotFound("job", job_id)
    return job


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
    422: {"description": "invalid request (problem+json naming the field)"},
    503: {"description": "job recorded as failed: the broker is unreachable (code enqueue_failed)"}})
def create_job(body: JobCreate, response: Response, session: SessionDep, settings: SettingsDep,
               celery: CeleryDep) -> JobOut:
    """Create an upgrade job: validate it fully, commit the row (status ``queued``), then enqueue its id.

    If publishing to the broker fails after the commit, the job is marked ``failed`` with error code
    ``enqueue_failed`` (so it never lingers as ``queued``) and the answer is a 503 problem carrying
    ``job_id``.
    """
    _check_local_paths(body, settings)
    teacher = resolve_teacher(session, settings, body.teacher)
    try:
        build_upgrade_config(body, teacher)
    except ValidationError as e:
        raise validation_error(upgrade_config_errors(e)) from None
    job = Job(status="queued", stage=None, progress=0.0, attempt=0, request=body.model_dump(mode="json"))
    session.add(job)
    session.flush()
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
def list_jobs(session: SessionDep, limit: LimitDep,
              after: str | None = Query(None, description="next_cursor of the previous page."),
              status: JobStatus | None = Query(None, description="Only jobs in this status.")  # type: ignore[valid-type]
              ) -> JobPage:
    """Jobs, newest first, ``limit`` per page; follow ``next_cursor`` (null on the last page)."""
    q = select(Job).options(selectinload(Job.artifacts)).order_by(Job.created_at.desc(), Job.id.desc())
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
def get_job(job_id: str, session: SessionDep) -> JobOut:
    """One job: status, stage, progress, timestamps, request echo, metrics, error, artifacts."""
    return JobOut.from_row(_job_or_404(session, job_id))


@router.post("/{job_id}/cancel", responses=_NOT_FOUND)
def cancel_job(job_id: str, session: SessionDep) -> JobOut:
    """Cooperative cancel, safe to repeat: queued -> cancelled; running -> cancelling (the worker stops
    at its next check and sets cancelled); any other status is left as it is."""
    job = _job_or_404(session, job_id)
    if not transition(session, job_id, {"queued"}, "cancelled"):
        transition(session, job_id, {"running"}, "cancelling")
    session.commit()
    session.refresh(job)
    return JobOut.from_row(job)


@router.get("/{job_id}/events", responses=_NOT_FOUND)
def list_events(job_id: str, session: SessionDep, limit: LimitDep,
                after: int | None = Query(None, ge=0, le=2**63 - 1,
                                         description="Id of the last event already seen.")
                ) -> list[EventOut]:
    """The job's events in order (status, progress, metrics, log), after event id ``after``."""
    _job_or_404(session, job_id)
    q = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id).limit(limit)
    if after is not None:
        q = q.where(JobEvent.id > after)
    return [EventOut.from_row(e) for e in session.scalars(q)]


@router.get("/{job_id}/artifacts", responses=_NOT_FOUND)
def list_artifacts(job_id: str, session: SessionDep) -> list[ArtifactOut]:
    """The job's files: name, kind, content type, size, sha256, download url."""
    return [ArtifactOut.from_row(a) for a in _job_or_404(session, job_id).artifacts]


@router.get("/{job_id}/artifacts/{name}", response_class=FileResponse, responses={
    200: {"description": "the file; ETag is its sha256; byte ranges supported"},
    206: {"description": "partial content"}, 304: {"description": "not modified"}, **_NOT_FOUND})
def download_artifact(job_id: str, name: str, request: Request, session: SessionDep,
                      settings: SettingsDep) -> Response:
    """Download one file. The name is looked up in the artifacts table, never joined into a path."""
    art = next((a for a in _job_or_404(session, job_id).artifacts if a.name == name), None)
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
