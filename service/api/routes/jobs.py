"""Upgrade jobs: create, list, read, cancel, delete, events, artifacts, checkpoints (mounted under ``/v1``).

Routes only: ownership, idempotency, admission, publishing and cursors are :mod:`service.policies`; deletion,
the storage quota and retention are :mod:`service.storage`.
"""

from __future__ import annotations

import base64
import logging
from typing import Annotated

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from service import encode as encoding
from service import idempotency
from service.api.deps import CeleryDep, LimitDep, SessionDep, SettingsDep, SubmitterDep
from service.auth import UserDep
from service.db import run_in_session
from service.estimate import estimate_job as estimate_for
from service.events import EventStreamResponse, job_event_stream
from service.jobs import add_event, transition
from service.jsonbody import StrictJSONRoute
from service.models import Job, JobEvent, User
from service.policies import (
    admit,
    check_job_request,
    job_checkpoints,
    job_or_404,
    keyset_page,
    metadata_filters,
    publish_job,
    validate_job_request,
)
from service.problems import ProblemError, problem_responses
from service.schemas import (
    API_PREFIX,
    ArtifactList,
    CheckpointList,
    EncodeResult,
    EventList,
    JobCreate,
    JobEstimate,
    JobList,
    JobModel,
    JobStatus,
    artifact_out,
    event_out,
    job_out,
)
from service.storage import check_storage, job_output_estimates, request_job_deletion
from service.webhooks import notify_in_background

log = logging.getLogger(__name__)
router = APIRouter(
    prefix="/jobs", tags=["jobs"], responses=problem_responses(400, 401, 413, 422, 429), route_class=StrictJSONRoute
)

_NOT_FOUND = problem_responses(404, s404="unknown job, or another user's (problem+json)")


# -- routes ----------------------------------------------------------------------------------------
@router.post(
    "",
    status_code=202,
    responses={
        202: {
            "description": "job created and queued; also the replay of an earlier request with the same "
            "Idempotency-Key and body (same status and body, header Idempotent-Replayed: true)",
            "headers": {
                "Location": {"description": "/v1/jobs/{id}", "schema": {"type": "string"}},
                "Idempotent-Replayed": {
                    "description": "'true' on a replay of a stored response",
                    "schema": {"type": "string"},
                },
            },
        },
        **problem_responses(
            409,
            413,
            429,
            503,
            s409="a request with this Idempotency-Key is still running (code idempotency_key_in_use; "
            "problem+json; Retry-After)",
            s413="request body too large, or storage quota exceeded (code storage_quota_exceeded, with "
            "used_bytes, limit_bytes, requested_bytes; problem+json)",
            s429="over the submission rate limit (code rate_limited) or too many unfinished jobs (code "
            "too_many_jobs) (problem+json; Retry-After)",
            s503="job recorded as failed: the broker is unreachable (code enqueue_failed; problem+json); the "
            "Idempotency-Key is not bound, retry with it",
        ),
    },
)
def create_job(
    body: JobCreate,
    session: SessionDep,
    settings: SettingsDep,
    celery: CeleryDep,
    user: SubmitterDep,
    idempotency_key: str | None = Header(
        None,
        alias="Idempotency-Key",
        description="Client-chosen key (1-255 printable ASCII characters), remembered for "
        "RSAE_IDEMPOTENCY_KEY_TTL_SECONDS (default 24 h): the same key with the same body replays the first "
        "response (202, same body, Idempotent-Replayed: true) instead of creating another job; with another "
        "body it is a 422; while the first request still runs, a 409. A request refused before it created a "
        "job (4xx, or the 503 of an unreachable broker) leaves the key free.",
    ),
) -> JobModel:
    """Create an upgrade job: validate it fully, commit the row (status ``queued``), then enqueue its id.

    Admission is exact under concurrency: the quota is counted and the row inserted in one transaction that
    holds the user's submission lock (:func:`service.policies.admit`). If publishing to the broker fails
    after the commit, the job is marked ``failed`` with error code ``enqueue_failed`` (so it never lingers
    as ``queued``) and the answer is a 503 problem carrying ``job_id``. With an ``Idempotency-Key`` the
    request holds the key while it runs and stores its response for replays (:mod:`service.idempotency`).

    Storage quota: the job's artifacts are estimated from its teacher (8 bytes x ``d_in`` x ``d_sae`` + 1 MiB
    for an uploaded SAE; 0 for hub and server-side teachers) and must fit beside what the user already stores
    (``RSAE_MAX_STORAGE_BYTES_PER_USER``), else 413 ``storage_quota_exceeded`` with the figures; checked
    under the same submission lock as the quota.
    """
    key = idempotency.check_key(idempotency_key)
    digest = idempotency.request_sha256(body)
    held = None
    if key is not None:
        claimed = idempotency.claim(session, user.id, key, digest, settings)
        if isinstance(claimed, idempotency.Replay):
            return claimed.response()
        held = claimed
    try:
        check_job_request(session, settings, body, user)
        session.commit()  # end the reads: the admission transaction begins with the lock
        admit(session, user, settings)
        estimate = job_output_estimates(session, [body.model_dump(mode="json")])[0]
        check_storage(session, settings, user.id, estimate, what="this job's estimated artifacts")
        job = Job(
            status="queued",
            stage=None,
            progress=0.0,
            attempt=0,
            request=body.model_dump(mode="json"),
            job_metadata=body.metadata,
            owner_id=user.id,
            idempotency_key=key,
            request_sha256=digest,
        )
        session.add(job)
        session.flush()
        add_event(session, job.id, "status", {"status": "queued"})
        if held is not None:
            idempotency.bind_job(session, held, job.id)
        session.commit()
        publish_job(session, celery, settings, job.id)  # 503 after marking the job failed
    except Exception:
        session.rollback()
        if held is not None:
            idempotency.release(session, held)
        raise
    session.refresh(job)
    out = idempotency.json_body(job_out(job).model_dump(mode="json"))
    if held is not None:
        idempotency.complete(session, held, 202, out)
    return Response(
        out, status_code=202, headers={"Location": f"{API_PREFIX}/jobs/{job.id}"}, media_type="application/json"
    )


