"""Admission under load (issue 11): exact quota under concurrency, idempotency keys as Stripe uses them, rate
limits on failed authentications and on submissions.

Real Postgres and Redis (db 15, the broker and the rate limiter's storage); the SQLite cases use a migrated
SQLite file, as the embedded single-machine stack does. Concurrency goes through a real uvicorn server
(:func:`support.servers.served`); no worker runs, so accepted jobs stay queued.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from limits.storage import MemoryStorage, RedisStorage
from pydantic import ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.app import create_app
from service.client import upload_sae
from service.config import Settings
from service.db import get_sessionmaker
from service.idempotency import IN_FLIGHT_TIMEOUT, prune_expired, request_sha256
from service.migrate import upgrade
from service.models import IdempotencyKey, Job, User, utcnow
from service.ratelimit import RateLimits
from service.schemas import JobCreate
from support.servers import assert_problem, bearer, job_body, make_token, queued_messages, served
from worker.lease import reap_once

UNLIMITED = {"rate_limit_submissions_per_token": "", "rate_limit_submissions_per_address": ""}


def post_in_parallel(base: str, token: str, body: dict[str, Any], n: int, headers: dict | None = None) -> list:
    """``n`` POST /jobs released at the same instant (a barrier) from ``n`` threads and connections."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    with httpx.Client(base_url=base, headers=bearer(token), timeout=60, limits=limits) as http:
        start = threading.Barrier(n)

        def one(_: int) -> httpx.Response:
            start.wait()
            return http.post("/v1/jobs", json=body, headers=headers)

        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(one, range(n)))


def jobs_of(settings: Settings, user: str = "alice") -> list[Job]:
    """Every job of ``user`` in the settings' database."""
    with get_sessionmaker(settings.database_url)() as s:
        return list(s.scalars(select(Job).join(User, Job.owner_id == User.id).where(User.name == user)))


# -- quota ------------------------------------------------------------------------------------------
def test_quota_is_exact_under_60_parallel_submissions(
    backend: Settings, broker: redis.Redis, make_teacher: Callable[..., Path]
) -> None:
    """60 parallel POST /jobs against a quota of 20: exactly 20 accepted, 40 answered 429 too_many_jobs
    (SQLite used to accept 24: the row lock is a no-op there; now the count runs under BEGIN IMMEDIATE)."""
    s = backend.model_copy(update={"max_active_jobs_per_user": 20, **UNLIMITED})
    token = make_token(s.database_url)
    with served(s) as base:
        with httpx.Client(base_url=base, headers=bearer(token), timeout=60) as http:
            sae_id = upload_sae(http, make_teacher())["id"]
        t0 = time.monotonic()
        answers = post_in_parallel(base, token, job_body(sae_id), 60)
        took = time.monotonic() - t0
    assert Counter(r.status_code for r in answers) == {202: 20, 429: 40}, [r.text for r in answers][:3]
    for r in answers:
        if r.status_code == 429:
            assert_problem(r, 429, code="too_many_jobs")
            assert int(r.headers["retry-after"]) > 0
    jobs = jobs_of(s)
    assert len(jobs) == 20 and {j.status for j in jobs} == {"queued"}
    assert {j.id for j in jobs} == {r.json()["id"] for r in answers if r.status_code == 202}
    assert len(queued_messages(broker)) == 20
    print(f"60 parallel submissions on {s.database_url.split(':')[0]}: {took:.2f} s")


