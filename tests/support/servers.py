"""Fixtures and helpers of the service and end-to-end tests: a fresh Postgres database migrated by Alembic,
Redis db 15, the API under TestClient.

Nothing is mocked: Postgres at 127.0.0.1:5432 and Redis at 127.0.0.1:6379 must be running (override with
``RSAE_TEST_POSTGRES`` = a libpq DSN of a database the test user may connect to, and
``RSAE_TEST_REDIS`` = a Redis URL without the db number). Unreachable servers fail the run.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from service.app import create_app
from service.config import Settings, get_settings
from service.db import get_sessionmaker
from service.migrate import upgrade

PG_ADMIN_DSN = os.environ.get("RSAE_TEST_POSTGRES", "host=127.0.0.1 port=5432 user=postgres dbname=test")
REDIS_URL = os.environ.get("RSAE_TEST_REDIS", "redis://127.0.0.1:6379").rstrip("/")
API_REDIS_DB = 15
"""Redis database of the API tests (flushed around each test)."""
E2E_REDIS_DB = 14
"""Redis database of the end-to-end tests."""


def redis_client(db: int) -> redis.Redis:
    """A client for Redis database ``db``; fails the test run if Redis is unreachable."""
    r = redis.Redis.from_url(f"{REDIS_URL}/{db}", socket_connect_timeout=3)
    try:
        r.ping()
    except redis.RedisError as e:
        pytest.fail(
            f"Redis at {REDIS_URL} is unreachable ({e}); the tests need a real Redis (redis-server) running",
            pytrace=False,
        )
    return r


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh Postgres database ``rsae_test_<random>``, migrated to head by Alembic; dropped afterwards."""
    try:
        admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        pytest.fail(
            f"PostgreSQL is unreachable with DSN {PG_ADMIN_DSN!r} ({e}); the tests need a real "
            "Postgres (set RSAE_TEST_POSTGRES to another DSN)",
            pytrace=False,
        )
    info = admin.info
    name = f"rsae_test_{secrets.token_hex(4)}"
    admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url("postgresql+psycopg://").set(
        username=info.user, password=info.password or None, host=info.host, port=info.port, database=name
    )
    url_str = url.render_as_string(hide_password=False)
    try:
        upgrade(url_str, wait_seconds=10)
        yield url_str
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def db(database_url: str) -> Iterator[Session]:
    """A session on the test database, for arranging and inspecting rows directly."""
    with get_sessionmaker(database_url)() as session:
        yield session


@pytest.fixture
def clean_db(database_url: str) -> None:
    """Empty every table (the schema stays)."""
    with get_sessionmaker(database_url).begin() as s:
        s.execute(text("TRUNCATE job_events, artifacts, jobs, saes, api_tokens, users RESTART IDENTITY CASCADE"))


def _flushed_redis(db: int) -> Iterator[redis.Redis]:
    r = redis_client(db)
    r.flushdb()
    yield r
    r.flushdb()


@pytest.fixture
def broker() -> Iterator[redis.Redis]:
    """Redis db 15, the API tests' broker, flushed before and after the test."""
    yield from _flushed_redis(API_REDIS_DB)


@pytest.fixture
def e2e_broker_url() -> Iterator[str]:
    """URL of Redis db 14, the end-to-end tests' broker, flushed before and after the test."""
    for _ in _flushed_redis(E2E_REDIS_DB):
        yield f"{REDIS_URL}/{E2E_REDIS_DB}"


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, database_url: str) -> Iterator[Settings]:
    """Service settings of one test: the test database, Redis db 15, a temp data dir (via ``RSAE_*``)."""
    monkeypatch.setenv("RSAE_DATABASE_URL", database_url)
    monkeypatch.setenv("RSAE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RSAE_BROKER_URL", f"{REDIS_URL}/{API_REDIS_DB}")
    for var in (
        "RSAE_ARTIFACTS_DIR",
        "RSAE_UPLOADS_DIR",
        "RSAE_WORK_DIR",
        "RSAE_ALLOW_LOCAL_PATHS",
        "RSAE_MAX_UPLOAD_BYTES",
        "RSAE_PAGE_SIZE_MAX",
    ):
        monkeypatch.delenv(var, raising=False)
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture(params=["postgres", "sqlite"])
def backend(
    request: pytest.FixtureRequest, settings: Settings, clean_db: None, broker: redis.Redis, tmp_path: Path
) -> Settings:
    """The test settings on Postgres (the emptied test database) or on a fresh migrated SQLite file."""
    if request.param == "postgres":
        return settings
    url = f"sqlite:///{tmp_path / 'rsae.db'}"
    upgrade(url)
    return settings.model_copy(update={"database_url": url})