@router.post(
    "/estimate",
    responses=problem_responses(
        422, s422="the body is not a valid job (the same problems as POST /v1/jobs, naming the field; problem+json)"
    ),
)
def estimate_job(body: JobCreate, session: SessionDep, settings: SettingsDep, user: UserDep) -> JobEstimate:
    """What the job in ``body`` (the ``POST /v1/jobs`` body) would cost on this server's workers, and whether
    ``POST /v1/jobs`` would accept it now. Nothing is created, queued or counted (no job row, no quota or rate-limit
    use; an ``Idempotency-Key`` header is ignored).

    The body is validated exactly as ``POST /v1/jobs`` validates it (the same 422s naming the field:
    :func:`service.policies.validate_job_request`). The server's limits do not answer 422 here: every limit the
    job would break (job bounds 422, unfinished jobs 429, storage quota 413) is listed in ``limits_exceeded`` with
    the status, code, detail and field ``POST /v1/jobs`` answers, and ``allowed_to_proceed`` is false.

    The answer: tokens (extracted train and eval rows, fine-tuning rows), disk (activation scratch, artifacts),
    peak host and accelerator memory, and each stage's expected seconds with its basis: the rate this server's
    workers measured on the device (``basis.source`` ``measured``, with the device, the number of jobs and when),
    or the documented default (``default``), or ``unknown`` where a size is known only to the worker
    (:mod:`service.estimate`).
    """
    try:
        teacher = validate_job_request(session, settings, body, user)
        return estimate_for(session, settings, body, user, teacher)
    finally:
        session.rollback()  # nothing an estimate touched is kept


_METADATA_QUERY = {
    "parameters": [
        {
            "name": "metadata",
            "in": "query",
            "style": "deepObject",
            "explode": True,
            "required": False,
            "description": "Only jobs whose metadata has these values: ?metadata[key]=value (repeat for more "
            "keys; all must match).",
            "schema": {"type": "object", "additionalProperties": {"type": "string"}},
        }
    ]
}