def test_a_locked_sqlite_database_is_503_with_retry_after(
    settings: Settings, clean_db: None, broker: redis.Redis, tmp_path: Path, make_teacher: Callable[..., Path]
) -> None:
    """Another writer holds SQLite's lock past the busy timeout: POST /jobs answers 503 database_unavailable
    with Retry-After (it was a 500 "database is locked"), the key stays free, and once the lock is gone the
    same request is accepted."""
    db_file = tmp_path / "locked.db"
    url = f"sqlite:///{db_file}"
    upgrade(url)
    s = settings.model_copy(update={"database_url": url, "db_busy_timeout_seconds": 0.3, **UNLIMITED})
    token = make_token(url)
    with served(s) as base, httpx.Client(base_url=base, headers=bearer(token), timeout=60) as http:
        sae_id = upload_sae(http, make_teacher())["id"]
        other = sqlite3.connect(db_file, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        try:
            r = http.post("/v1/jobs", json=job_body(sae_id), headers={"Idempotency-Key": "k1"})
        finally:
            other.execute("ROLLBACK")
            other.close()
        body = assert_problem(r, 503, code="database_unavailable")
        assert int(r.headers["retry-after"]) > 0 and "locked" not in body["detail"]
        again = http.post("/v1/jobs", json=job_body(sae_id), headers={"Idempotency-Key": "k1"})
    assert again.status_code == 202, again.text
    assert [j.status for j in jobs_of(s)] == ["queued"]


def test_parallel_uses_of_one_key_create_one_job(backend: Settings, make_teacher: Callable[..., Path]) -> None:
    """20 parallel POST /jobs with the same Idempotency-Key and body: one job; every answer is that job's
    202 (created or replayed, byte-identical) or a 409 idempotency_key_in_use with Retry-After."""
    s = backend.model_copy(update=UNLIMITED)
    token = make_token(s.database_url)
    with served(s) as base:
        with httpx.Client(base_url=base, headers=bearer(token), timeout=60) as http:
            sae_id = upload_sae(http, make_teacher())["id"]
        answers = post_in_parallel(base, token, job_body(sae_id), 20, headers={"Idempotency-Key": "same"})
        with httpx.Client(base_url=base, headers=bearer(token), timeout=60) as http:
            later = http.post("/v1/jobs", json=job_body(sae_id), headers={"Idempotency-Key": "same"})
    codes = Counter(r.status_code for r in answers)
    assert set(codes) <= {202, 409} and codes[202] >= 1, codes
    created = [r for r in answers if r.status_code == 202]
    assert len({r.content for r in created}) == 1
    assert sum(r.headers.get("idempotent-replayed") != "true" for r in created) == 1
    for r in answers:
        if r.status_code == 409:
            assert_problem(r, 409, code="idempotency_key_in_use", field="Idempotency-Key")
            assert int(r.headers["retry-after"]) >= 1
    assert later.status_code == 202 and later.content == created[0].content
    assert later.headers["idempotent-replayed"] == "true"
    assert len(jobs_of(s)) == 1
    print(f"20 parallel uses of one key on {s.database_url.split(':')[0]}: {dict(codes)}, 1 job")


# -- idempotency ------------------------------------------------------------------------------------
def test_a_refused_request_does_not_bind_its_key(
    settings: Settings, clean_db: None, broker: redis.Redis, make_teacher: Callable[..., Path], db: Session
) -> None:
    """A 422 (invalid body) and a 429 (quota) leave the key free: the next valid request with it runs."""
    s = settings.model_copy(update={"max_active_jobs_per_user": 1})
    with TestClient(create_app(s), headers=bearer(make_token(s.database_url))) as c:
        sae_id = upload_sae(c, make_teacher())["id"]
        key = {"Idempotency-Key": "k-1"}
        assert_problem(c.post("/v1/jobs", json={**job_body(sae_id), "layer": 99}, headers=key), 422, field="layer")
        first = c.post("/v1/jobs", json=job_body(sae_id), headers=key)
        assert first.status_code == 202 and "idempotent-replayed" not in first.headers
        # Quota full: a 429 with key k-2 does not bind k-2 either.
        key2 = {"Idempotency-Key": "k-2"}
        assert_problem(c.post("/v1/jobs", json=job_body(sae_id, seed=1), headers=key2), 429, code="too_many_jobs")
        assert c.post(f"/v1/jobs/{first.json()['id']}/cancel").json()["status"] == "cancelled"
        second = c.post("/v1/jobs", json=job_body(sae_id, seed=2), headers=key2)  # another body: the key is free
        assert second.status_code == 202 and "idempotent-replayed" not in second.headers
    assert db.scalar(select(func.count()).select_from(Job)) == 2
    assert set(db.scalars(select(IdempotencyKey.key))) == {"k-1", "k-2"}


def test_a_failed_enqueue_frees_the_key(
    settings: Settings, clean_db: None, broker: redis.Redis, make_teacher: Callable[..., Path], db: Session
) -> None:
    """503 enqueue_failed (broker down): the job is failed and the key stays free; the same key after the
    broker is back creates and queues a new job, whose 202 is what later replays return."""
    token = make_token(settings.database_url)
    key = {"Idempotency-Key": "nightly-7"}
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0", "enqueue_retries": 0})
    with TestClient(create_app(down), headers=bearer(token)) as c:
        sae_id = upload_sae(c, make_teacher())["id"]  # the limiter's Redis is down too: it fails open
        failed = assert_problem(c.post("/v1/jobs", json=job_body(sae_id), headers=key), 503, code="enqueue_failed")
    assert db.scalar(select(func.count()).select_from(IdempotencyKey)) == 0
    with TestClient(create_app(settings), headers=bearer(token)) as c:
        created = c.post("/v1/jobs", json=job_body(sae_id), headers=key)
        assert created.status_code == 202 and created.json()["id"] != failed["job_id"]
        assert created.json()["status"] == "queued"
        replayed = c.post("/v1/jobs", json=job_body(sae_id), headers=key)
        assert replayed.status_code == 202 and replayed.content == created.content
        assert replayed.headers["idempotent-replayed"] == "true"
        assert c.get(f"/v1/jobs/{failed['job_id']}").json()["error"]["code"] == "enqueue_failed"
    assert queued_messages(broker) == [("rsae.upgrade", [created.json()["id"]])]


def _hold_key(database_url: str, key: str, body: dict[str, Any], *, age: timedelta, job_id: str | None = None) -> None:
    """Write alice's ``key`` as in flight for ``age`` (a request running, or one that died)."""
    with get_sessionmaker(database_url).begin() as s:
        owner = s.scalar(select(User.id).where(User.name == "alice"))
        now = utcnow()
        s.add(
            IdempotencyKey(
                owner_id=owner,
                key=key,
                request_sha256=request_sha256(JobCreate.model_validate(body)),
                state="in_flight",
                locked_at=now - age,
                job_id=job_id,
                created_at=now - age,
                expires_at=now + timedelta(hours=1),
            )
        )


def test_key_in_flight_is_409_and_a_dead_holder_is_taken_over(client: TestClient, sae_id: str, settings: Settings):
    """A key held by a running request: 409 with Retry-After. Held past IN_FLIGHT_TIMEOUT (its request
    died): before creating a job, the next request takes it over; after creating one, that job is replayed."""
    body = job_body(sae_id)
    _hold_key(settings.database_url, "busy", body, age=timedelta(seconds=1))
    r = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "busy"})
    assert_problem(r, 409, code="idempotency_key_in_use", field="Idempotency-Key")
    assert r.headers["retry-after"] == "1"
    stale = IN_FLIGHT_TIMEOUT + timedelta(seconds=5)
    _hold_key(settings.database_url, "died-early", body, age=stale)
    r = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "died-early"})
    assert r.status_code == 202 and "idempotent-replayed" not in r.headers
    job_id = r.json()["id"]
    _hold_key(settings.database_url, "died-late", body, age=stale, job_id=job_id)
    r = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "died-late"})
    assert r.status_code == 202 and r.json()["id"] == job_id and r.headers["idempotent-replayed"] == "true"
    assert len(client.get("/v1/jobs").json()["data"]) == 1


