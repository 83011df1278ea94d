"""Python client of the RSAE upgrade service (httpx), used by ``rsae jobs``, ``rsae-service demo`` and tests.

Two layers: functions over any ``httpx.Client`` (also FastAPI's ``TestClient``), and :class:`RSAEClient`,
which holds the base URL and token and adds live events (server-sent events via ``httpx-sse``)::

    from service.client import RSAEClient

    with RSAEClient("http://127.0.0.1:8000", token=os.environ["RSAE_TOKEN"]) as c:
        sae = c.upload_sae("teacher/")                       # cfg.json + sae_weights.safetensors
        job = c.submit({"model": "smollm2-135m", "layer": 3, "teacher": {"sae_id": sae["id"]}})
        job = c.wait(job["id"], on_event=print)              # follows the event stream to the end
        paths = c.download(job["id"], "out/")                # sha256-checked files
        sae = rsae.load(paths["cfg.json"].parent)
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import SSEError, connect_sse

from rsae.saes import CFG_NAME, WEIGHTS_NAME

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class ApiError(RuntimeError):
    """A non-2xx answer; ``problem`` is its problem+json body (or ``{"detail": text}``)."""

    def __init__(self, response: httpx.Response) -> None:
        try:
            self.problem: dict[str, Any] = response.json()
        except ValueError:
            self.problem = {"detail": response.text}
        self.status = response.status_code
        field = f" [field {self.problem['field']}]" if self.problem.get("field") else ""
        super().__init__(
            f"{response.request.method} {response.request.url.path} -> {self.status} "
            f"{self.problem.get('code', '')}: {self.problem.get('detail')}{field}"
        )


def _ok(response: httpx.Response) -> Any:
    if response.is_error:
        raise ApiError(response)
    return response.json()


def upload_sae(client: httpx.Client, folder: Path, name: str | None = None) -> dict[str, Any]:
    """POST /saes with ``folder``'s cfg.json and sae_weights.safetensors; returns the SAE object."""
    with open(folder / CFG_NAME, "rb") as cfg, open(folder / WEIGHTS_NAME, "rb") as weights:
        files = {
            "cfg": (CFG_NAME, cfg, "application/json"),
            "weights": (WEIGHTS_NAME, weights, "application/octet-stream"),
        }
        return _ok(client.post("/saes", files=files, data={"name": name} if name else None))


