"""Encoding for tools on the API's side of the queue: what a request may ask, which files it may read, and the
round trip to the long-lived encode worker (:mod:`worker.encode`) over the broker's Redis.

The round trip. The API publishes ``rsae.encode(payload, reply_key)`` on queue ``encode_queue_name`` with a
Celery ``expires`` of ``encode_start_timeout_seconds`` and waits on the Redis list ``reply_key`` (``BLPOP``, by
``redis.asyncio``: no thread is held while waiting). The worker pushes ``{"state": "started"}`` when it begins,
then ``{"state": "done", "result": ...}`` or ``{"state": "error", "problem": {...}}``; the list expires after the
request's timeouts. No start within ``encode_start_timeout_seconds``: 503 ``encode_unavailable`` with
Retry-After (no encode worker consumes the queue, or all are busy; the message then expires unrun). Started but
no answer within ``encode_timeout_seconds``: 504 ``encode_timeout``. This is the "result timeout" check of the
brief: no broadcast to the workers, one list per request. Celery's own result backend is not used: the service
keeps no task results (``task_ignore_result``), and its Redis consumer is not safe to share between the
threads of an API process.

The payload names files by a root (``artifacts`` or ``uploads``) and a path relative to it, never an absolute
path, so the API and worker may mount the shared storage at different places; the worker resolves them under its
own settings' folders (:func:`resolve_under`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
import weakref
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import anyio.to_thread
import redis.asyncio as aioredis
from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from rsae.models import bundled_name, model_spec_kind

from .bounds import check_model_name, resolve_local_path
from .config import Settings
from .models import Job, Sae, User, is_uuid
from .policies import job_or_404
from .problems import ProblemError
from .queue import TASK_ENCODE
from .teachers import sae_or_404

REPLY_PREFIX = "rsae:encode:reply:"
"""Prefix of the Redis list a worker answers one encode request on."""
ROOTS = ("artifacts", "uploads")
"""Folders a payload may name files under (``Settings.artifacts_dir`` / ``uploads_dir``)."""
WEIGHTS = "sae_weights.safetensors"


class EncodeRequest(BaseModel):
    """Body of ``POST /v1/jobs/{id}/encode``: exactly one of ``text`` and ``activations``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"text": "The central bank raised rates.", "top_k": 8, "which": "both"}]},
    )

    text: str | list[str] | None = Field(
        None,
        description="A text or a list of texts, tokenized and run through the host model to the hook with the "
        "job's context conventions (at most RSAE_ENCODE_MAX_TEXTS texts and RSAE_ENCODE_MAX_TOKENS tokens).",
    )
    activations: list[list[float]] | None = Field(
        None,
        description="Raw activations at the hook: rows of d_in numbers (at most RSAE_ENCODE_MAX_ROWS rows).",
    )
    top_k: int = Field(8, ge=1, description="Latents per token and SAE (at most RSAE_ENCODE_MAX_TOP_K).")
    which: Literal["teacher", "rsae", "both"] = Field(
        "both", description="The SAEs to encode with: the job's teacher, its upgraded SAE, or both side by side."
    )