@router.get("", openapi_extra=_METADATA_QUERY)
async def list_jobs(
    request: Request,
    session: SessionDep,
    limit: LimitDep,
    user: UserDep,
    after: str | None = Query(None, description="next_cursor of the previous page."),
    status: JobStatus | None = Query(None, description="Only jobs in this status."),  # type: ignore[valid-type]
) -> JobList:
    """Your jobs, newest first, ``limit`` per page; follow ``next_cursor`` (null on the last page).

    ``?metadata[key]=value`` keeps the jobs whose metadata has that value (several: all must match; a
    malformed key is a 422 naming ``metadata[key]``)."""
    filters = metadata_filters(request.query_params.multi_items())
    return await run_in_session(session, _job_page, session, user, limit, after, status, filters)


def _job_page(
    session: Session, user: User, limit: int, after: str | None, status: str | None, filters: dict[str, str]
) -> JobList:
    q = select(Job).options(selectinload(Job.artifacts)).where(Job.owner_id == user.id)
    if status is not None:
        q = q.where(Job.status == status)
    for key, value in filters.items():
        q = q.where(Job.job_metadata[key].as_string() == value)
    rows, cursor = keyset_page(session, q, Job, limit, after)
    return JobList(data=[job_out(j) for j in rows], has_more=cursor is not None, next_cursor=cursor)


@router.get("/{job_id}", responses=_NOT_FOUND)
async def get_job(job_id: str, session: SessionDep, user: UserDep) -> JobModel:
    """One job: status, stage, progress, timestamps, metadata, request echo, metrics, error, artifacts."""
    return await run_in_session(session, _job_out, session, job_id, user)


def _job_out(session: Session, job_id: str, user: User) -> JobModel:
    return job_out(job_or_404(session, job_id, user))


@router.post("/{job_id}/cancel", responses=_NOT_FOUND)
def cancel_job(job_id: str, request: Request, session: SessionDep, settings: SettingsDep, user: UserDep) -> JobModel:
    """Cooperative cancel, safe to repeat: queued -> cancelled; running -> cancelling (the worker stops
    at its next check and sets cancelled); any other status is left as it is."""
    job = job_or_404(session, job_id, user)
    cancelled_now = transition(session, job_id, {"queued"}, "cancelled")
    if not cancelled_now:
        transition(session, job_id, {"running"}, "cancelling")
    session.commit()
    if cancelled_now:
        notify_in_background(request.app.state.sessionmaker, settings, job_id)
    session.refresh(job)
    return job_out(job)


@router.delete(
    "/{job_id}",
    status_code=202,
    response_model=JobModel,
    responses={
        202: {"description": "the job was running: it is cancelling, and is deleted once it has stopped"},
        204: {"description": "deleted: the job, its events, artifacts and scratch are gone"},
        **_NOT_FOUND,
        **problem_responses(409, s409="the job kept changing status; try again (code job_busy; problem+json)"),
    },
)
def delete_job(job_id: str, session: SessionDep, settings: SettingsDep, user: UserDep) -> JobModel | Response:
    """Delete one of your jobs with its events, artifacts (files and rows) and scratch, freeing storage quota.

    A queued or finished job is deleted at once: 204. A running (or cancelling) job is cancelled first: 202
    with the job in ``cancelling`` and ``deleted_at`` set; the worker stops at its next check and the reaper
    deletes the job once it has ended (within ``RSAE_REAPER_INTERVAL_SECONDS``); until then it is still
    listed, and repeating the DELETE answers 202 again. Once gone, the id is a 404 (as for an unknown id or
    another user's job). A job deleted while queued sends no webhook; one deleted while running reports
    ``cancelled`` to its webhook like a cancel.
    """
    job = job_or_404(session, job_id, user)
    if request_job_deletion(session, settings, job_id) == "deleted":
        return Response(status_code=204)
    session.refresh(job)
    return job_out(job)


