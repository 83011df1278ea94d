"""A small synchronous HTTP client for the API (used by ``rsae-service demo`` and the end-to-end tests)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from rsae.sae import CFG_NAME, WEIGHTS_NAME

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
        super().__init__(f"{response.request.method} {response.request.url.path} -> {self.status} "
                         f"{self.problem.get('code', '')}: {self.problem.get('detail')}{field}")


def _ok(response: httpx.Response) -> Any:
    if response.is_error:
        raise ApiError(response)
    return response.json()


def upload_sae(client: httpx.Client, folder: Path, name: str | None = None) -> dict[str, Any]:
    """POST /saes with ``folder``'s cfg.json and sae_weights.safetensors; returns the SAE object."""
    with open(folder / CFG_NAME, "rb") as cfg, open(folder / WEIGHTS_NAME, "rb") as weights:
        files = {"cfg": (CFG_NAME, cfg, "application/json"),
                 "weights": (WEIGHTS_NAME, weights, "application/octet-stream")}
        return _ok(client.post("/saes", files=files, data={"name": name} if name else None))


def submit_job(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """POST /jobs; returns the job object (status ``queued``)."""
    return _ok(client.post("/jobs", json=body))


def get_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    """GET /jobs/{id}."""
    return _ok(client.get(f"/jobs/{job_id}"))


def wait_for_job(client: httpx.Client, job_id: str, *, timeout: float, interval: float = 1.0,
                 on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
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
            raise TimeoutError(f"job {job_id} still {job['status']} ({job['stage']}, "
                               f"{100 * job['progress']:.0f}%) after {timeout:.0f} s")
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
            raise ValueError(f"{art['name']}: got {size} bytes sha256 {digest.hexdigest()}, the listing says "
                             f"{art['size']} bytes sha256 {art['sha256']}")
        paths[art["name"]] = path
    return paths
