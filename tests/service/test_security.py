"""Authentication, isolation between users, Idempotency-Key, quotas and body limits (real Postgres + Redis).

Every route but the health probes needs a bearer token; another user's job, SAE or artifact answers 404
exactly like an unknown id; tokens are stored only as SHA-256.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from service.app import create_app
from service.auth import hash_token
from service.client import upload_sae
from service.config import Settings
from service.models import Artifact, Job, utcnow
from support.servers import assert_problem, bearer, job_body, make_token, queued_messages

PUBLIC = {"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
ZERO_ID = "00000000-0000-4000-8000-000000000000"


def _routes(client: TestClient) -> list[tuple[str, str]]:
    """(method, path) of every API route with ids filled in by a syntactically valid unknown id."""
    out = []
    for path, ops in client.app.openapi()["paths"].items():
        if path not in PUBLIC:
            path = path.replace("{job_id}", ZERO_ID).replace("{sae_id}", ZERO_ID).replace("{name}", "cfg.json")
            out.extend((m.upper(), path) for m in sorted(ops))
    return out


def test_every_route_but_health_requires_a_token(client: TestClient, database_url: str) -> None:
    routes = _routes(client)
    assert {
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs"),
        ("POST", "/v1/saes"),
        ("GET", "/v1/saes"),
        ("GET", f"/v1/jobs/{ZERO_ID}/artifacts/cfg.json"),
    } <= set(routes)
    revoked = make_token(database_url, "carol")
    assert subprocess.run(
        [sys.executable, "-m", "service.cli", "token", "revoke", "--prefix", revoked[:12]],
        env={**os.environ, "RSAE_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.startswith("revoked 1")
    bad_headers = {
        "missing": {},
        "not bearer": {"Authorization": "Basic YWxpY2U6cGFzcw=="},
        "empty bearer": {"Authorization": "Bearer "},
        "malformed": {"Authorization": "Bearer rsae_short"},
        "unknown": {"Authorization": "Bearer rsae_" + "A" * 43},
        "revoked": bearer(revoked),
    }
    for i, (method, path) in enumerate(routes):
        # One client address per route: the failures stay below the auth-failure rate limit (tested apart).
        anon = TestClient(client.app, client=(f"192.0.2.{i + 1}", 50000))
        for why, headers in bad_headers.items():
            r = anon.request(method, path, headers=headers)
            body = assert_problem(r, 401, field="Authorization", code="unauthorized")
            assert r.headers["www-authenticate"].startswith("Bearer"), (method, path, why)
            assert "rsae_" + "A" * 43 not in body["detail"]
    for path in ("/healthz", "/openapi.json"):
        assert TestClient(client.app).get(path).status_code == 200


def test_tokens_are_stored_hashed_and_cli_prints_them_once(
    settings: Settings, clean_db: None, db: Session, database_url: str
) -> None:
    env = {**os.environ, "RSAE_DATABASE_URL": database_url}
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "token", "create", "--user", "dave", "--name", "laptop"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    token = out.stdout.strip()
    assert token.startswith("rsae_") and len(token) == 48
    dump = " ".join(str(v) for row in db.execute(text("SELECT * FROM api_tokens")) for v in row)
    assert token not in dump and hash_token(token) in dump
    listing = subprocess.run(
        [sys.executable, "-m", "service.cli", "token", "list"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert token[:12] in listing and token not in listing and "dave" in listing
    bad = subprocess.run(
        [sys.executable, "-m", "service.cli", "token", "create", "--user", "../evil"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "invalid user name" in bad.stderr
    with TestClient(create_app(), headers=bearer(token)) as c:
        assert c.get("/v1/jobs").json() == {"data": [], "has_more": False, "next_cursor": None}


def test_other_users_resources_are_404_on_every_route(
    client: TestClient,
    other_client: TestClient,
    settings: Settings,
    make_teacher: Callable[..., Path],
    db: Session,
    broker: redis.Redis,
) -> None:
    sae_id = upload_sae(client, make_teacher())["id"]
    job_id = client.post("/v1/jobs", json=job_body(sae_id)).json()["id"]
    # Give alice's job a real artifact on disk, as a finished job has.
    folder = settings.artifacts_dir / job_id / "sae"
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text("{}")
    db.add(
        Artifact(
            job_id=job_id,
            name="cfg.json",
            kind="config",
            content_type="application/json",
            size=2,
            sha256="44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
            path=f"{job_id}/sae/cfg.json",
            created_at=utcnow(),
        )
    )
    db.commit()
    assert client.get(f"/v1/jobs/{job_id}/artifacts/cfg.json").status_code == 200
    before = client.get(f"/v1/jobs/{job_id}").json()

    for method, path in _routes(client):
        if "{" in path or ZERO_ID not in path:
            continue
        own = path.replace(ZERO_ID, sae_id if path.startswith("/v1/saes") else job_id)
        r = other_client.request(method, own)
        body = assert_problem(r, 404)
        assert body["code"] in ("job_not_found", "sae_not_found"), (method, own, body)
        unknown = other_client.request(method, path)
        assert unknown.json()["code"] == body["code"]  # indistinguishable from an unknown id
    assert other_client.get("/v1/jobs").json() == {"data": [], "has_more": False, "next_cursor": None}
    assert other_client.get("/v1/saes").json()["data"] == []
    # Using alice's SAE as a teacher is refused as if it did not exist.
    assert_problem(
        other_client.post("/v1/jobs", json=job_body(sae_id)), 422, field="teacher.sae_id", code="invalid_teacher"
    )
    after = client.get(f"/v1/jobs/{job_id}").json()
    assert after == before and after["status"] == "queued"  # mallory's cancel did nothing
    assert db.scalar(select(func.count()).select_from(Job)) == 1
    assert len(queued_messages(broker)) == 1


def test_idempotency_key(
    client: TestClient, other_client: TestClient, make_teacher: Callable[..., Path], db: Session, broker: redis.Redis
) -> None:
    sae_id = upload_sae(client, make_teacher())["id"]
    key = {"Idempotency-Key": "run-2026-11-23-a"}
    first = client.post("/v1/jobs", json=job_body(sae_id), headers=key)
    assert first.status_code == 202, first.text
    # Same key, same body (defaults written out explicitly: the same request) -> same job, not a new one.
    explicit = job_body(sae_id, finetune={"steps": first.json()["request"]["settings"]["finetune"]["steps"]})
    again = client.post("/v1/jobs", json=explicit, headers=key)
    # The original response replayed: status 202 and the same body, byte for byte (the job as created).
    assert again.status_code == 202 and again.content == first.content
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert again.headers["location"] == f"/v1/jobs/{first.json()['id']}"
    # Same key, another body -> 422 naming the header, nothing created.
    body = assert_problem(
        client.post("/v1/jobs", json=job_body(sae_id, seed=7), headers=key),
        422,
        field="Idempotency-Key",
        code="idempotency_key_reused",
    )
    assert body["job_id"] == first.json()["id"]
    # Keys are per user: mallory's identical key is unrelated (and her body fails on her own terms).
    assert_problem(other_client.post("/v1/jobs", json=job_body(sae_id), headers=key), 422, field="teacher.sae_id")
    # Bad keys.
    for bad in (b"", b"x" * 256, "caf\u00e9".encode(), b"tab\there"):
        r = client.post("/v1/jobs", json=job_body(sae_id), headers={"Idempotency-Key": bad})
        assert_problem(r, 422, field="Idempotency-Key")
    # A new key is a new job.
    assert client.post("/v1/jobs", json=job_body(sae_id), headers={"Idempotency-Key": "b"}).status_code == 202
    assert db.scalar(select(func.count()).select_from(Job)) == 2
    assert len(queued_messages(broker)) == 2


def test_active_job_quota_is_429_with_retry_after(
    settings: Settings,
    clean_db: None,
    broker: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    make_teacher: Callable[..., Path],
) -> None:
    from service.config import get_settings

    monkeypatch.setenv("RSAE_MAX_ACTIVE_JOBS_PER_USER", "2")
    get_settings.cache_clear()
    with (
        TestClient(create_app(), headers=bearer(make_token(database_url))) as c,
        TestClient(c.app, headers=bearer(make_token(database_url, "mallory"))) as m,
    ):
        sae_id = upload_sae(c, make_teacher())["id"]
        ids = [c.post("/v1/jobs", json=job_body(sae_id)).json()["id"] for _ in range(2)]
        r = c.post("/v1/jobs", json=job_body(sae_id))
        assert_problem(r, 429, code="too_many_jobs")
        assert int(r.headers["retry-after"]) > 0
        # Other users are not affected.
        assert (
            upload_sae(m, make_teacher("t2"))
            and m.post("/v1/jobs", json=job_body(m.get("/v1/saes").json()["data"][0]["id"])).status_code == 202
        )
        # A cancelled job frees a slot.
        assert c.post(f"/v1/jobs/{ids[0]}/cancel").json()["status"] == "cancelled"
        assert c.post("/v1/jobs", json=job_body(sae_id)).status_code == 202
    assert len(queued_messages(broker)) == 4


def test_request_body_limit(client: TestClient, settings: Settings) -> None:
    big = b'{"layer": 3, "model": "' + b"x" * (settings.max_body_bytes + 10) + b'"}'
    assert_problem(
        client.post("/v1/jobs", content=big, headers={"content-type": "application/json"}),
        413,
        field="body",
        code="payload_too_large",
    )
    # Chunked (no Content-Length): counted while streaming.
    chunks = iter([big[i : i + 65536] for i in range(0, len(big), 65536)])
    assert_problem(
        client.post("/v1/jobs", content=chunks, headers={"content-type": "application/json"}),
        413,
        field="body",
        code="payload_too_large",
    )
    assert client.get("/v1/jobs").status_code == 200  # the server is fine


def test_artifact_names_never_reach_the_filesystem(
    client: TestClient, settings: Settings, make_teacher: Callable[..., Path], db: Session
) -> None:
    sae_id = upload_sae(client, make_teacher())["id"]
    job_id = client.post("/v1/jobs", json=job_body(sae_id)).json()["id"]
    secret = settings.data_dir / "secret.txt"
    secret.write_text("do not serve")
    for name in (
        "../../secret.txt",
        "..%2F..%2Fsecret.txt",
        "%2e%2e/%2e%2e/secret.txt",
        "/etc/passwd",
        "..",
        "sae/../../secret.txt",
        "cfg.json%00.txt",
    ):
        r = client.get(f"/v1/jobs/{job_id}/artifacts/{name}")
        assert "do not serve" not in r.text
        if r.status_code == 200:  # the client normalised the dots away and asked for the job itself
            assert r.json()["id"] == job_id, name
        else:
            assert_problem(r, 404)