@router.get(
    "/{job_id}/events",
    response_model=EventList,
    responses={
        200: {
            "description": "a page of events as JSON ({data, has_more, next_cursor}), or, with "
            "'Accept: text/event-stream', as a live "
            "server-sent event stream that ends when the job is terminal",
            "content": {
                "text/event-stream": {
                    "schema": {"type": "string"},
                    "example": 'id: 12\nevent: progress\ndata: {"id":12,"type":"progress","created_at":'
                    '"2026-11-23T10:00:00Z","data":{"stage":"finetune","progress":0.52}}\n\n',
                }
            },
        },
        **_NOT_FOUND,
        **problem_responses(429, s429="too many open event streams of yours (problem+json; Retry-After)"),
    },
)
def list_job_events(
    job_id: str,
    request: Request,
    session: SessionDep,
    limit: LimitDep,
    user: UserDep,
    after: int | None = Query(None, ge=0, le=2**63 - 1, description="Id of the last event already seen."),
    last_event_id: str | None = Header(
        None,
        alias="Last-Event-ID",
        description="SSE resumption: id of the last event received (takes precedence over 'after').",
    ),
) -> EventList | Response:
    """The job's events in order (status, progress, metrics, log), after event id ``after``: ``limit`` per page,
    ``next_cursor`` is the last event's id (pass it as ``after``).

    With ``Accept: text/event-stream`` the answer is a server-sent event stream instead
    (:mod:`service.events`): past events after ``after`` / ``Last-Event-ID`` first, then new ones as they
    happen, ending after the job's terminal status event.
    """
    job_or_404(session, job_id, user)
    if "text/event-stream" in request.headers.get("accept", ""):
        start = after or 0
        if last_event_id is not None:
            if not (last_event_id.isascii() and last_event_id.isdigit()) or int(last_event_id) >= 2**63:
                raise ProblemError(422, "validation_error", "Last-Event-ID must be an event id", field="Last-Event-ID")
            start = int(last_event_id)
        slots = request.app.state.streams
        slots.acquire(user.id)
        session.close()  # the stream polls with its own short sessions: hold no connection meanwhile
        stream = job_event_stream(
            request,
            request.app.state.sessionmaker,
            job_id,
            start,
            max_seconds=request.app.state.settings.stream_max_seconds,
        )
        return EventStreamResponse(stream, on_close=lambda: slots.release(user.id))
    q = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id).limit(limit + 1)
    if after is not None:
        q = q.where(JobEvent.id > after)
    rows = list(session.scalars(q))
    more = len(rows) > limit
    rows = rows[:limit]
    return EventList(data=[event_out(e) for e in rows], has_more=more, next_cursor=str(rows[-1].id) if more else None)


@router.get("/{job_id}/artifacts", responses=_NOT_FOUND)
async def list_artifacts(job_id: str, session: SessionDep, user: UserDep) -> ArtifactList:
    """The job's files: name, kind, content type, size, sha256, download url (all of them in one page)."""
    return await run_in_session(session, _artifacts_out, session, job_id, user)


def _artifacts_out(session: Session, job_id: str, user: User) -> ArtifactList:
    arts = [artifact_out(a) for a in job_or_404(session, job_id, user).artifacts]
    return ArtifactList(data=arts, has_more=False, next_cursor=None)


@router.get("/{job_id}/checkpoints", responses=_NOT_FOUND)
def list_checkpoints(job_id: str, session: SessionDep, user: UserDep) -> CheckpointList:
    """The checkpoints the worker saved for the job, oldest first (all of them in one page): name, stage, step,
    attempt, when, and the metrics recorded at that step (see :func:`service.policies.job_checkpoints`)."""
    job = job_or_404(session, job_id, user)
    return CheckpointList(data=job_checkpoints(session, job), has_more=False, next_cursor=None)


