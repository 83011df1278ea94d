"""What the sync and the async client share: request descriptions (:class:`Call`), the retry policy, errors.

A :class:`Call` describes one API request and how to read its answer, without doing I/O; :mod:`rsae_client.client`
sends it with ``httpx.Client`` and :mod:`rsae_client.aio` with ``httpx.AsyncClient``, both through
:class:`RetryPolicy`.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel

from .formats import teacher_files
from .models import (
    API_PREFIX,
    DATASET_FORMATS,
    ArtifactList,
    CheckpointList,
    Dataset,
    DatasetList,
    EncodeResult,
    EventList,
    Job,
    JobEstimate,
    JobList,
    Sae,
    SaeList,
)

T = TypeVar("T")

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
"""Methods that may be re-sent after a connection dropped mid-request (RFC 9110 section 9.2.2)."""
_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
"""Transport errors raised before the request reached the server: any request may be re-sent."""


class ApiError(RuntimeError):
    """A non-2xx answer of the API.

    Attributes:
        status: the HTTP status code.
        problem: the RFC 9457 problem+json body (``code``, ``detail``, ``field``...), or ``{"detail": text}``.
        code: ``problem["code"]`` (e.g. ``validation_error``), or None.
        field: ``problem["field"]``: the offending input (e.g. ``metadata.team``), or None.
        retry_after: seconds from the ``Retry-After`` header, if any.
    """

    def __init__(self, response: httpx.Response) -> None:
        try:
            body = response.json()
        except ValueError:
            body = None
        self.problem: dict[str, Any] = body if isinstance(body, dict) else {"detail": response.text}
        self.status = response.status_code
        self.code: str | None = self.problem.get("code")
        self.field: str | None = self.problem.get("field")
        self.retry_after = retry_after_seconds(response)
        where = f" [field {self.field}]" if self.field else ""
        super().__init__(
            f"{response.request.method} {response.request.url.path} -> {self.status} "
            f"{self.code or ''}: {self.problem.get('detail')}{where}"
        )


def retry_after_seconds(response: httpx.Response) -> float | None:
    """The ``Retry-After`` header of ``response`` in seconds (RFC 9110 section 10.2.3: delay-seconds or an
    HTTP-date), or None when absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before re-sending a request.

    Retried: answers with a status in ``statuses`` (429 and 503: the server asks to come back; their
    ``Retry-After`` is honoured, capped at ``max_retry_after``), connection failures before the request was
    sent (any request), and connections lost during a request that is safe to repeat (GET/PUT/DELETE,
    ``POST /v1/jobs`` carrying an ``Idempotency-Key``, cancel). Without ``Retry-After`` the wait is exponential
    with full jitter: uniform in ``[0, min(max_backoff, backoff * 2**retry)]`` (the AWS architecture blog's
    "full jitter").

    Attributes:
        attempts: tries in all, the first included (1: never retry).
        backoff: base of the exponential wait, seconds.
        max_backoff: longest wait without ``Retry-After``, seconds.
        max_retry_after: longest wait a ``Retry-After`` may ask for, seconds (a longer one raises at once).
        statuses: the answer statuses that are retried.
    """

    attempts: int = 5
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_retry_after: float = 120.0
    statuses: frozenset[int] = field(default_factory=lambda: frozenset({429, 503}))

    def after_response(self, response: httpx.Response, retry: int) -> float | None:
        """Seconds to wait before retry number ``retry + 1`` after ``response``, or None: do not retry."""
        if response.status_code not in self.statuses or retry + 1 >= self.attempts:
            return None
        asked = retry_after_seconds(response)
        if asked is None:
            return self._backoff(retry)
        return asked if asked <= self.max_retry_after else None

    def after_error(self, error: httpx.TransportError, retry: int, repeatable: bool) -> float | None:
        """Seconds to wait before retry number ``retry + 1`` after a transport ``error``, or None: re-raise.
        ``repeatable``: the request is safe to send twice."""
        if retry + 1 >= self.attempts:
            return None
        lost = isinstance(error, (httpx.NetworkError, httpx.TimeoutException, httpx.RemoteProtocolError))
        if isinstance(error, _NEVER_SENT) or (repeatable and lost):
            return self._backoff(retry)
        return None

    def _backoff(self, retry: int) -> float:
        return random.uniform(0.0, min(self.max_backoff, self.backoff * 2**retry))


NO_RETRY = RetryPolicy(attempts=1)
"""Send once (the module-level helpers' default)."""


@dataclass
class Call(Generic[T]):
    """One API request, described without I/O.

    Attributes:
        method, path, params, json, headers, data: as for ``httpx.Client.request``.
        files: ``{field: path}`` of a multipart upload; opened anew for every attempt.
        repeatable: safe to send again after a connection was lost mid-request.
        parse: turns the (2xx) JSON body into the result.
    """

    method: str
    path: str
    parse: Callable[[Any], T]
    params: dict[str, Any] | None = None
    json: Any = None
    headers: dict[str, str] | None = None
    data: dict[str, str] | None = None
    files: dict[str, Path] | None = None
    repeatable: bool = True

    def request_kwargs(self, stack: ExitStack) -> dict[str, Any]:
        """Keyword arguments of ``httpx.Client.request`` for one attempt (files opened on ``stack``)."""
        kwargs: dict[str, Any] = {}
        if self.params:
            kwargs["params"] = self.params
        if self.json is not None:
            kwargs["json"] = self.json
        if self.headers:
            kwargs["headers"] = self.headers
        if self.data:
            kwargs["data"] = self.data
        if self.files:
            kwargs["files"] = {
                name: (path.name, stack.enter_context(open(path, "rb")), "application/octet-stream")
                for name, path in self.files.items()
            }
        return kwargs

    def result(self, response: httpx.Response) -> T:
        """The parsed result of a final ``response``.

        Raises:
            ApiError: the response is not 2xx.
        """
        if response.is_error:
            raise ApiError(response)
        return self.parse(response.json() if response.content else None)


def _jsonable(value: Any) -> Any:
    """``value`` with pydantic models (e.g. :class:`~rsae_client.models.TeacherRef`) turned into JSON data."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def new_idempotency_key() -> str:
    """A fresh ``Idempotency-Key`` (a random UUID, as Stripe's clients send)."""
    return str(uuid.uuid4())


def _metadata_params(metadata: Mapping[str, str] | None) -> dict[str, str]:
    return {f"metadata[{k}]": v for k, v in (metadata or {}).items()}


def _clean(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


# -- the API's operations, one builder each (names = the OpenAPI operation ids) ------------------------------
V = API_PREFIX


def upload_sae(folder: str | Path, name: str | None = None, format: str | None = None) -> Call[Sae]:
    """``POST /v1/saes`` with the teacher files found in ``folder`` (any of the four formats; see
    :func:`rsae_client.formats.teacher_files`, whose ``ValueError`` it raises)."""
    fmt, files = teacher_files(folder, format)
    data = _clean({"name": name, "format": fmt})
    return Call("POST", f"{V}/saes", Sae.model_validate, data=data, files=files, repeatable=False)


def list_saes(limit: int | None = None, after: str | None = None) -> Call[SaeList]:
    """``GET /v1/saes``: one page of your uploads, newest first."""
    return Call("GET", f"{V}/saes", SaeList.model_validate, params=_clean({"limit": limit, "after": after}))


def get_sae(sae_id: str) -> Call[Sae]:
    """``GET /v1/saes/{id}``."""
    return Call("GET", f"{V}/saes/{sae_id}", Sae.model_validate)


def delete_sae(sae_id: str) -> Call[None]:
    """``DELETE /v1/saes/{id}`` (204)."""
    return Call("DELETE", f"{V}/saes/{sae_id}", lambda _: None)


def dataset_format(path: str | Path, format: str | None = None) -> str:
    """The ``POST /v1/datasets`` file field of the corpus file ``path``: ``format`` if given, else from its suffix
    (``.txt``, ``.jsonl``, ``.parquet``; ``.json`` lines count as jsonl).

    Raises:
        ValueError: an unknown ``format``, or a suffix that names none (the message lists the formats).
        FileNotFoundError: ``path`` is not a file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"corpus file {p} does not exist")
    fmt = format or {".json": "jsonl", ".ndjson": "jsonl"}.get(p.suffix.lower(), p.suffix.lower().lstrip("."))
    if fmt not in DATASET_FORMATS:
        known = ", ".join(DATASET_FORMATS)
        raise ValueError(f"{p}: corpus format {fmt!r} is not one of {known}; pass format=")
    return fmt


def upload_dataset(
    path: str | Path, name: str | None = None, format: str | None = None, text_column: str | None = None
) -> Call[Dataset]:
    """``POST /v1/datasets`` with the corpus file ``path`` in the field of its format (:func:`dataset_format`, whose
    errors it raises); never re-sent after a lost connection (it would store the corpus twice)."""
    fmt = dataset_format(path, format)
    data = _clean({"name": name, "text_column": text_column})
    return Call("POST", f"{V}/datasets", Dataset.model_validate, data=data, files={fmt: Path(path)}, repeatable=False)


def list_datasets(limit: int | None = None, after: str | None = None) -> Call[DatasetList]:
    """``GET /v1/datasets``: one page of your uploaded corpora, newest first."""
    return Call("GET", f"{V}/datasets", DatasetList.model_validate, params=_clean({"limit": limit, "after": after}))


def get_dataset(dataset_id: str) -> Call[Dataset]:
    """``GET /v1/datasets/{id}``."""
    return Call("GET", f"{V}/datasets/{dataset_id}", Dataset.model_validate)


def delete_dataset(dataset_id: str) -> Call[None]:
    """``DELETE /v1/datasets/{id}`` (204; 409 ``dataset_in_use`` while an unfinished job reads it)."""
    return Call("DELETE", f"{V}/datasets/{dataset_id}", lambda _: None)


def create_job(body: Mapping[str, Any], idempotency_key: str | None) -> Call[Job]:
    """``POST /v1/jobs``; repeatable (retried after a lost connection) only with an ``idempotency_key``."""
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    return Call(
        "POST", f"{V}/jobs", Job.model_validate, json=_jsonable(body), headers=headers, repeatable=bool(idempotency_key)
    )


def estimate_job(body: Mapping[str, Any]) -> Call[JobEstimate]:
    """``POST /v1/jobs/estimate``: what the job would cost and whether it may be submitted now (creates nothing,
    so repeatable)."""
    return Call("POST", f"{V}/jobs/estimate", JobEstimate.model_validate, json=_jsonable(body))


def list_jobs(
    status: str | None = None,
    metadata: Mapping[str, str] | None = None,
    limit: int | None = None,
    after: str | None = None,
) -> Call[JobList]:
    """``GET /v1/jobs``: one page of your jobs, newest first, optionally by status and metadata values."""
    params = {**_clean({"status": status, "limit": limit, "after": after}), **_metadata_params(metadata)}
    return Call("GET", f"{V}/jobs", JobList.model_validate, params=params)


def get_job(job_id: str) -> Call[Job]:
    """``GET /v1/jobs/{id}``."""
    return Call("GET", f"{V}/jobs/{job_id}", Job.model_validate)


def cancel_job(job_id: str) -> Call[Job]:
    """``POST /v1/jobs/{id}/cancel`` (idempotent on the server, so repeatable)."""
    return Call("POST", f"{V}/jobs/{job_id}/cancel", Job.model_validate)


def delete_job(job_id: str) -> Call[Job | None]:
    """``DELETE /v1/jobs/{id}``: None when deleted at once (204), else the job (202, cancelling first)."""
    return Call("DELETE", f"{V}/jobs/{job_id}", lambda body: None if body is None else Job.model_validate(body))


def list_job_events(job_id: str, after: int | str | None = None, limit: int | None = None) -> Call[EventList]:
    """``GET /v1/jobs/{id}/events`` as JSON: one page of events after event id ``after``."""
    return Call(
        "GET", f"{V}/jobs/{job_id}/events", EventList.model_validate, params=_clean({"after": after, "limit": limit})
    )


def list_artifacts(job_id: str) -> Call[ArtifactList]:
    """``GET /v1/jobs/{id}/artifacts``."""
    return Call("GET", f"{V}/jobs/{job_id}/artifacts", ArtifactList.model_validate)


def list_checkpoints(job_id: str) -> Call[CheckpointList]:
    """``GET /v1/jobs/{id}/checkpoints``."""
    return Call("GET", f"{V}/jobs/{job_id}/checkpoints", CheckpointList.model_validate)


def encode(
    kind: str,
    ident: str,
    text: str | list[str] | None,
    activations: list[list[float]] | None,
    top_k: int | None,
    which: str | None,
) -> Call[EncodeResult]:
    """``POST /v1/jobs/{id}/encode`` (``kind`` "jobs") or ``POST /v1/saes/{id}/encode`` (``kind`` "saes"): exactly
    one of ``text`` and ``activations``; None fields are left to the server's defaults. Repeatable (it changes
    nothing on the server)."""
    body = _clean({"text": text, "activations": activations, "top_k": top_k, "which": which})
    return Call("POST", f"{V}/{kind}/{ident}/encode", EncodeResult.model_validate, json=body)


def job_body(
    body: Mapping[str, Any] | None,
    fields: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``POST /v1/jobs`` body from a mapping and/or keyword fields (keywords win; None values dropped)."""
    out = dict(body or {})
    out.update({k: v for k, v in fields.items() if v is not None})
    return _jsonable(out)


def parse_sse_data(data: str) -> dict[str, Any]:
    """One server-sent event's data: the event object (``id``, ``type``, ``created_at``, ``data``)."""
    return json.loads(data)
