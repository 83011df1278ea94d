"""Issue 11, leaks and contract gaps: strict JSON bodies, bounded problems, no server path / host / port / pid in
job errors, events or problems, and the API server's connection limits under a real uvicorn (real Postgres and
Redis; nothing mocked but an injected worker failure).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.app import create_app
from service.config import Settings, get_settings
from service.embedded import Child, free_port, wait_until
from service.models import Job, JobEvent
from service.redact import redact
from support.servers import assert_problem, bearer, job_body

HOST = socket.gethostname()


def _raw(client: TestClient, body: bytes) -> Any:
    return client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})


def _body(sae_id: str, replace: tuple[str, str] = ("", ""), **settings: Any) -> bytes:
    text = json.dumps(job_body(sae_id, **settings))
    return text.replace(*replace).encode() if replace[0] else text.encode()


# -- strict JSON bodies ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "make", "field", "code"),
    [
        ("5000-digit integer", lambda s: _body(s, ('"layer": 3', '"layer": ' + "9" * 5000)), "layer", "int_too_long"),
        (
            "5000-digit integer, nested",
            lambda s: _body(s, ('"steps": 1', '"steps": -' + "1" * 5000), finetune={"steps": 1}),
            "settings.finetune.steps",
            "int_too_long",
        ),
        ("invalid UTF-8", lambda s: _body(s, ("", "")).replace(b"smollm2", b"smoll\xff\xfe"), "body", "invalid_utf8"),
        ("UTF-16 body", lambda s: _body(s).decode().encode("utf-16"), "body", "invalid_utf8"),
        ("duplicate key", lambda s: _body(s, ('"layer": 3', '"layer": 3, "layer": 4')), "layer", "duplicate_key"),
        (
            "duplicate nested key",
            lambda s: _body(s, ('"steps": 5', '"steps": 5, "steps": 6'), finetune={"steps": 5}),
            "settings.finetune.steps",
            "duplicate_key",
        ),
        (
            "lone surrogate",
            lambda s: _body(s, ('"smollm2-135m"', '"smollm2\\ud800"')),
            "model",
            "invalid_unicode",
        ),
    ],
)
def test_malformed_json_is_422_naming_the_field(
    case: str, make: Callable[[str], bytes], field: str, code: str, client: TestClient, sae_id: str, db: Session
) -> None:
    """Each was a 400 without a field (integer, UTF-8) or accepted (duplicate key: the last one won)."""
    body = assert_problem(_raw(client, make(sae_id)), 422, field=field)
    assert body["errors"][0]["code"] == code, body
    assert db.scalar(select(Job.id)) is None
    assert client.get("/healthz").status_code == 200


def test_problem_bodies_are_bounded(client: TestClient, sae_id: str) -> None:
    """A 1 MB body of 60,000 unknown keys gave a 9.7 MB problem; now at most 20 errors, cut details."""
    many = json.dumps({**job_body(sae_id), **{f"k{i}": i for i in range(60_000)}}).encode()
    assert len(many) < 1024**2
    r = _raw(client, many)
    body = assert_problem(r, 422, field="k0")
    assert len(r.content) < 8 * 1024, len(r.content)
    assert len(body["errors"]) == 20 and body["errors_omitted"] == 60_000 - 20
    long_key = json.dumps({**job_body(sae_id), "x" * 500_000: 1}).encode()
    r = _raw(client, long_key)
    assert_problem(r, 422)
    assert len(r.content) < 4 * 1024, len(r.content)


# -- no server facts in errors, events and problems --------------------------------------------------------
def test_redact_removes_paths_hosts_ports_and_pids() -> None:
    text = (
        f"Error 111 connecting to 127.0.0.1:6399. at redis:6379, [::1]:8000; owner {HOST}:{os.getpid()}:ab12cd34; "
        "file /srv/rsae/uploads/ab/cfg.json, '/tmp/tmpx1/upload', ~/data.txt, redis://u:p@broker:6379/0, pid 4242"
    )
    out = redact(text)
    for leak in ("127.0.0.1", "6399", "6379", "8000", HOST, str(os.getpid()), "/srv", "/tmp", "~/", "u:p", "4242"):
        assert leak not in out, (leak, out)
    kept = "settings.finetune.lr: must be > 0; hub id org/name; 12:34:56 UTC; layer 3/30"
    assert redact(kept) == kept
    assert len(redact("x" * 10_000)) <= 2000


def test_broker_down_503_and_job_error_name_no_host(
    settings: Settings, api_token: str, monkeypatch: pytest.MonkeyPatch, make_teacher: Callable[..., Path]
) -> None:
    port = free_port()  # nothing listens there
    monkeypatch.setenv("RSAE_BROKER_URL", f"redis://127.0.0.1:{port}/0")
    monkeypatch.setenv("RSAE_ENQUEUE_RETRIES", "0")
    get_settings.cache_clear()
    from service.client import upload_sae

    with TestClient(create_app(), headers=bearer(api_token)) as c:
        sae_id = upload_sae(c, make_teacher())["id"]
        r = c.post("/v1/jobs", json=job_body(sae_id))
        body = assert_problem(r, 503, code="enqueue_failed")
        job = c.get(f"/v1/jobs/{body['job_id']}").json()
        events = c.get(f"/v1/jobs/{body['job_id']}/events").text
        ready = c.get("/readyz")
    assert job["status"] == "failed" and job["error"]["code"] == "enqueue_failed"
    for text in (r.text, json.dumps(job), events, ready.text):
        assert str(port) not in text and "127.0.0.1" not in text and HOST not in text, text
    assert ready.status_code == 503
    get_settings.cache_clear()


def test_failed_job_error_and_events_name_no_path_host_or_pid(
    client: TestClient, sae_id: str, settings: Settings, db: Session, monkeypatch: pytest.MonkeyPatch, broker: Any
) -> None:
    """A worker failure whose exception names a folder, a broker address and a pid (injected: the pipeline
    raises it), and a core error naming the teacher's folder (the uploaded folder removed): the job's error
    and every event carry none of them; the worker is named worker-<hash>, not host:pid."""
    import shutil

    import worker.tasks

    job_ids = [client.post("/v1/jobs", json=job_body(sae_id)).json()["id"] for _ in range(2)]

    def boom(cfg: Any, out_dir: Any, **_: Any) -> None:
        raise OSError(f"cannot write {out_dir}/x: broker 10.1.2.3:6379 said no (pid {os.getpid()}) on {HOST}")

    monkeypatch.setattr(worker.tasks, "run_upgrade", boom)
    assert worker.tasks.run_job(job_ids[0], settings) == "failed"
    monkeypatch.undo()
    shutil.rmtree(settings.uploads_dir)  # the teacher's folder is gone: the core names the path it missed
    assert worker.tasks.run_job(job_ids[1], settings) == "failed"
    leaks = [str(settings.data_dir), "/tmp", "10.1.2.3", "6379", HOST, str(os.getpid())]
    for job_id in job_ids:
        job = client.get(f"/v1/jobs/{job_id}").json()
        events = client.get(f"/v1/jobs/{job_id}/events").text
        stored = [e.data for e in db.scalars(select(JobEvent).where(JobEvent.job_id == job_id))]
        for text in (json.dumps(job["error"]), events, json.dumps(stored)):
            for leak in leaks:
                assert leak not in text, (leak, text)
        assert "worker-" in events
    assert client.get(f"/v1/jobs/{job_ids[0]}").json()["error"]["code"] == "internal_error"


# -- the API server's connection limits (real uvicorn) -----------------------------------------------------
@pytest.fixture
def api_server(settings: Settings, tmp_path: Path, broker: redis.Redis) -> Any:
    """``rsae-service serve`` (uvicorn) on a free port with a 1 s head timeout and 16 KiB head cap."""
    port = free_port()
    env = {
        **os.environ,
        "RSAE_DATABASE_URL": settings.database_url,
        "RSAE_BROKER_URL": settings.broker_url or "",
        "RSAE_DATA_DIR": str(settings.data_dir),
        "RSAE_HEADER_TIMEOUT_SECONDS": "1",
        "RSAE_MAX_HEADER_BYTES": "16384",
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    argv = [sys.executable, "-m", "service.cli", "serve", "--no-migrate", "--port", str(port)]
    child = Child("api", argv, env, tmp_path)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, 60, "uvicorn", alive=child.check)
        yield port
    finally:
        child.stop()


def _exchange(port: int, data: bytes, *, wait: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it or ``wait`` passes."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def test_huge_and_slow_headers_are_refused_and_the_server_keeps_serving(api_server: int) -> None:
    port = api_server
    huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (4 * 1024**2) + b"\r\n\r\n"
    answer = _exchange(port, huge)
    assert answer.split(b"\r\n", 1)[0] in (b"HTTP/1.1 400 Bad Request", b"HTTP/1.1 431 Request Header Fields Too Large")
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # slowloris: a byte now and then
        start = time.monotonic()
        closed = False
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 50:
            try:
                s.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            s.settimeout(0.2)
            try:
                if s.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
        elapsed = time.monotonic() - start
    assert closed and elapsed < 5, elapsed
    start = time.monotonic()
    assert _exchange(port, b"", wait=4) == b""  # an idle fresh connection is closed too, after 1 s
    assert time.monotonic() - start < 3
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