ENCODE_RESPONSES = problem_responses(
    409,
    410,
    503,
    504,
    s409="the job has not succeeded (code job_not_finished), or its teacher is no longer on the server (code "
    "teacher_unavailable, field which) (problem+json)",
    s410="the job's artifacts were deleted by the retention rule (problem+json)",
    s503="no encode worker took the request in time (code encode_unavailable; problem+json; Retry-After)",
    s504="the encode worker did not answer in time (code encode_timeout; problem+json)",
)
"""The problem answers of the encode routes beyond the router's own."""


@router.post("/{job_id}/encode", responses={**_NOT_FOUND, **ENCODE_RESPONSES})
async def encode_job(
    job_id: str, request: Request, user: UserDep, body: Annotated[encoding.EncodeRequest | None, Body()] = None
) -> EncodeResult:
    """Top-k latents per token of a succeeded job's teacher and upgraded SAE, side by side.

    ``text`` (a string or a list) is tokenized and run through the job's host model to its hook with the job's
    context conventions (``report.json`` ``data.conventions``; positions the conventions drop carry no latents);
    ``activations`` (rows of ``d_in`` numbers) are encoded as they are. Served by the long-lived encode worker
    (``rsae-service encode-worker``, queue ``encode``), which keeps models and SAEs loaded. Bounds:
    ``RSAE_ENCODE_MAX_TOKENS`` / ``_MAX_TEXTS`` / ``_MAX_ROWS`` (413 naming the field), ``_MAX_TOP_K`` (422),
    ``RSAE_RATE_LIMIT_ENCODE_PER_USER`` (429). Only the owner may encode (404 otherwise).
    """
    return await encoding.encode(request, user, body, encoding.job_payload, job_id)


@router.get(
    "/{job_id}/artifacts/{name}",
    response_class=FileResponse,
    responses={
        200: {
            "description": "the file; ETag is its sha256; byte ranges supported",
            "content": {
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "example": "<the file's bytes>",
                }
            },
        },
        206: {
            "description": "partial content (Range: bytes=0-1023)",
            "content": {
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "example": "<bytes 0-1023>",
                }
            },
        },
        304: {"description": "not modified (If-None-Match: the ETag)"},
        **_NOT_FOUND,
        **problem_responses(
            410, s410="the job's artifacts were deleted by the retention rule (code artifact_expired; problem+json)"
        ),
    },
)
def download_artifact(
    job_id: str, name: str, request: Request, session: SessionDep, settings: SettingsDep, user: UserDep
) -> Response:
    """Download one file. The name is looked up in the artifacts table, never joined into a path.

    410 Gone (``artifact_expired``) for any name once the retention rule (``RSAE_RETENTION_DAYS``) deleted the
    job's artifacts (``expired_at`` on the job)."""
    job = job_or_404(session, job_id, user)
    if job.expired_at is not None:
        raise ProblemError(
            410,
            "artifact_expired",
            f"the artifacts of job {job_id} were deleted on {job.expired_at:%Y-%m-%d %H:%M:%S} UTC "
            f"(kept {settings.retention_days:g} days after the job finished, RSAE_RETENTION_DAYS)"
            if settings.retention_days is not None
            else f"the artifacts of job {job_id} were deleted on {job.expired_at:%Y-%m-%d %H:%M:%S} UTC "
            "by the retention rule",
            field="name",
            expired_at=job.expired_at.isoformat(),
        )
    art = next((a for a in job.artifacts if a.name == name), None)
    if art is None:
        raise ProblemError(404, "artifact_not_found", f"job {job_id} has no artifact {name!r}", field="name")
    root = settings.artifacts_dir
    path = (root / art.path).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        log.error("artifact %s of job %s missing on disk at %s", name, job_id, path)
        raise ProblemError(500, "artifact_missing", f"artifact {name!r} is registered but its file is missing")
    etag = f'"{art.sha256}"'
    headers = {
        "ETag": etag,
        "X-Checksum-Sha256": art.sha256,
        "Repr-Digest": f"sha-256=:{base64.b64encode(bytes.fromhex(art.sha256)).decode()}:",
    }
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    return FileResponse(path, media_type=art.content_type, filename=art.name, headers=headers)