def make_token(database_url: str, user: str = "alice") -> str:
    """A new API token of ``user`` (created if missing), straight in the database as the CLI does."""
    from service.auth import issue_token

    with get_sessionmaker(database_url).begin() as s:
        return issue_token(s, user, "tests").token


def queued_job(database_url: str, user: str = "alice") -> str:
    """A queued job of ``user`` (created with a token if missing) written straight to the database; its id."""
    from sqlalchemy import select

    from service.models import Job, User

    with get_sessionmaker(database_url)() as s:
        missing = s.scalar(select(User.id).where(User.name == user)) is None
    if missing:
        make_token(database_url, user)
    with get_sessionmaker(database_url).begin() as s:
        owner = s.scalar(select(User.id).where(User.name == user))
        job = Job(status="queued", progress=0.0, attempt=0, request={"model": "smollm2-135m"}, owner_id=owner)
        s.add(job)
        s.flush()
        return job.id


def bearer(token: str) -> dict[str, str]:
    """The ``Authorization`` header for ``token``."""
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def api_token(database_url: str, clean_db: None) -> str:
    """A bearer token of user ``alice`` on the (emptied) test database."""
    return make_token(database_url, "alice")


@pytest.fixture
def client(settings: Settings, api_token: str, broker: redis.Redis) -> Iterator[TestClient]:
    """The API (``create_app()`` from the environment) on an empty database and an empty broker,
    authenticated as ``alice`` (the ``Authorization`` header is sent with every request)."""
    with TestClient(create_app(), headers=bearer(api_token)) as c:
        yield c


@pytest.fixture
def other_client(settings: Settings, client: TestClient, database_url: str) -> Iterator[TestClient]:
    """The same API as ``client``, authenticated as another user, ``mallory``."""
    with TestClient(client.app, headers=bearer(make_token(database_url, "mallory"))) as c:
        yield c


@pytest.fixture
def sae_id(client: TestClient, make_teacher: Callable[..., Path]) -> str:
    """Id of a small teacher uploaded by ``alice`` through the API."""
    from service.client import upload_sae

    return upload_sae(client, make_teacher())["id"]


@pytest.fixture
def make_teacher(tmp_path: Path) -> Callable[..., Path]:
    """``make_teacher(name="teacher", d_in=576, d_sae=64, seed=0)``: write a small valid ReLU teacher SAE
    (SAELens layout) to ``tmp_path/name`` and return the folder."""
    import torch

    from rsae.saes import ReLUSAE

    def make(name: str = "teacher", *, d_in: int = 576, d_sae: int = 64, seed: int = 0) -> Path:
        sae = ReLUSAE(d_in=d_in, d_sae=d_sae)
        sae.init_weights(torch.Generator().manual_seed(seed))
        return sae.save(tmp_path / name)

    return make


# -- request helpers shared by the API test files (``from support.servers import ...``) ---------
PROBLEM = "application/problem+json"


def assert_problem(r: Any, status: int, *, field: str | None = None, code: str | None = None) -> dict:
    """Check an RFC 9457 problem response and return its body."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert {"type", "title", "status", "detail", "code", "field"} <= body.keys()
    assert body["status"] == status and body["detail"]
    if field is not None:
        assert body["field"] == field, body
    if code is not None:
        assert body["code"] == code, body
    return body


def post_sae(client: TestClient, cfg: bytes, weights: bytes, **data: str) -> Any:
    """POST /saes with raw file contents."""
    files = {
        "cfg": ("cfg.json", cfg, "application/json"),
        "weights": ("sae_weights.safetensors", weights, "application/octet-stream"),
    }
    return client.post("/v1/saes", files=files, data=data or None)


def job_body(sae_id: str, **settings: Any) -> dict[str, Any]:
    """A minimal valid POST /jobs body."""
    return {"model": "smollm2-135m", "layer": 3, "teacher": {"sae_id": sae_id}, "settings": settings}


def queued_messages(broker: redis.Redis, queue: str = "gpu") -> list[tuple[str, list]]:
    """(task name, args) of every message waiting in the Celery queue ``queue``."""
    out = []
    for raw in broker.lrange(queue, 0, -1):
        msg = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(msg["body"]))
        out.append((msg["headers"]["task"], args))
    return out


@contextmanager
def served(settings: Settings) -> Iterator[str]:
    """The API for ``settings`` under uvicorn on a free loopback port; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
