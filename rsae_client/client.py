"""The synchronous client (``httpx.Client``): :class:`RSAEClient` and helpers over any ``httpx.Client``.

::

    from rsae_client import RSAEClient

    with RSAEClient("http://127.0.0.1:8000", token=os.environ["RSAE_TOKEN"]) as c:
        sae = c.upload_sae("teacher/")                # any of the four formats, detected from the files
        job = c.create_job(model="smollm2-135m", layer=3, teacher={"sae_id": sae.id}, metadata={"run": "a"})
        job = c.wait(job.id, on_event=print)          # follows the event stream to the end
        paths = c.download(job.id, "out/")            # sha256-checked files
        for j in c.iter_jobs(metadata={"run": "a"}):  # every page
            print(j.id, j.status)
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import httpx
from httpx_sse import SSEError, connect_sse

from . import _core
from ._core import NO_RETRY, ApiError, Call, RetryPolicy, new_idempotency_key
from .models import (
    API_PREFIX,
    TERMINAL_STATUSES,
    Artifact,
    ArtifactList,
    Checkpoint,
    Dataset,
    EncodeResult,
    Event,
    Job,
    JobEstimate,
    Page,
    Sae,
)

T = TypeVar("T")
TERMINAL = TERMINAL_STATUSES

DEFAULT_URL = "http://127.0.0.1:8000"


def send(
    http: httpx.Client, call: Call[T], retry: RetryPolicy = NO_RETRY, sleep: Callable[[float], None] = time.sleep
) -> T:
    """Send ``call`` with ``http``, retrying by ``retry``; returns the parsed answer.

    Raises:
        ApiError: a non-2xx answer that is not (or no longer) retried.
        httpx.TransportError: the connection failed and the request is not (or no longer) retried.
    """
    retry_no = 0
    while True:
        with ExitStack() as stack:
            try:
                response = http.request(call.method, call.path, **call.request_kwargs(stack))
            except httpx.TransportError as e:
                delay = retry.after_error(e, retry_no, call.repeatable)
                if delay is None:
                    raise
            else:
                delay = retry.after_response(response, retry_no)
                if delay is None:
                    return call.result(response)
        retry_no += 1
        sleep(delay)


def iterate(fetch: Callable[[str | None], Page[T]]) -> Iterator[T]:
    """Every item of a paginated list: ``fetch(after)`` returns one page; follows ``next_cursor``."""
    after: str | None = None
    while True:
        page = fetch(after)
        yield from page.data
        if not page.has_more or not page.next_cursor:
            return
        after = page.next_cursor


# -- helpers over any httpx.Client (FastAPI's TestClient too); one attempt unless ``retry`` --------------------
def upload_sae(
    http: httpx.Client,
    folder: str | Path,
    name: str | None = None,
    *,
    format: str | None = None,
    retry: RetryPolicy = NO_RETRY,
) -> Sae:
    """``POST /v1/saes`` with the teacher in ``folder`` (format detected from its files); returns the SAE."""
    return send(http, _core.upload_sae(folder, name, format), retry)


def submit_job(
    http: httpx.Client, body: Mapping[str, Any], idempotency_key: str | None = None, *, retry: RetryPolicy = NO_RETRY
) -> Job:
    """``POST /v1/jobs``; returns the job (status ``queued``; the earlier job on an Idempotency-Key replay)."""
    return send(http, _core.create_job(body, idempotency_key), retry)


def get_job(http: httpx.Client, job_id: str, *, retry: RetryPolicy = NO_RETRY) -> Job:
    """``GET /v1/jobs/{id}``."""
    return send(http, _core.get_job(job_id), retry)


def wait_for_job(
    http: httpx.Client,
    job_id: str,
    *,
    timeout: float,
    interval: float = 1.0,
    on_update: Callable[[Job], None] | None = None,
    retry: RetryPolicy = NO_RETRY,
) -> Job:
    """Poll ``GET /v1/jobs/{id}`` until the job is terminal; ``on_update`` sees every polled job.

    Raises:
        TimeoutError: still not terminal after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        job = get_job(http, job_id, retry=retry)
        if on_update is not None:
            on_update(job)
        if job.status in TERMINAL:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"job {job_id} still {job.status} ({job.stage}, {100 * job.progress:.0f}%) after {timeout:.0f} s"
            )
        time.sleep(interval)