def test_keys_expire_and_are_pruned(backend: Settings, make_teacher: Callable[..., Path]) -> None:
    """Keys live idempotency_key_ttl_seconds; an expired key is free again (another body is no 422), and
    prune_expired / the reaper delete expired rows."""
    s = backend.model_copy(update={"idempotency_key_ttl_seconds": 3600.0})
    make = get_sessionmaker(s.database_url)
    with TestClient(create_app(s), headers=bearer(make_token(s.database_url))) as c:
        sae_id = upload_sae(c, make_teacher())["id"]
        key = {"Idempotency-Key": "weekly"}
        first = c.post("/v1/jobs", json=job_body(sae_id), headers=key)
        assert first.status_code == 202
        with make() as db:
            row = db.scalar(select(IdempotencyKey))
            assert row.state == "done" and row.response_status == 202 and row.job_id == first.json()["id"]
            assert row.expires_at - row.created_at == timedelta(hours=1)
        assert_problem(
            c.post("/v1/jobs", json=job_body(sae_id, seed=3), headers=key), 422, code="idempotency_key_reused"
        )
        with make.begin() as db:
            db.execute(update(IdempotencyKey).values(expires_at=utcnow() - timedelta(seconds=1)))
        again = c.post("/v1/jobs", json=job_body(sae_id, seed=3), headers=key)
        assert again.status_code == 202 and again.json()["id"] != first.json()["id"]
        assert "idempotent-replayed" not in again.headers
        c.post("/v1/jobs", json=job_body(sae_id), headers={"Idempotency-Key": "other"})
    with make.begin() as db:
        db.execute(update(IdempotencyKey).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert prune_expired(make) == 2 and prune_expired(make) == 0
    c2 = TestClient(create_app(s), headers=bearer(make_token(s.database_url)))
    assert c2.post("/v1/jobs", json=job_body(sae_id), headers={"Idempotency-Key": "third"}).status_code == 202
    with make.begin() as db:
        db.execute(update(IdempotencyKey).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert reap_once(s, make, lambda job_id: None).pruned_keys == 1
    with make() as db:
        assert db.scalar(select(func.count()).select_from(IdempotencyKey)) == 0


# -- rate limits ------------------------------------------------------------------------------------
def bad_token() -> str:
    """A well-formed token that no one holds."""
    return "rsae_" + secrets.token_urlsafe(32)


@pytest.fixture
def app_settings(settings: Settings, clean_db: None, broker: redis.Redis) -> Iterator[Settings]:
    """The test settings with the default rate limits (30 auth failures a minute), Redis storage."""
    yield settings


def test_300_bad_tokens_from_one_address_are_429_and_others_still_work(
    app_settings: Settings, database_url: str
) -> None:
    app = create_app(app_settings)
    attacker = TestClient(app, client=("203.0.113.7", 40000))
    t0 = time.monotonic()
    answers = [attacker.get("/v1/jobs", headers=bearer(bad_token())) for _ in range(300)]
    took = time.monotonic() - t0
    assert Counter(r.status_code for r in answers) == {401: 30, 429: 270}
    assert [r.status_code for r in answers[:30]] == [401] * 30  # the first 30 failures are answered as such
    for r in answers[30:]:
        assert_problem(r, 429, code="rate_limited", field="Authorization")
        assert 1 <= int(r.headers["retry-after"]) <= 60
    good = make_token(database_url, "alice")
    # A valid token from another address works; from the blocked address it waits like everything else.
    assert TestClient(app, client=("198.51.100.20", 40000)).get("/v1/jobs", headers=bearer(good)).status_code == 200
    assert_problem(attacker.get("/v1/jobs", headers=bearer(good)), 429, code="rate_limited")
    # The counters are in Redis: another API process (another app) refuses the address as well.
    other_process = TestClient(create_app(app_settings), client=("203.0.113.7", 40001))
    assert_problem(other_process.get("/v1/jobs", headers=bearer(good)), 429, code="rate_limited")
    print(f"300 bad tokens in {took:.2f} s: 30 x 401, 270 x 429")


def test_one_bad_token_from_many_addresses_is_429(app_settings: Settings, database_url: str) -> None:
    app = create_app(app_settings)
    token = bad_token()
    codes = [
        TestClient(app, client=(f"10.1.{i // 250}.{i % 250}", 1)).get("/v1/jobs", headers=bearer(token)).status_code
        for i in range(40)
    ]
    assert codes == [401] * 30 + [429] * 10
    # Another (valid) token from a fresh address is not affected.
    good = make_token(database_url, "alice")
    assert TestClient(app, client=("10.9.9.9", 1)).get("/v1/jobs", headers=bearer(good)).status_code == 200


def test_submissions_beyond_the_rate_are_429(
    app_settings: Settings, database_url: str, make_teacher: Callable[..., Path]
) -> None:
    """3 submissions a minute per token, 5 per address: POST /jobs and POST /saes count together."""
    s = app_settings.model_copy(
        update={"rate_limit_submissions_per_token": "3/minute", "rate_limit_submissions_per_address": "5/minute"}
    )
    app = create_app(s)
    alice = TestClient(app, headers=bearer(make_token(database_url, "alice")), client=("192.0.2.1", 1))
    sae_id = upload_sae(alice, make_teacher())["id"]  # 1
    assert [alice.post("/v1/jobs", json=job_body(sae_id, seed=i)).status_code for i in range(2)] == [202, 202]  # 2, 3
    r = alice.post("/v1/jobs", json=job_body(sae_id, seed=9))
    body = assert_problem(r, 429, code="rate_limited")
    assert 1 <= int(r.headers["retry-after"]) <= 60 and "token" in body["detail"]
    r = alice.post("/v1/saes", files={"cfg": ("cfg.json", b"{}")})
    assert_problem(r, 429, code="rate_limited")  # refused before the upload is read
    assert alice.get("/v1/jobs").status_code == 200  # reading is not limited
    mallory_token = make_token(database_url, "mallory")
    mallory = TestClient(app, headers=bearer(mallory_token), client=("192.0.2.1", 2))
    mallory_sae = upload_sae(mallory, make_teacher("t2"))["id"]  # the address's 4th (alice's refusals do not count)
    assert mallory.post("/v1/jobs", json=job_body(mallory_sae)).status_code == 202  # 5th
    body = assert_problem(mallory.post("/v1/jobs", json=job_body(mallory_sae, seed=1)), 429, code="rate_limited")
    assert "address" in body["detail"]
    elsewhere = TestClient(app, headers=bearer(mallory_token), client=("192.0.2.99", 2))
    assert elsewhere.post("/v1/jobs", json=job_body(mallory_sae, seed=1)).status_code == 202


def test_rate_limiter_storage_and_settings(settings: Settings) -> None:
    assert isinstance(RateLimits(settings).storage, RedisStorage)  # the broker's Redis
    memory = RateLimits(settings.model_copy(update={"broker_url": None}))
    assert isinstance(memory.storage, MemoryStorage)
    for _ in range(30):
        memory.auth_failed("192.0.2.5", None)
    with pytest.raises(Exception, match="too many failed") as refused:
        memory.check_auth("192.0.2.5", None)
    assert refused.value.status == 429 and int(refused.value.headers["Retry-After"]) > 0
    memory.check_auth("192.0.2.6", None)  # another address
    # Redis unreachable: fail open (logged), never a 500.
    down = RateLimits(settings, storage_uri="redis://127.0.0.1:1/0")
    for _ in range(40):
        down.auth_failed("192.0.2.5", "t")
        down.submission("192.0.2.5", "t")
    down.check_auth("192.0.2.5", "t")
    with pytest.raises(ValidationError, match="limits"):
        Settings(rate_limit_auth_failures="lots")
    assert Settings(rate_limit_submissions_per_token="").rate_limit_submissions_per_token == ""


def test_migration_carries_the_keys_of_existing_jobs(tmp_path: Path, broker: redis.Redis, settings: Settings) -> None:
    """0004 on SQLite: a keyed job submitted before it replays (202, the job as it is now); the key of a job
    whose enqueue failed is free; a downgrade restores the unique constraint on jobs."""
    from alembic import command
    from sqlalchemy import create_engine, text

    from service.migrate import alembic_config

    url = f"sqlite:///{tmp_path / 'old.db'}"
    cfg = alembic_config(url)
    command.upgrade(cfg, "0003")
    body = job_body("0b5e8a3c-0000-4000-8000-000000000000")
    digest = request_sha256(JobCreate.model_validate(body))
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO users (id, name, created_at) VALUES ('u1', 'alice', :t)"), {"t": utcnow()})
        for job_id, key, status, error in (
            ("j-ok", "old", "queued", None),
            ("j-503", "lost", "failed", "enqueue_failed"),
        ):
            conn.execute(
                text(
                    "INSERT INTO jobs (id, owner_id, idempotency_key, request_sha256, status, progress, request, "
                    "error, attempt, created_at, updated_at) VALUES (:id, 'u1', :key, :sha, :status, 0, :req, :err, "
                    "0, :t, :t)"
                ),
                {
                    "id": job_id,
                    "key": key,
                    "sha": digest,
                    "status": status,
                    "req": '{"model": "smollm2-135m"}',
                    "err": f'{{"code": "{error}"}}' if error else None,
                    "t": utcnow() - timedelta(hours=1),
                },
            )
    command.upgrade(cfg, "head")
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT key, state, response_status, response_body, job_id FROM idempotency_keys"))
        assert rows.all() == [("old", "done", 202, None, "j-ok")]
    s = settings.model_copy(update={"database_url": url})
    with TestClient(create_app(s), headers=bearer(make_token(url, "alice"))) as c:
        r = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "old"})
        assert r.status_code == 202 and r.json()["id"] == "j-ok" and r.headers["idempotent-replayed"] == "true"
    command.downgrade(cfg, "0003")
    with engine.connect() as conn:
        assert "uq_jobs_owner_id_idempotency_key" in conn.scalar(
            text("SELECT sql FROM sqlite_master WHERE name='jobs'")
        )
    engine.dispose()