class SaeEncodeRequest(EncodeRequest):
    """Body of ``POST /v1/saes/{id}/encode`` (the uploaded teacher alone): as :class:`EncodeRequest`, less
    ``which``, plus the host model and hook when the SAE's cfg does not record them."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"text": "The central bank raised rates.", "top_k": 8}]}
    )
    which: Literal["teacher"] = Field("teacher", description="Always 'teacher'.")
    model: str | None = Field(
        None, max_length=1000, description="Host model (default: the SAE's metadata.model_name; RSAE_ALLOWED_MODELS)."
    )
    hook: str | None = Field(None, max_length=200, description="Hook name (default: the SAE's metadata.hook_name).")


def check_bounds(body: EncodeRequest, settings: Settings) -> None:
    """The request's sizes within the settings (the token count is the worker's, which holds the tokenizer).

    Raises:
        ProblemError: 422 naming ``text`` (neither or both inputs) or ``top_k``; 413 ``input_too_large`` naming
            ``text`` or ``activations``.
    """
    if (body.text is None) == (body.activations is None):
        raise ProblemError(422, "validation_error", "give exactly one of text and activations", field="text")
    if body.top_k > settings.encode_max_top_k:
        raise ProblemError(422, "validation_error", f"top_k must be at most {settings.encode_max_top_k}", field="top_k")
    texts = [body.text] if isinstance(body.text, str) else body.text
    if texts is not None and len(texts) > settings.encode_max_texts:
        raise too_large("text", f"at most {settings.encode_max_texts} texts per request, got {len(texts)}")
    if texts is not None and sum(len(t) for t in texts) > 64 * settings.encode_max_tokens:
        raise too_large("text", f"at most {settings.encode_max_tokens} tokens per request")
    if body.activations is not None and len(body.activations) > settings.encode_max_rows:
        raise too_large(
            "activations", f"at most {settings.encode_max_rows} rows per request, got {len(body.activations)}"
        )
    if body.activations is not None and len({len(r) for r in body.activations}) > 1:
        raise ProblemError(422, "validation_error", "every activation row must have d_in numbers", field="activations")


def too_large(field: str, detail: str) -> ProblemError:
    """413 ``input_too_large`` naming ``field``."""
    return ProblemError(413, "input_too_large", detail, field=field)


def _relative(root: Path, path: Path) -> str:
    return str(PurePosixPath(*path.relative_to(root).parts))


def job_payload(session: Session, settings: Settings, job_id: str, user: User, body: EncodeRequest) -> dict[str, Any]:
    """The worker's payload for encoding with job ``job_id`` of ``user``.

    Raises:
        NotFound: unknown job or another user's (404).
        ProblemError: 409 ``job_not_finished`` unless the job succeeded; 410 ``artifact_expired``; 409
            ``teacher_unavailable`` (field ``which``) when the teacher is asked for but its upload was deleted or
            it came from the hub (its copy was scratch).
    """
    job = job_or_404(session, job_id, user)
    if job.status != "succeeded":
        raise ProblemError(
            409,
            "job_not_finished",
            f"job {job_id} is {job.status}; only a succeeded job's SAEs can encode",
            field="id",
            status_of_job=job.status,
        )
    weights = next((a for a in job.artifacts if a.name == WEIGHTS), None)
    if job.expired_at is not None or weights is None:
        raise ProblemError(410, "artifact_expired", f"the artifacts of job {job_id} were deleted", field="id")
    folder = str(PurePosixPath(weights.path).parent)
    saes: dict[str, Any] = {}
    if body.which in ("rsae", "both"):
        saes["rsae"] = {"root": "artifacts", "path": folder, "sha256": weights.sha256}
    if body.which in ("teacher", "both"):
        saes["teacher"] = _job_teacher(session, settings, job)
    return _payload(
        body, settings, model=_job_model(job, settings), site={"root": "artifacts", "path": folder}, saes=saes
    )


def _job_model(job: Job, settings: Settings) -> str:
    spec = str(job.request.get("model"))
    if model_spec_kind(spec) == "path":
        return str(resolve_local_path("model", spec, settings))
    return spec


def _job_teacher(session: Session, settings: Settings, job: Job) -> dict[str, Any]:
    """The payload entry of a job's teacher (an upload that still exists, or an allowed server path)."""
    ref = job.request.get("teacher") or {}
    if ref.get("sae_id"):
        sae = session.get(Sae, ref["sae_id"]) if is_uuid(ref["sae_id"]) else None
        if sae is not None and sae.owner_id == job.owner_id:
            return {"root": "uploads", "path": sae.path, "sha256": sae.sha256}
        why = f"the job's teacher upload {ref['sae_id']} was deleted"
    elif ref.get("path"):
        path = resolve_local_path("teacher.path", ref["path"], settings)
        return {"root": None, "path": str(path), "sha256": f"local:{path.stat().st_mtime_ns}"}
    else:
        why = "the job's teacher came from the hub and was not kept"
    raise ProblemError(
        409, "teacher_unavailable", f"{why}; encode with which='rsae' (the upgraded SAE alone)", field="which"
    )


def sae_payload(
    session: Session, settings: Settings, sae_id: str, user: User, body: SaeEncodeRequest
) -> dict[str, Any]:
    """The worker's payload for encoding with the uploaded teacher ``sae_id`` of ``user`` alone.

    Raises:
        NotFound: unknown SAE or another user's (404).
        ProblemError: 422 ``model_not_allowed`` naming ``model`` (:data:`Settings.allowed_models`).
    """
    row = sae_or_404(session, sae_id, user.id)
    meta = (row.cfg or {}).get("metadata") or {}
    model = body.model or meta.get("model_name")
    if model is not None:
        model = bundled_name(str(model))
        check_model_name(model, settings)
        if model_spec_kind(model) == "path":
            model = str(resolve_local_path("model", model, settings))
    saes = {"teacher": {"root": "uploads", "path": row.path, "sha256": row.sha256}}
    return _payload(body, settings, model=model, site=None, saes=saes, hook=body.hook)


def _payload(body: EncodeRequest, settings: Settings, **fields: Any) -> dict[str, Any]:
    texts = [body.text] if isinstance(body.text, str) else body.text
    return {
        **fields,
        "texts": texts,
        "activations": body.activations,
        "top_k": body.top_k,
        "max_tokens": settings.encode_max_tokens,
    }


def resolve_under(settings: Settings, root: str | None, path: str) -> Path:
    """The file or folder ``path`` of a payload under its root's folder of ``settings`` (``root`` None: an
    absolute server path the API already checked against ``local_path_roots``).

    Raises:
        ProblemError: 404 ``file_missing`` when the path leaves its root or does not exist (field ``id``).
    """
    if root is None:
        full = Path(path)
    else:
        base = settings.artifacts_dir if root == "artifacts" else settings.uploads_dir
        full = (base / path).resolve()
        if root not in ROOTS or not full.is_relative_to(base):
            full = base / "\0"
    if not full.exists():
        raise ProblemError(404, "file_missing", "the SAE's files are no longer on the server", field="id")
    return full