def _check_file(art: Artifact, size: int, digest: str) -> None:
    if size != art.size or digest != art.sha256:
        raise ValueError(
            f"{art.name}: got {size} bytes sha256 {digest}, the listing says {art.size} bytes sha256 {art.sha256}"
        )


def download_artifacts(
    http: httpx.Client, job: Job | Mapping[str, Any] | str, dest: str | Path, *, retry: RetryPolicy = NO_RETRY
) -> dict[str, Path]:
    """Download every artifact of ``job`` (a job or its id) into ``dest``, checking size and sha256 against
    the listing; returns name -> path.

    Raises:
        ValueError: a downloaded file does not match its listed size or sha256.
        ApiError: the job is unknown (404) or its artifacts expired (410).
    """
    job_id = job if isinstance(job, str) else job["id"]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    listing: ArtifactList = send(http, _core.list_artifacts(job_id), retry)
    for art in listing.data:
        path = dest / Path(art.name).name
        digest, size = hashlib.sha256(), 0
        with http.stream("GET", art.url) as r, open(path, "wb") as f:
            if r.is_error:
                r.read()
                raise ApiError(r)
            for chunk in r.iter_bytes(1 << 20):
                digest.update(chunk)
                size += len(chunk)
                f.write(chunk)
        _check_file(art, size, digest.hexdigest())
        paths[art.name] = path
    return paths


