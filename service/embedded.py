"""The embedded single-machine stack: an own ``redis-server`` when no broker is configured, the migrated
database, one Celery worker subprocess, one encode worker subprocess (queue ``encode``) and one uvicorn subprocess.

Used by ``rsae-service up`` and ``demo`` and by the end-to-end tests. Children run in their own process
groups, so Ctrl-C reaches only this process, which then stops them in order (API, worker, Redis).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx
import redis

from .config import ConfigError, Settings
from .migrate import upgrade

log = logging.getLogger(__name__)

STOP_TIMEOUT = 15.0
"""Seconds a child gets to exit after SIGTERM before its process group is killed."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    *,
    interval: float = 0.2,
    alive: Callable[[], None] | None = None,
) -> None:
    """Poll ``check`` until it returns True; ``alive`` may raise to abort early.

    Raises:
        TimeoutError: naming ``what`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            alive()
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f} s")
        time.sleep(interval)


class Child:
    """A subprocess in its own process group, its output to a log file or inherited.

    Args:
        name: label for messages and the log file name.
        argv: command line.
        env: full environment.
        log_dir: folder for ``<name>.log``; None inherits this process's stdout/stderr.
    """

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log_dir: Path | None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log" if log_dir is not None else None
        self._log: IO[bytes] | None = open(self.log_path, "ab") if self.log_path else None
        self.proc = subprocess.Popen(
            argv,
            env=dict(env),
            stdout=self._log,
            stderr=subprocess.STDOUT if self._log else None,
            start_new_session=True,
        )
        log.info("started %s (pid %d): %s", name, self.proc.pid, " ".join(argv))

    def check(self) -> None:
        """Raise RuntimeError if the process has exited."""
        code = self.proc.poll()
        if code is not None:
            where = f"; log: {self.log_path}\n{self.tail()}" if self.log_path else ""
            raise RuntimeError(f"{self.name} exited with code {code}{where}")

    def tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the log file ('' when output is inherited)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the process, then SIGKILL its whole group after ``timeout`` seconds."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", self.name, timeout)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftovers (prefork pool children)
        except ProcessLookupError:
            pass
        self.proc.wait()
        if self._log is not None:
            self._log.close()


def start_redis(data_dir: Path, log_dir: Path | None = None, attempts: int = 3) -> tuple[Child, str]:
    """Start ``redis-server`` (from PATH) on a free localhost port without persistence; wait for PING.

    Returns:
        The child and its URL (``redis://127.0.0.1:<port>/0``).
    """
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError(
            "redis-server is not on PATH: install Redis (apt-get install redis-server) or "
            "set RSAE_BROKER_URL to a running Redis"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(attempts):
        port = free_port()
        child = Child(
            "redis",
            [
                exe,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(data_dir),
            ],
            os.environ,
            log_dir,
        )
        url = f"redis://127.0.0.1:{port}/0"
        try:
            wait_until(
                lambda: redis.Redis.from_url(url, socket_timeout=1).ping(), 10, "redis-server", alive=child.check
            )
            return child, url
        except (RuntimeError, TimeoutError):
            child.stop()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
"""Bind addresses that only this machine can reach."""


def check_local_paths_exposure(host: str, settings: Settings) -> None:
    """Refuse server-side paths in the embedded stack unless it serves one user on this machine: it binds to
    loopback, ``local_path_roots`` is set, and at most one user holds an unrevoked API token (checked at
    start; tokens made later are the operator's responsibility).

    Raises:
        ConfigError: naming what is missing.
    """
    from sqlalchemy import func, select

    from .db import get_sessionmaker
    from .models import ApiToken

    if host not in LOOPBACK_HOSTS:
        raise ConfigError(
            f"server-side paths (RSAE_ALLOW_LOCAL_PATHS / --local-paths) are for one user on this machine: "
            f"bind to 127.0.0.1, not {host!r}, or turn them off"
        )
    if not settings.local_path_roots:
        raise ConfigError(
            "server-side paths need RSAE_LOCAL_PATH_ROOTS (a JSON list of absolute folders jobs may read)"
        )
    with get_sessionmaker(settings.database_url)() as s:
        users = s.scalar(select(func.count(func.distinct(ApiToken.user_id))).where(ApiToken.revoked_at.is_(None)))
    if users and users > 1:
        raise ConfigError(
            f"server-side paths are for one user, but {users} users hold API tokens; revoke the others "
            "('rsae-service token revoke') or turn local paths off"
        )


class Stack:
    """Broker, migrated database, worker, encode worker and API, as one context manager.

    Args:
        settings: the deployment; without ``broker_url`` an own redis-server is started.
        host, port: where uvicorn listens (port 0 picks a free one).
        log_dir: children's output files; None lets it through to this terminal.
        ready_timeout: seconds to wait for ``/readyz``.
        local_paths: accept server-side paths in job requests (also when ``settings.allow_local_paths``);
            only for one user on this machine: :func:`check_local_paths_exposure` refuses it otherwise.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        log_dir: Path | None = None,
        ready_timeout: float = 60.0,
        local_paths: bool = False,
    ) -> None:
        self.settings = settings
        self.local_paths = local_paths or settings.allow_local_paths
        self.host, self.port = host, port or free_port(host)
        self.log_dir = log_dir
        self.ready_timeout = ready_timeout
        self.children: list[Child] = []

    @property
    def base_url(self) -> str:
        """URL of the API."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def _env(self, broker_url: str) -> dict[str, str]:
        env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            RSAE_BROKER_URL=broker_url,
            RSAE_DATA_DIR=str(self.settings.data_dir),
            RSAE_DATABASE_URL=self.settings.database_url,
        )
        env["RSAE_ALLOW_LOCAL_PATHS"] = "true" if self.local_paths else "false"
        if self.local_paths:
            env["RSAE_LOCAL_PATH_ROOTS"] = json.dumps([str(r) for r in self.settings.local_path_roots])
        return env

    def __enter__(self) -> "Stack":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start everything and wait until ``/readyz`` answers 200."""
        self.settings.ensure_dirs()
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        broker = self.settings.broker_url
        if not broker:
            child, broker = start_redis(self.settings.data_dir / "redis", self.log_dir)
            self.children.append(child)
            log.info("embedded Redis at %s", broker)
        upgrade(self.settings.database_url)
        if self.local_paths:
            check_local_paths_exposure(self.host, self.settings)
        env = self._env(broker)
        cli = [sys.executable, "-m", "service.cli"]
        self.children.append(Child("worker", [*cli, "worker"], env, self.log_dir))
        self.children.append(Child("encode-worker", [*cli, "encode-worker"], env, self.log_dir))
        self.children.append(
            Child(
                "api", [*cli, "serve", "--no-migrate", "--host", self.host, "--port", str(self.port)], env, self.log_dir
            )
        )
        wait_until(
            lambda: httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200,
            self.ready_timeout,
            "API",
            alive=self.check,
        )

    def check(self) -> None:
        """Raise RuntimeError if a child has exited."""
        for c in self.children:
            c.check()

    def wait(self, interval: float = 1.0) -> None:
        """Block until a child exits (RuntimeError) or the caller is interrupted."""
        while True:
            self.check()
            time.sleep(interval)

    def log_tails(self, lines: int = 60) -> str:
        """The last lines of every child's log file."""
        return "\n".join(f"----- {c.name} ({c.log_path}) -----\n{c.tail(lines)}" for c in self.children if c.log_path)

    def stop(self) -> None:
        """Stop the children in reverse start order (API, encode worker, worker, Redis)."""
        while self.children:
            self.children.pop().stop()