def submit_job(client: httpx.Client, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
    """POST /jobs; returns the job object (status ``queued``; the earlier job on an Idempotency-Key replay)."""
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    return _ok(client.post("/jobs", json=body, headers=headers))


def get_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    """GET /jobs/{id}."""
    return _ok(client.get(f"/jobs/{job_id}"))


def wait_for_job(
    client: httpx.Client,
    job_id: str,
    *,
    timeout: float,
    interval: float = 1.0,
    on_update: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Poll GET /jobs/{id} until the job is terminal; ``on_update`` sees every polled job.

    Raises:
        TimeoutError: still not terminal after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        job = get_job(client, job_id)
        if on_update is not None:
            on_update(job)
        if job["status"] in TERMINAL:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"job {job_id} still {job['status']} ({job['stage']}, "
                f"{100 * job['progress']:.0f}%) after {timeout:.0f} s"
            )
        time.sleep(interval)


def download_artifacts(client: httpx.Client, job: dict[str, Any], dest: Path) -> dict[str, Path]:
    """Download every artifact of ``job`` into ``dest``, checking size and sha256 against the listing.

    Raises:
        ValueError: a downloaded file does not match its listed size or sha256.
    """
    dest.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for art in _ok(client.get(f"/jobs/{job['id']}/artifacts")):
        path = dest / Path(art["name"]).name
        digest, size = hashlib.sha256(), 0
        with client.stream("GET", art["url"]) as r, open(path, "wb") as f:
            if r.is_error:
                r.read()
                raise ApiError(r)
            for chunk in r.iter_bytes(1 << 20):
                digest.update(chunk)
                size += len(chunk)
                f.write(chunk)
        if size != art["size"] or digest.hexdigest() != art["sha256"]:
            raise ValueError(
                f"{art['name']}: got {size} bytes sha256 {digest.hexdigest()}, the listing says "
                f"{art['size']} bytes sha256 {art['sha256']}"
            )
        paths[art["name"]] = path
    return paths


def stream_events(
    client: httpx.Client, job_id: str, *, after: int = 0, timeout: float | None = None
) -> Iterator[dict[str, Any]]:
    """Follow ``GET /jobs/{id}/events`` as server-sent events; yields event objects until the job is terminal.

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
                client, "GET", f"/jobs/{job_id}/events", headers=headers, timeout=httpx.Timeout(30.0, read=60.0)
            ) as source:
                if source.response.is_error:
                    source.response.read()
                    raise ApiError(source.response)
                for sse in source.iter_sse():
                    if not sse.data:
                        continue
                    event = json.loads(sse.data)
                    after = event["id"]
                    yield event
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"job {job_id}: event stream still open after {timeout:.0f} s")
                return  # the server closed the stream: the job is terminal
        except (httpx.TransportError, SSEError):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id}: event stream lost") from None
            time.sleep(1.0)


class RSAEClient:
    """The service's API for Python code and notebooks.

    Args:
        base_url: API root (default ``$RSAE_URL`` or ``http://127.0.0.1:8000``).
        token: bearer token (default ``$RSAE_TOKEN``; create one with ``rsae-service token create``).
        timeout: per-request timeout in seconds (uploads and downloads stream).
        http: an existing ``httpx.Client`` (e.g. FastAPI's TestClient) to use instead of a new one.

    Every method raises :class:`ApiError` (status + problem+json body) on a non-2xx answer.
    """

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 120.0,
        http: httpx.Client | None = None,
    ) -> None:
        token = token if token is not None else os.environ.get("RSAE_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = http or httpx.Client(
            base_url=base_url or os.environ.get("RSAE_URL", "http://127.0.0.1:8000"), timeout=timeout, headers=headers
        )
        self._own = http is None

    def __enter__(self) -> "RSAEClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool (only if this object created it)."""
        if self._own:
            self.http.close()

    def upload_sae(self, folder: str | Path, name: str | None = None) -> dict[str, Any]:
        """Upload a teacher SAE folder (SAELens layout); returns the SAE object (``id``, family, d_in, d_sae)."""
        return upload_sae(self.http, Path(folder), name)

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """Create a job (see ``POST /jobs``); returns the job object."""
        return submit_job(self.http, body, idempotency_key)

    def get(self, job_id: str) -> dict[str, Any]:
        """The job object: status, stage, progress, metrics, error, artifacts."""
        return get_job(self.http, job_id)

    def list(self, status: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Your jobs, newest first (all pages)."""
        params: dict[str, Any] = {k: v for k, v in (("status", status), ("limit", limit)) if v is not None}
        out: list[dict[str, Any]] = []
        while True:
            page = _ok(self.http.get("/jobs", params=params))
            out.extend(page["items"])
            if not page["next_cursor"]:
                return out
            params["after"] = page["next_cursor"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Request cancellation (idempotent); returns the job (``cancelled`` or ``cancelling``)."""
        return _ok(self.http.post(f"/jobs/{job_id}/cancel"))

    def events(self, job_id: str, after: int | None = None) -> list[dict[str, Any]]:
        """The job's events so far (one page), after event id ``after``."""
        return _ok(self.http.get(f"/jobs/{job_id}/events", params={"after": after} if after else None))

    def stream(self, job_id: str, after: int = 0, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Live events of the job until it is terminal (see :func:`stream_events`)."""
        return stream_events(self.http, job_id, after=after, timeout=timeout)

    def wait(
        self, job_id: str, *, timeout: float | None = None, on_event: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        """Follow the job's event stream until it is terminal; returns the final job object.

        Raises:
            TimeoutError: not terminal after ``timeout`` seconds.
        """
        for event in self.stream(job_id, timeout=timeout):
            if on_event is not None:
                on_event(event)
        job = self.get(job_id)
        if job["status"] not in TERMINAL:  # stream ended early (server restart): fall back to polling
            job = wait_for_job(self.http, job_id, timeout=timeout or 3 * 3600.0)
        return job

    def download(self, job_id: str, dest: str | Path) -> dict[str, Path]:
        """Download every artifact of the job into ``dest`` (sha256-checked); returns name -> path."""
        return download_artifacts(self.http, self.get(job_id), Path(dest))