def stream_events(http: httpx.Client, job_id: str, *, after: int = 0, timeout: float | None = None) -> Iterator[Event]:
    """Follow ``GET /v1/jobs/{id}/events`` as server-sent events; yields events until the job is terminal.

    On a dropped connection it reconnects with ``Last-Event-ID`` (no event is lost or repeated).

    Raises:
        ApiError: the job does not exist or is not yours (404), or the token is refused (401).
        TimeoutError: the stream is still open after ``timeout`` seconds.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            headers = {"Last-Event-ID": str(after)} if after else {}
            with connect_sse(
                http,
                "GET",
                f"{API_PREFIX}/jobs/{job_id}/events",
                headers=headers,
                timeout=httpx.Timeout(30.0, read=60.0),
            ) as source:
                if source.response.is_error:
                    source.response.read()
                    raise ApiError(source.response)
                for sse in source.iter_sse():
                    if not sse.data:
                        continue
                    event = Event.model_validate(_core.parse_sse_data(sse.data))
                    after = event.id
                    yield event
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"job {job_id}: event stream still open after {timeout:.0f} s")
                return  # the server closed the stream: the job is terminal
        except (httpx.TransportError, SSEError):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id}: event stream lost") from None
            time.sleep(1.0)


def _http_client(base_url: str | None, token: str | None, timeout: float, cls: type) -> Any:
    token = token if token is not None else os.environ.get("RSAE_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return cls(base_url=base_url or os.environ.get("RSAE_URL", DEFAULT_URL), timeout=timeout, headers=headers)


class RSAEClient:
    """The service's API for Python code and notebooks (synchronous; :class:`rsae_client.AsyncRSAEClient` is
    the async twin with the same methods).

    Args:
        base_url: API root, without ``/v1`` (default ``$RSAE_URL`` or ``http://127.0.0.1:8000``).
        token: bearer token (default ``$RSAE_TOKEN``; create one with ``rsae-service token create``).
        timeout: per-request timeout in seconds (uploads and downloads stream).
        retry: when to re-send (default :class:`RetryPolicy`: 5 tries on 429, 503 and connection errors,
            honouring ``Retry-After``); ``RetryPolicy(attempts=1)`` never retries.
        http: an existing ``httpx.Client`` (e.g. FastAPI's TestClient) to use instead of a new one.

    Every method raises :class:`ApiError` (status + problem+json body) on a non-2xx answer, and
    ``httpx.TransportError`` when the service stays unreachable.
    """

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 120.0,
        retry: RetryPolicy | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        self.http: httpx.Client = http or _http_client(base_url, token, timeout, httpx.Client)
        self.retry = retry or RetryPolicy()
        self._own = http is None

    def __enter__(self) -> "RSAEClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool (only if this object created it)."""
        if self._own:
            self.http.close()

    def _send(self, call: Call[T]) -> T:
        return send(self.http, call, self.retry)

    # -- SAEs
    def upload_sae(self, folder: str | Path, name: str | None = None, *, format: str | None = None) -> Sae:
        """Upload a teacher SAE folder in any supported format (SAELens, sparsify, Gemma Scope,
        dictionary_learning; detected from its files, or ``format``); returns the SAE (id, family, d_in, d_sae).

        Raises:
            ValueError: no supported teacher files in ``folder``.
        """
        return self._send(_core.upload_sae(folder, name, format))

    def list_saes(self, *, limit: int | None = None, after: str | None = None) -> Page[Sae]:
        """One page of your uploaded SAEs, newest first."""
        return self._send(_core.list_saes(limit, after))

    def iter_saes(self, *, limit: int | None = None) -> Iterator[Sae]:
        """All your uploaded SAEs, newest first (fetching ``limit`` per page)."""
        return iterate(lambda after: self.list_saes(limit=limit, after=after))

    def get_sae(self, sae_id: str) -> Sae:
        """One uploaded SAE."""
        return self._send(_core.get_sae(sae_id))

    def delete_sae(self, sae_id: str) -> None:
        """Delete an uploaded SAE (409 ``sae_in_use`` while an unfinished job uses it)."""
        self._send(_core.delete_sae(sae_id))

    # -- datasets
    def upload_dataset(
        self,
        path: str | Path,
        name: str | None = None,
        *,
        format: str | None = None,
        text_column: str | None = None,
    ) -> Dataset:
        """Upload a text corpus file (``txt``: documents separated by blank lines; ``jsonl`` / ``parquet``: one
        document per row, text in ``text_column`` or token ids in ``input_ids`` / ``tokens``); ``format`` from
        the file's suffix unless given. Use it in a job as ``settings.data.dataset = dataset.use_as``.

        Raises:
            ValueError: no known format. FileNotFoundError: no such file. ApiError: 413 past the upload size or
            the storage quota, 422 for a corpus the server cannot read (naming the field).
        """
        return self._send(_core.upload_dataset(path, name, format, text_column))

    def list_datasets(self, *, limit: int | None = None, after: str | None = None) -> Page[Dataset]:
        """One page of your uploaded corpora, newest first."""
        return self._send(_core.list_datasets(limit, after))

    def iter_datasets(self, *, limit: int | None = None) -> Iterator[Dataset]:
        """All your uploaded corpora, newest first (fetching ``limit`` per page)."""
        return iterate(lambda after: self.list_datasets(limit=limit, after=after))

    def get_dataset(self, dataset_id: str) -> Dataset:
        """One uploaded corpus (another user's id is a 404 ApiError)."""
        return self._send(_core.get_dataset(dataset_id))

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete an uploaded corpus and its file (409 ``dataset_in_use`` while an unfinished job reads it)."""
        self._send(_core.delete_dataset(dataset_id))

    # -- jobs
    def create_job(
        self,
        body: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> Job:
        """Create a job from ``body`` and/or keyword fields (``model``, ``layer``, ``teacher`` -- a dict,
        :class:`~rsae_client.models.TeacherRef` or ``{"hub": HubRef(...)}`` --, ``settings``, ``metadata``,
        ``webhook``). An ``Idempotency-Key`` is generated when none is given, so a retried submission never
        creates a second job."""
        return self._send(_core.create_job(_core.job_body(body, fields), idempotency_key or new_idempotency_key()))

    submit = create_job

    def estimate(self, body: Mapping[str, Any] | None = None, **fields: Any) -> JobEstimate:
        """What the job in ``body`` and/or keyword fields (as :meth:`create_job` takes them) would cost on the
        server's workers (tokens, disk, memory, seconds per stage with their basis) and whether ``create_job``
        would accept it now (``allowed_to_proceed``, ``limits_exceeded``). Nothing is created.

        Raises:
            ApiError: 422 for a body ``create_job`` would refuse as malformed (same problem, naming the field).
        """
        return self._send(_core.estimate_job(_core.job_body(body, fields)))

    def list_jobs(
        self,
        *,
        status: str | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> Page[Job]:
        """One page of your jobs, newest first, filtered by ``status`` and ``metadata`` values (all must match)."""
        return self._send(_core.list_jobs(status, metadata, limit, after))

    def iter_jobs(
        self, *, status: str | None = None, metadata: Mapping[str, str] | None = None, limit: int | None = None
    ) -> Iterator[Job]:
        """All your jobs matching the filters, newest first (fetching ``limit`` per page)."""
        return iterate(lambda after: self.list_jobs(status=status, metadata=metadata, limit=limit, after=after))

    def list(self, status: str | None = None, limit: int | None = None) -> list[Job]:
        """Your jobs, newest first (all pages)."""
        return list(self.iter_jobs(status=status, limit=limit))

    def get_job(self, job_id: str) -> Job:
        """The job: status, stage, progress, metrics, error, artifacts, metadata."""
        return self._send(_core.get_job(job_id))

    get = get_job

    def cancel_job(self, job_id: str) -> Job:
        """Request cancellation (idempotent); returns the job (``cancelled`` or ``cancelling``)."""
        return self._send(_core.cancel_job(job_id))

    cancel = cancel_job

    def delete_job(self, job_id: str) -> Job | None:
        """Delete a job with its files: None when gone at once, else the job (``cancelling``, removed once stopped)."""
        return self._send(_core.delete_job(job_id))

    def list_job_events(self, job_id: str, *, after: int | None = None, limit: int | None = None) -> Page[Event]:
        """One page of the job's events, after event id ``after``."""
        return self._send(_core.list_job_events(job_id, after, limit))

    def iter_events(self, job_id: str, *, after: int | None = None, limit: int | None = None) -> Iterator[Event]:
        """The job's events so far (every page), after event id ``after``."""
        return iterate(lambda cursor: self.list_job_events(job_id, after=cursor or after, limit=limit))

    def events(self, job_id: str, after: int | None = None) -> list[Event]:
        """The job's events so far (one page), after event id ``after``."""
        return self.list_job_events(job_id, after=after).data

    def list_artifacts(self, job_id: str) -> list[Artifact]:
        """The job's files: name, kind, content type, size, sha256, download url."""
        return self._send(_core.list_artifacts(job_id)).data

    def list_checkpoints(self, job_id: str) -> list[Checkpoint]:
        """The checkpoints the worker saved for the job, oldest first, with the metrics at each."""
        return self._send(_core.list_checkpoints(job_id)).data

    def encode(
        self,
        job_id: str,
        text: str | list[str] | None = None,
        *,
        activations: list[list[float]] | None = None,
        top_k: int | None = None,
        which: str | None = None,
    ) -> EncodeResult:
        """Top-k latents per token of a succeeded job's SAEs (``which``: "teacher", "rsae" or "both", the
        default) for ``text`` (run through the host model with the job's conventions) or raw ``activations``
        [rows of d_in numbers]. 503 ``encode_unavailable`` (no encode worker) is retried as any 503."""
        return self._send(_core.encode("jobs", job_id, text, activations, top_k, which))

    def encode_sae(
        self,
        sae_id: str,
        text: str | list[str] | None = None,
        *,
        activations: list[list[float]] | None = None,
        top_k: int | None = None,
    ) -> EncodeResult:
        """:meth:`encode` with an uploaded teacher SAE alone (its cfg's model, hook and conventions)."""
        return self._send(_core.encode("saes", sae_id, text, activations, top_k, None))

    def stream(self, job_id: str, after: int = 0, timeout: float | None = None) -> Iterator[Event]:
        """Live events of the job until it is terminal (see :func:`stream_events`)."""
        return stream_events(self.http, job_id, after=after, timeout=timeout)

    def wait(
        self, job_id: str, *, timeout: float | None = None, on_event: Callable[[Event], None] | None = None
    ) -> Job:
        """Follow the job's event stream until it is terminal; returns the final job.

        Raises:
            TimeoutError: not terminal after ``timeout`` seconds.
        """
        for event in self.stream(job_id, timeout=timeout):
            if on_event is not None:
                on_event(event)
        job = self.get_job(job_id)
        if job.status not in TERMINAL:  # stream ended early (server restart): fall back to polling
            job = wait_for_job(self.http, job_id, timeout=timeout or 3 * 3600.0, retry=self.retry)
        return job

    def download(self, job_id: str, dest: str | Path) -> dict[str, Path]:
        """Download every artifact of the job into ``dest`` (sha256-checked); returns name -> path."""
        return download_artifacts(self.http, job_id, dest, retry=self.retry)
