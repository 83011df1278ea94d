"""Fixtures of the end-to-end tests (``tests/support/servers.py``; the running stack, its settings and an HTTP
client of it) and the log-tail hook of the running stack."""

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.config import Settings
from service.embedded import Stack
from support.servers import *  # noqa: F403 - pytest finds fixtures among a conftest's names
from support.servers import bearer


@pytest.fixture
def e2e_settings(
    database_url: str, clean_db: None, e2e_broker_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The stack's settings: test Postgres, Redis db 14, a temp data dir; webhooks to 127.0.0.1 allowed, on
    one free port (``webhook_allowed_ports[0]``, for a :class:`support.webhooks.Receiver`), through the
    environment the stack's processes inherit."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("RSAE_WEBHOOK_ALLOWED_HOSTS", '["127.0.0.1"]')
    monkeypatch.setenv("RSAE_WEBHOOK_ALLOWED_PORTS", f"[{port}]")
    monkeypatch.setenv("RSAE_WEBHOOK_ALLOWED_NETWORKS", '["127.0.0.1/32"]')
    return Settings(database_url=database_url, broker_url=e2e_broker_url, data_dir=tmp_path / "data")


@pytest.fixture
def stack(e2e_settings: Settings, tmp_path: Path) -> Iterator[Stack]:
    """uvicorn + Celery worker + encode worker subprocesses (logs in ``tmp_path/logs``, tails shown on failure)."""
    with Stack(e2e_settings, port=0, log_dir=tmp_path / "logs", ready_timeout=120) as s:
        yield s


@pytest.fixture
def http(stack: Stack, api_token: str) -> Iterator[httpx.Client]:
    """An HTTP client for the stack's API, authenticated as ``alice``."""
    with httpx.Client(base_url=stack.base_url, timeout=60, headers=bearer(api_token)) as c:
        yield c


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    """Attach the tails of the e2e stack's subprocess logs to a failing test's report."""
    rep = yield
    stack = getattr(item, "funcargs", {}).get("stack")
    if rep.failed and stack is not None:
        rep.sections.append(("subprocess logs (last lines)", stack.log_tails()))
    return rep
