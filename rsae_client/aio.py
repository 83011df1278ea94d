"""The asynchronous twin of :class:`rsae_client.RSAEClient` (``httpx.AsyncClient``): same methods, awaited;
the ``iter_*`` methods and :meth:`AsyncRSAEClient.stream` are async iterators.

::

    async with AsyncRSAEClient("http://127.0.0.1:8000") as c:
        job = await c.create_job(model="smollm2-135m", layer=3, teacher={"sae_id": sae_id})
        async for event in c.stream(job.id):
            print(event.type, event.data)
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import httpx
from httpx_sse import SSEError, aconnect_sse

from . import _core
from ._core import NO_RETRY, ApiError, Call, RetryPolicy, new_idempotency_key
from .client import TERMINAL, _check_file, _http_client
from .models import API_PREFIX, Artifact, Checkpoint, Dataset, EncodeResult, Event, Job, JobEstimate, Page, Sae

T = TypeVar("T")


async def send(http: httpx.AsyncClient, call: Call[T], retry: RetryPolicy = NO_RETRY) -> T:
    """Send ``call`` with ``http``, retrying by ``retry`` (see :func:`rsae_client.client.send`).

    Raises:
        ApiError: a non-2xx answer that is not (or no longer) retried.
        httpx.TransportError: the connection failed and the request is not (or no longer) retried.
    """
    retry_no = 0
    while True:
        with ExitStack() as stack:
            try:
                response = await http.request(call.method, call.path, **call.request_kwargs(stack))
            except httpx.TransportError as e:
                delay = retry.after_error(e, retry_no, call.repeatable)
                if delay is None:
                    raise
            else:
                delay = retry.after_response(response, retry_no)
                if delay is None:
                    return call.result(response)
        retry_no += 1
        await asyncio.sleep(delay)


async def iterate(fetch: Callable[[str | None], Awaitable[Page[T]]]) -> AsyncIterator[T]:
    """Every item of a paginated list: ``await fetch(after)`` returns one page; follows ``next_cursor``."""
    after: str | None = None
    while True:
        page = await fetch(after)
        for item in page.data:
            yield item
        if not page.has_more or not page.next_cursor:
            return
        after = page.next_cursor


class AsyncRSAEClient:
    """The service's API for asyncio code; arguments and behaviour as :class:`rsae_client.RSAEClient`
    (``http`` is an ``httpx.AsyncClient``)."""

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 120.0,
        retry: RetryPolicy | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.http: httpx.AsyncClient = http or _http_client(base_url, token, timeout, httpx.AsyncClient)
        self.retry = retry or RetryPolicy()
        self._own = http is None

    async def __aenter__(self) -> "AsyncRSAEClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool (only if this object created it)."""
        if self._own:
            await self.http.aclose()

    async def _send(self, call: Call[T]) -> T:
        return await send(self.http, call, self.retry)

    # -- SAEs
    async def upload_sae(self, folder: str | Path, name: str | None = None, *, format: str | None = None) -> Sae:
        """Upload a teacher SAE folder in any supported format (see :meth:`rsae_client.RSAEClient.upload_sae`)."""
        return await self._send(_core.upload_sae(folder, name, format))

    async def list_saes(self, *, limit: int | None = None, after: str | None = None) -> Page[Sae]:
        """One page of your uploaded SAEs, newest first."""
        return await self._send(_core.list_saes(limit, after))

    def iter_saes(self, *, limit: int | None = None) -> AsyncIterator[Sae]:
        """All your uploaded SAEs, newest first."""
        return iterate(lambda after: self.list_saes(limit=limit, after=after))

    async def get_sae(self, sae_id: str) -> Sae:
        """One uploaded SAE."""
        return await self._send(_core.get_sae(sae_id))

    async def delete_sae(self, sae_id: str) -> None:
        """Delete an uploaded SAE."""
        await self._send(_core.delete_sae(sae_id))

    # -- datasets
    async def upload_dataset(
        self,
        path: str | Path,
        name: str | None = None,
        *,
        format: str | None = None,
        text_column: str | None = None,
    ) -> Dataset:
        """Upload a text corpus file (see :meth:`rsae_client.RSAEClient.upload_dataset`)."""
        return await self._send(_core.upload_dataset(path, name, format, text_column))

    async def list_datasets(self, *, limit: int | None = None, after: str | None = None) -> Page[Dataset]:
        """One page of your uploaded corpora, newest first."""
        return await self._send(_core.list_datasets(limit, after))

    def iter_datasets(self, *, limit: int | None = None) -> AsyncIterator[Dataset]:
        """All your uploaded corpora, newest first."""
        return iterate(lambda after: self.list_datasets(limit=limit, after=after))

    async def get_dataset(self, dataset_id: str) -> Dataset:
        """One uploaded corpus."""
        return await self._send(_core.get_dataset(dataset_id))

    async def delete_dataset(self, dataset_id: str) -> None:
        """Delete an uploaded corpus."""
        await self._send(_core.delete_dataset(dataset_id))

    # -- jobs
    async def create_job(
        self, body: Mapping[str, Any] | None = None, *, idempotency_key: str | None = None, **fields: Any
    ) -> Job:
        """Create a job (see :meth:`rsae_client.RSAEClient.create_job`; an Idempotency-Key is generated)."""
        return await self._send(
            _core.create_job(_core.job_body(body, fields), idempotency_key or new_idempotency_key())
        )

    submit = create_job

    async def estimate(self, body: Mapping[str, Any] | None = None, **fields: Any) -> JobEstimate:
        """What the job would cost and whether it may be submitted now (see
        :meth:`rsae_client.RSAEClient.estimate`; nothing is created).

        Raises:
            ApiError: 422 for a malformed body (naming the field).
        """
        return await self._send(_core.estimate_job(_core.job_body(body, fields)))

    async def list_jobs(
        self,
        *,
        status: str | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> Page[Job]:
        """One page of your jobs, newest first, filtered by ``status`` and ``metadata`` values."""
        return await self._send(_core.list_jobs(status, metadata, limit, after))

    def iter_jobs(
        self, *, status: str | None = None, metadata: Mapping[str, str] | None = None, limit: int | None = None
    ) -> AsyncIterator[Job]:
        """All your jobs matching the filters, newest first."""
        return iterate(lambda after: self.list_jobs(status=status, metadata=metadata, limit=limit, after=after))

    async def get_job(self, job_id: str) -> Job:
        """The job."""
        return await self._send(_core.get_job(job_id))

    get = get_job

    async def cancel_job(self, job_id: str) -> Job:
        """Request cancellation (idempotent)."""
        return await self._send(_core.cancel_job(job_id))

    cancel = cancel_job

    async def delete_job(self, job_id: str) -> Job | None:
        """Delete a job with its files (None when gone at once)."""
        return await self._send(_core.delete_job(job_id))

    async def list_job_events(self, job_id: str, *, after: int | None = None, limit: int | None = None) -> Page[Event]:
        """One page of the job's events, after event id ``after``."""
        return await self._send(_core.list_job_events(job_id, after, limit))

    def iter_events(self, job_id: str, *, after: int | None = None, limit: int | None = None) -> AsyncIterator[Event]:
        """The job's events so far (every page)."""
        return iterate(lambda cursor: self.list_job_events(job_id, after=cursor or after, limit=limit))

    async def list_artifacts(self, job_id: str) -> list[Artifact]:
        """The job's files."""
        return (await self._send(_core.list_artifacts(job_id))).data

    async def list_checkpoints(self, job_id: str) -> list[Checkpoint]:
        """The checkpoints the worker saved for the job, with the metrics at each."""
        return (await self._send(_core.list_checkpoints(job_id))).data

    async def encode(
        self,
        job_id: str,
        text: str | list[str] | None = None,
        *,
        activations: list[list[float]] | None = None,
        top_k: int | None = None,
        which: str | None = None,
    ) -> EncodeResult:
        """Top-k latents per token of a succeeded job's SAEs (see :meth:`rsae_client.RSAEClient.encode`)."""
        return await self._send(_core.encode("jobs", job_id, text, activations, top_k, which))

    async def encode_sae(
        self,
        sae_id: str,
        text: str | list[str] | None = None,
        *,
        activations: list[list[float]] | None = None,
        top_k: int | None = None,
    ) -> EncodeResult:
        """Top-k latents per token of an uploaded teacher SAE alone (see :meth:`rsae_client.RSAEClient.encode_sae`)."""
        return await self._send(_core.encode("saes", sae_id, text, activations, top_k, None))

    async def stream(self, job_id: str, after: int = 0, timeout: float | None = None) -> AsyncIterator[Event]:
        """Live events of the job until it is terminal; reconnects with ``Last-Event-ID``.

        Raises:
            ApiError: the job does not exist or is not yours (404).
            TimeoutError: still open after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                headers = {"Last-Event-ID": str(after)} if after else {}
                async with aconnect_sse(
                    self.http,
                    "GET",
                    f"{API_PREFIX}/jobs/{job_id}/events",
                    headers=headers,
                    timeout=httpx.Timeout(30.0, read=60.0),
                ) as source:
                    if source.response.is_error:
                        await source.response.aread()
                        raise ApiError(source.response)
                    async for sse in source.aiter_sse():
                        if not sse.data:
                            continue
                        event = Event.model_validate(_core.parse_sse_data(sse.data))
                        after = event.id
                        yield event
                        if deadline is not None and time.monotonic() > deadline:
                            raise TimeoutError(f"job {job_id}: event stream still open after {timeout:.0f} s")
                    return
            except (httpx.TransportError, SSEError):
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id}: event stream lost") from None
                await asyncio.sleep(1.0)

    async def wait(
        self, job_id: str, *, timeout: float | None = None, on_event: Callable[[Event], None] | None = None
    ) -> Job:
        """Follow the job's event stream until it is terminal; returns the final job (polls if the stream ends
        early).

        Raises:
            TimeoutError: not terminal after ``timeout`` seconds.
        """
        start = time.monotonic()
        async for event in self.stream(job_id, timeout=timeout):
            if on_event is not None:
                on_event(event)
        job = await self.get_job(job_id)
        while job.status not in TERMINAL:
            if timeout is not None and time.monotonic() - start > timeout:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout:.0f} s")
            await asyncio.sleep(1.0)
            job = await self.get_job(job_id)
        return job

    async def download(self, job_id: str, dest: str | Path) -> dict[str, Path]:
        """Download every artifact of the job into ``dest`` (sha256-checked); returns name -> path.

        Raises:
            ValueError: a file does not match its listed size or sha256.
        """
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        for art in await self.list_artifacts(job_id):
            path = dest / Path(art.name).name
            digest, size = hashlib.sha256(), 0
            async with self.http.stream("GET", art.url) as r:
                if r.is_error:
                    await r.aread()
                    raise ApiError(r)
                with open(path, "wb") as f:
                    async for chunk in r.aiter_bytes(1 << 20):
                        digest.update(chunk)
                        size += len(chunk)
                        f.write(chunk)
            _check_file(art, size, digest.hexdigest())
            paths[art.name] = path
        return paths