def _owned_or_404(session: Session, ident: str, user: User, kind: str) -> None:
    """404 (``job_not_found`` / ``sae_not_found``) unless ``user`` owns the job or SAE ``ident``."""
    if kind == "job":
        job_or_404(session, ident, user)
    else:
        sae_or_404(session, ident, user.id)


async def encode(request: Any, user: User, body: EncodeRequest | None, build: Any, ident: str) -> dict[str, Any]:
    """The route body of both encode routes: ownership when the body is missing (so another user's id answers
    404 like an unknown one, before any 422), the per-user rate limit, the bounds, the payload (``build``:
    :func:`job_payload` or :func:`sae_payload`, in a worker thread with the request's session), the round trip.

    Raises:
        ProblemError: 404 (not the caller's), 422 (no body), 429 (rate), 413 / 422 (bounds), as ``build`` and
            :meth:`EncodeClient.call`.
    """
    from .db import run_in_session

    app = request.app
    settings: Settings = app.state.settings
    if body is None:
        kind = "job" if build is job_payload else "sae"
        session = app.state.sessionmaker()
        await run_in_session(session, _owned_or_404, session, ident, user, kind)
        raise ProblemError(422, "validation_error", "body: Field required", field="body")
    await anyio.to_thread.run_sync(app.state.rate_limits.encode, user.id)
    check_bounds(body, settings)
    session = app.state.sessionmaker()
    payload = await run_in_session(session, build, session, settings, ident, user, body)
    return await app.state.encoder.call(payload)


# -- the round trip --------------------------------------------------------------------------------------------
class EncodeClient:
    """Sends encode requests and waits for their answers (one per API process, ``app.state.encoder``).

    Args:
        settings: broker URL, queue, timeouts.
        celery: the API's Celery app (publishing only).
    """

    def __init__(self, settings: Settings, celery: Celery) -> None:
        self.settings, self.celery = settings, celery
        self._client_of: tuple[weakref.ref[asyncio.AbstractEventLoop], aioredis.Redis] | None = None

    def _redis(self) -> aioredis.Redis:
        """The ``redis.asyncio`` client of the running event loop (its connections belong to that loop)."""
        loop = asyncio.get_running_loop()
        if self._client_of is None or self._client_of[0]() is not loop:
            client = aioredis.Redis.from_url(self.settings.require_broker(), socket_connect_timeout=5)
            self._client_of = (weakref.ref(loop), client)
        return self._client_of[1]

    async def call(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Publish ``payload`` and return the worker's result.

        Raises:
            ProblemError: 503 ``encode_unavailable`` (not started in time, or the broker is unreachable), 504
                ``encode_timeout``, or the worker's own problem (4xx naming the field, 500 ``encode_failed``).
        """
        s = self.settings
        reply = f"{REPLY_PREFIX}{uuid.uuid4().hex}"
        started = time.monotonic()
        try:
            await anyio.to_thread.run_sync(self._publish, payload, reply)
            first = await self._redis().blpop([reply], timeout=s.encode_start_timeout_seconds)
        except (OSError, ConnectionError, aioredis.RedisError, KombuOperationalError) as e:
            raise _unavailable(f"the broker is unreachable ({type(e).__name__})", 5) from None
        if first is None:
            raise _unavailable(
                f"no encode worker took the request within {s.encode_start_timeout_seconds:g} s (none is running, "
                "or all are busy)",
                max(1, round(s.encode_start_timeout_seconds)),
            )
        left = max(1.0, s.encode_timeout_seconds - (time.monotonic() - started))
        message = await self._redis().blpop([reply], timeout=left)
        if message is None:
            raise ProblemError(
                504, "encode_timeout", f"the encode worker gave no answer within {s.encode_timeout_seconds:g} s"
            )
        await self._redis().delete(reply)
        return answer(json.loads(message[1]))

    def _publish(self, payload: dict[str, Any], reply: str) -> None:
        self.celery.send_task(
            TASK_ENCODE,
            args=[payload, reply],
            queue=self.settings.encode_queue_name,
            expires=self.settings.encode_start_timeout_seconds,
            retry=False,
        )

    async def aclose(self) -> None:
        """Close the Redis client (if any)."""
        if self._client_of is not None:
            await self._client_of[1].aclose()
            self._client_of = None


def _unavailable(detail: str, retry_after: int) -> ProblemError:
    return ProblemError(
        503, "encode_unavailable", detail, headers={"Retry-After": str(retry_after)}, retry_after=retry_after
    )


def answer(message: dict[str, Any]) -> dict[str, Any]:
    """The result of a worker's final message, or its problem raised.

    Raises:
        ProblemError: the worker's problem (status, code, detail, field).
    """
    if message.get("state") == "done":
        return message["result"]
    p = message.get("problem") or {}
    raise ProblemError(
        int(p.get("status", 500)),
        p.get("code", "encode_failed"),
        p.get("detail", "encoding failed"),
        field=p.get("field"),
    )
