"""HTTP API tests against real Postgres (fresh database, Alembic schema) and real Redis (db 15).

The Celery worker is not running here: jobs stay queued, and the tests read the broker's queue in Redis
to check what was published. ``tests/test_e2e.py`` runs the real worker.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select, text, update
from sqlalchemy.orm import Session

from service.app import create_app
from service.client import upload_sae
from service.config import Settings, get_settings
from service.db import get_sessionmaker
from service.migrate import alembic_config, upgrade
from service.models import Artifact, Base, Job, JobEvent, utcnow
from support.servers import (
    API_REDIS_DB,
    REDIS_URL,
    assert_problem,
    bearer,
    job_body,
    make_token,
    post_sae,
    queued_messages,
)
from worker.tasks import JobReporter


# -- helpers ---------------------------------------------------------------------------------------
def fresh_app(monkeypatch: pytest.MonkeyPatch, **env: str) -> TestClient:
    """A TestClient for an app created after setting ``RSAE_<KEY>`` variables."""
    for k, v in env.items():
        monkeypatch.setenv(f"RSAE_{k.upper()}", v)
    get_settings.cache_clear()
    return TestClient(create_app(), headers=bearer(make_token(get_settings().database_url)))


# -- schema ----------------------------------------------------------------------------------------
def test_schema_is_created_by_alembic_and_matches_models(database_url: str) -> None:
    head = ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
    engine = create_engine(database_url)
    try:
        upgrade(database_url)  # idempotent
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT version_num FROM alembic_version")) == head
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        engine.dispose()


# -- health ----------------------------------------------------------------------------------------
def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json()["checks"] == {"database": "ok", "broker": "ok"}


def test_readyz_503_when_broker_is_down(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    with fresh_app(monkeypatch, broker_url="redis://127.0.0.1:1/0") as c:
        body = assert_problem(c.get("/readyz"), 503, code="not_ready")
    assert body["checks"]["database"] == "ok" and body["checks"]["broker"] != "ok"


def test_unknown_route_is_a_problem(client: TestClient) -> None:
    assert_problem(client.get("/nope"), 404, code="not_found")
    assert_problem(client.delete("/v1/jobs"), 405)


# -- uploads ---------------------------------------------------------------------------------------
def test_upload_teacher(client: TestClient, settings: Settings, make_teacher: Callable[..., Path]) -> None:
    folder = make_teacher()
    weights = (folder / "sae_weights.safetensors").read_bytes()
    r = post_sae(client, (folder / "cfg.json").read_bytes(), weights, name="tiny")
    assert r.status_code == 201, r.text
    sae = r.json()
    assert r.headers["location"] == f"/v1/saes/{sae['id']}"
    assert sae["name"] == "tiny" and sae["family"] == "relu" and sae["architecture"] == "standard"
    assert (sae["d_in"], sae["d_sae"]) == (576, 64)
    assert sae["sha256"] == hashlib.sha256(weights).hexdigest()
    stored = settings.uploads_dir / sae["id"]
    assert (stored / "sae_weights.safetensors").read_bytes() == weights
    assert client.get(f"/v1/saes/{sae['id']}").json() == sae
    assert [s["id"] for s in client.get("/v1/saes").json()["data"]] == [sae["id"]]
    assert_problem(client.get("/v1/saes/nope"), 404, field="id", code="sae_not_found")
    assert [p.name for p in settings.uploads_dir.iterdir()] == [sae["id"]]  # no temp folder left


def test_upload_form_errors(client: TestClient, make_teacher: Callable[..., Path]) -> None:
    folder = make_teacher()
    cfg = ("cfg.json", (folder / "cfg.json").read_bytes(), "application/json")
    weights = ("w.safetensors", (folder / "sae_weights.safetensors").read_bytes(), "application/octet-stream")
    assert_problem(client.post("/v1/saes", files={"cfg": cfg}), 422, field="weights", code="missing_field")
    assert_problem(
        client.post("/v1/saes", files={"cfg": cfg, "weights": weights, "extra": cfg}),
        422,
        field="extra",
        code="unknown_field",
    )
    for name in ("x" * 201, "tab\there"):
        assert_problem(
            client.post("/v1/saes", files={"cfg": cfg, "weights": weights}, data={"name": name}), 422, field="name"
        )
    assert_problem(client.post("/v1/saes", json={"cfg": {}}), 415, code="unsupported_media_type")
    r = client.post(
        "/v1/saes",
        content=b'--b\r\nContent-Disposition: form-data; name="cfg"\r\n\r\n{}',
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert_problem(r, 400, code="malformed_multipart")


def test_upload_size_limits(
    settings: Settings,
    clean_db: None,
    broker: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    make_teacher: Callable[..., Path],
) -> None:
    folder = make_teacher()
    cfg, weights = (folder / "cfg.json").read_bytes(), (folder / "sae_weights.safetensors").read_bytes()
    limit = len(weights) // 2
    with fresh_app(monkeypatch, max_upload_bytes=str(limit), max_cfg_bytes="64") as c:
        # Content-Length above the limit: refused before reading.
        assert_problem(post_sae(c, b"{}", weights), 413, field="body", code="payload_too_large")
        # cfg part above its own limit.
        assert_problem(post_sae(c, cfg, b"x"), 413, field="cfg", code="payload_too_large")
        # No Content-Length (chunked): stopped while streaming, naming the part being read.
        boundary = "XyZ"
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="weights"; filename="w"\r\n\r\n'.encode()
            + weights
            + f"\r\n--{boundary}--\r\n".encode()
        )
        r = c.post(
            "/v1/saes",
            content=iter([body[i : i + 65536] for i in range(0, len(body), 65536)]),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
        assert_problem(r, 413, field="weights", code="payload_too_large")
    assert list(get_settings().uploads_dir.iterdir()) == []


# -- jobs: create ----------------------------------------------------------------------------------
def test_create_job_commits_then_enqueues(client: TestClient, sae_id: str, db: Session, broker: redis.Redis) -> None:
    r = client.post("/v1/jobs", json=job_body(sae_id, finetune={"steps": 5}))
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["stage"] is None and job["progress"] == 0.0
    assert job["attempt"] == 0 and job["artifacts"] == [] and job["error"] is None
    assert job["request"]["settings"]["finetune"]["steps"] == 5
    assert job["request"]["settings"]["finetune"]["batch_size"] == 1024  # defaults echoed
    row = db.get(Job, job["id"])
    assert row is not None and row.status == "queued" and row.created_at.tzinfo is not None
    assert [e.data for e in db.scalars(select(JobEvent).where(JobEvent.job_id == job["id"]))] == [{"status": "queued"}]
    assert queued_messages(broker) == [("rsae.upgrade", [job["id"]])]
    broker.delete("gpu")
    assert client.get(f"/v1/jobs/{job['id']}").json() == job


def test_malformed_json_body(client: TestClient) -> None:
    r = client.post("/v1/jobs", content=b"{oops", headers={"content-type": "application/json"})
    assert_problem(r, 422, field="body", code="validation_error")


def test_unstorable_values_are_4xx(client: TestClient, sae_id: str, db: Session) -> None:
    """Values Postgres refuses (NUL characters, out-of-range integers) are bad input, not a 500."""
    assert_problem(  # not the bundled name, so a path: refused before it reaches Postgres
        client.post("/v1/jobs", json=job_body(sae_id, data={"dataset": "bbc\u0000news"})),
        422,
        field="settings.data.dataset",
    )
    assert_problem(client.post("/v1/jobs", json=job_body("a\u0000b")), 422, field="teacher.sae_id")
    assert_problem(client.get("/v1/jobs/%00"), 404, code="job_not_found")
    assert_problem(client.get("/v1/saes/%00"), 404, code="sae_not_found")
    job_id = client.post("/v1/jobs", json=job_body(sae_id)).json()["id"]
    assert_problem(client.get(f"/v1/jobs/{job_id}/events", params={"after": 2**64}), 422, field="after")
    assert db.scalar(select(func.count()).select_from(Job)) == 1


def test_local_teacher_path_when_allowed(
    settings: Settings,
    clean_db: None,
    broker: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    make_teacher: Callable[..., Path],
) -> None:
    folder = make_teacher()
    with fresh_app(monkeypatch, allow_local_paths="true", local_path_roots=json.dumps([str(folder.parent)])) as c:
        r = c.post("/v1/jobs", json={"layer": 3, "teacher": {"path": str(folder)}})
        assert r.status_code == 202, r.text
        assert_problem(
            c.post("/v1/jobs", json={"layer": 3, "teacher": {"path": "relative/dir"}}),
            422,
            field="teacher.path",
            code="path_not_allowed",
        )


def test_enqueue_failure_marks_job_failed(
    settings: Settings, clean_db: None, db: Session, monkeypatch: pytest.MonkeyPatch, make_teacher: Callable[..., Path]
) -> None:
    with fresh_app(monkeypatch, broker_url="redis://127.0.0.1:1/0", enqueue_retries="0") as c:
        sae_id = upload_sae(c, make_teacher())["id"]
        body = assert_problem(c.post("/v1/jobs", json=job_body(sae_id)), 503, code="enqueue_failed")
        job = c.get(f"/v1/jobs/{body['job_id']}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "enqueue_failed"
    assert job["finished_at"] is not None


# -- jobs: read, list ------------------------------------------------------------------------------
def test_unknown_job_is_404(client: TestClient) -> None:
    for path in (
        "/v1/jobs/0b5e8a3c-0000-4000-8000-000000000000",
        "/v1/jobs/not-a-uuid",
        "/v1/jobs/nope/events",
        "/v1/jobs/nope/artifacts",
        "/v1/jobs/nope/artifacts/cfg.json",
    ):
        assert_problem(client.get(path), 404, field="id", code="job_not_found")
    assert_problem(client.post("/v1/jobs/nope/cancel"), 404, code="job_not_found")


def test_list_jobs_cursor_pagination_and_status_filter(client: TestClient, sae_id: str) -> None:
    created = [client.post("/v1/jobs", json=job_body(sae_id, seed=i)).json()["id"] for i in range(5)]
    seen, cursor, pages = [], None, 0
    while True:
        page = client.get("/v1/jobs", params={"limit": 2, **({"after": cursor} if cursor else {})}).json()
        seen += [j["id"] for j in page["data"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and seen == created[::-1]  # newest first, no duplicates, nothing missed
    client.post(f"/v1/jobs/{created[1]}/cancel")
    client.post(f"/v1/jobs/{created[3]}/cancel")
    cancelled = client.get("/v1/jobs", params={"status": "cancelled"}).json()
    assert [j["id"] for j in cancelled["data"]] == [created[3], created[1]]
    assert cancelled["next_cursor"] is None
    assert len(client.get("/v1/jobs", params={"status": "queued"}).json()["data"]) == 3
    assert_problem(client.get("/v1/jobs", params={"status": "done"}), 422, field="status")
    assert_problem(client.get("/v1/jobs", params={"limit": 101}), 422, field="limit")
    assert_problem(client.get("/v1/jobs", params={"limit": 0}), 422, field="limit")
    naive = base64.urlsafe_b64encode(json.dumps(["2026-01-01T00:00:00", created[0]]).encode()).decode()
    for bad in ("garbage!", naive):
        assert_problem(client.get("/v1/jobs", params={"after": bad}), 422, field="after", code="invalid_cursor")


# -- jobs: cancel, progress, events -------------------------------------------------------------------
def _set_status(db: Session, job_id: str, status: str) -> None:
    db.execute(update(Job).where(Job.id == job_id).values(status=status))
    db.commit()


def test_cancel(client: TestClient, sae_id: str, db: Session) -> None:
    queued = client.post("/v1/jobs", json=job_body(sae_id)).json()["id"]
    for _ in range(2):  # idempotent
        job = client.post(f"/v1/jobs/{queued}/cancel").json()
        assert job["status"] == "cancelled" and job["finished_at"] is not None
    events = client.get(f"/v1/jobs/{queued}/events").json()["data"]
    assert [(e["type"], e["data"]["status"]) for e in events] == [("status", "queued"), ("status", "cancelled")]

    running = client.post("/v1/jobs", json=job_body(sae_id)).json()["id"]
    _set_status(db, running, "running")
    reporter = JobReporter(get_sessionmaker(get_settings().database_url), running)
    assert reporter.should_cancel() is False
    for _ in range(2):
        assert client.post(f"/v1/jobs/{running}/cancel").json()["status"] == "cancelling"
    reporter._last_poll = float("-inf")  # skip the poll throttle
    assert reporter.should_cancel() is True

    done = client.post("/v1/jobs", json=job_body(sae_id)).json()["id"]
    _set_status(db, done, "succeeded")
    assert client.post(f"/v1/jobs/{done}/cancel").json()["status"] == "succeeded"


def test_worker_progress_and_metrics_are_visible(client: TestClient, sae_id: str, db: Session) -> None:
    job_id = client.post("/v1/jobs", json=job_body(sae_id)).json()["id"]
    _set_status(db, job_id, "running")
    now = [100.0]
    report = JobReporter(get_sessionmaker(get_settings().database_url), job_id, clock=lambda: now[0])
    report("extract", 0.0)
    now[0] += 0.1
    report("extract", 0.1)  # throttled: not written
    assert client.get(f"/v1/jobs/{job_id}").json()["progress"] == 0.0
    now[0] += 0.5
    report("extract", 0.2)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert (job["stage"], job["progress"]) == ("extract", 0.2)
    report("finetune", 0.5, {"step": 30, "mse": 1.5, "fvu": float("nan")})
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert (job["stage"], job["progress"]) == ("finetune", 0.5)
    events = client.get(f"/v1/jobs/{job_id}/events").json()["data"]
    assert [e["type"] for e in events] == ["status", "progress", "progress", "progress", "metrics"]
    assert events[-1]["data"] == {"stage": "finetune", "step": 30, "mse": 1.5, "fvu": None}
    after = client.get(f"/v1/jobs/{job_id}/events", params={"after": events[2]["id"]}).json()["data"]
    assert after == events[3:]
    assert (
        client.get(f"/v1/jobs/{job_id}/events", params={"after": events[2]["id"], "limit": 1}).json()["data"]
        == events[3:4]
    )


# -- artifacts -------------------------------------------------------------------------------------
def test_artifact_listing_and_download(client: TestClient, settings: Settings, sae_id: str, db: Session) -> None:
    job_id = client.post("/v1/jobs", json=job_body(sae_id)).json()["id"]
    _set_status(db, job_id, "succeeded")
    data = bytes(range(256)) * 4
    path = settings.artifacts_dir / job_id / "sae" / "report.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    db.add(
        Artifact(
            job_id=job_id,
            name="report.json",
            kind="report",
            content_type="application/json",
            size=len(data),
            sha256=sha,
            path=f"{job_id}/sae/report.json",
            created_at=utcnow(),
        )
    )
    db.commit()

    listing = client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    assert listing == [
        {
            "name": "report.json",
            "kind": "report",
            "content_type": "application/json",
            "size": len(data),
            "sha256": sha,
            "url": f"/v1/jobs/{job_id}/artifacts/report.json",
        }
    ]
    assert client.get(f"/v1/jobs/{job_id}").json()["artifacts"] == listing

    r = client.get(listing[0]["url"])
    assert r.status_code == 200 and r.content == data
    assert r.headers["etag"] == f'"{sha}"' and r.headers["x-checksum-sha256"] == sha
    assert r.headers["repr-digest"] == f"sha-256=:{base64.b64encode(bytes.fromhex(sha)).decode()}:"
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["accept-ranges"] == "bytes"

    r = client.get(listing[0]["url"], headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == data[10:20]
    assert r.headers["content-range"] == f"bytes 10-19/{len(data)}"
    assert client.get(listing[0]["url"], headers={"If-None-Match": f'"{sha}"'}).status_code == 304

    assert_problem(client.get(f"/v1/jobs/{job_id}/artifacts/cfg.json"), 404, field="name", code="artifact_not_found")
    assert_problem(client.get(f"/v1/jobs/{job_id}/artifacts/..%2F..%2Fsaes"), 404)  # never a path join
    path.unlink()
    assert_problem(client.get(listing[0]["url"]), 500, code="artifact_missing")


# -- single-machine mode ---------------------------------------------------------------------------
def test_sqlite_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broker: redis.Redis, make_teacher: Callable[..., Path]
) -> None:
    """SQLite (the default database): migrations, aware timestamps and the cursor work there too."""
    monkeypatch.delenv("RSAE_DATABASE_URL", raising=False)
    monkeypatch.setenv("RSAE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RSAE_BROKER_URL", f"{REDIS_URL}/{API_REDIS_DB}")  # the broker fixture's database
    get_settings.cache_clear()
    url = get_settings().database_url
    assert url == f"sqlite:///{tmp_path / 'data' / 'rsae.db'}"
    upgrade(url)
    with TestClient(create_app(), headers=bearer(make_token(url))) as c:
        sae_id = upload_sae(c, make_teacher())["id"]
        ids = [c.post("/v1/jobs", json=job_body(sae_id)).json()["id"] for _ in range(3)]
        first = c.get("/v1/jobs", params={"limit": 2}).json()
        rest = c.get("/v1/jobs", params={"limit": 2, "after": first["next_cursor"]}).json()
        assert [j["id"] for j in first["data"] + rest["data"]] == ids[::-1]
        assert first["data"][0]["created_at"].endswith("Z")
    assert len(queued_messages(broker)) == 3
    get_settings.cache_clear()


def test_event_stream_of_a_finished_job_replays_and_ends(client: TestClient, sae_id: str) -> None:
    """``Accept: text/event-stream`` on a terminal job: every event as SSE (id, event type, JSON data), then
    the stream closes; ``Last-Event-ID`` resumes after the given event; a bad one is a 422."""
    job_id = client.post("/v1/jobs", json=job_body(sae_id)).json()["id"]
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    listed = client.get(f"/v1/jobs/{job_id}/events").json()["data"]
    sse = {"Accept": "text/event-stream"}
    r = client.get(f"/v1/jobs/{job_id}/events", headers=sse)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    ids = [int(line[3:]) for line in r.text.splitlines() if line.startswith("id:")]
    types = [line[6:].strip() for line in r.text.splitlines() if line.startswith("event:")]
    data = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]
    assert ids == [e["id"] for e in listed] and types == ["status", "status"]
    assert [d["data"]["status"] for d in data] == ["queued", "cancelled"]
    r = client.get(f"/v1/jobs/{job_id}/events", headers={**sse, "Last-Event-ID": str(ids[0])})
    assert [int(line[3:]) for line in r.text.splitlines() if line.startswith("id:")] == ids[1:]
    assert_problem(
        client.get(f"/v1/jobs/{job_id}/events", headers={**sse, "Last-Event-ID": "x"}), 422, field="Last-Event-ID"
    )
