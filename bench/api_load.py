"""Benchmark 5 (issue 14): the API's latency and throughput under a real load generator, on loopback.

    .venv/bin/python -m bench.api_load                       # SQLite and Postgres, rates 50-400/s, 10 s each
    .venv/bin/python -m bench.api_load --quick               # smoke test (~40 s): a few short runs
    .venv/bin/python -m bench.api_load --baseline 6b9a875    # also the API of that commit, interleaved
    .venv/bin/python -m bench.api_load --backends sqlite --seconds 5 --rates 100,200 --json out.json

What runs: ``rsae-service serve`` (one uvicorn process, the production entry point and defaults) on a fresh
database (a SQLite file, or a new Postgres database ``rsae_bench_<hex>`` dropped afterwards), migrated by
Alembic, with one user, a token, an uploaded teacher and a queued job. `locust <https://locust.io>`_ (headless,
``FastHttpUser``, one kept-alive connection per simulated user; ``bench/locust_api.py``) then sends, one
scenario at a time:

- ``GET /jobs/{id}`` (authenticated), ``POST /jobs`` (authenticated, creates a job and publishes its Celery
  message), ``GET /healthz`` (no authentication, no database) at fixed rates (50, 100, 200, 400 per second:
  ``rate / 5`` users, each at 5 requests/s), and a saturation run (8 users back to back) for the two GETs;
- each with no other traffic and with 100 open event streams (``GET /v1/jobs/{id}/events``, ``text/event-stream``,
  held by a second process) of the same user on the same job.

Each row reports the achieved throughput (requests/s over the measured window), p50/p90/p99/max latency (ms,
exact, from locust's raw samples; the first second of each run is ramp-up and is dropped) and the errors
(status other than expected, or transport errors). ``--baseline REF`` starts a second API from ``git archive
REF`` of this repository and runs every scenario against both, alternately, in the same run (same database,
same load generator), so before/after figures share the machine's load.

The bench user's limits are raised so that they do not shape the result: active jobs and storage quota (POST
/jobs creates thousands of jobs; a thread marks them ``cancelled`` every 0.1 s during the run and again after it,
as finishing jobs would, so that the quota and storage checks read about as many unfinished jobs as a real user
has, at most 20),
the submission rate limits (still counted in Redis, at 10^6/minute) and the per-user stream cap (128).

Servers: Postgres from ``RSAE_BENCH_POSTGRES`` (libpq DSN of an admin connection, default
``host=127.0.0.1 port=5432 user=postgres dbname=postgres``), Redis from ``RSAE_BENCH_REDIS`` (default
``redis://127.0.0.1:6379``; database 13 is flushed before and after). A backend whose server is unreachable is
reported as skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).with_name("locust_api.py")
RATES = (50, 100, 200, 400)
"""Request rates (per second) of the fixed-rate runs."""
USER_RATE = 5.0
"""Requests per second of one simulated user in the fixed-rate runs (so ``rate / USER_RATE`` connections)."""
SATURATION_USERS = 8
"""Connections sending back to back in the saturation runs."""
STREAMS = 100
"""Event streams held open alongside, in the runs "with streams"."""
RAMP_SECONDS = 1.0
"""Samples sent in the first second of a run are dropped (locust spawns its users during it)."""
REDIS_DB = 13
PG_ADMIN_DSN = os.environ.get("RSAE_BENCH_POSTGRES", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
REDIS_URL = os.environ.get("RSAE_BENCH_REDIS", "redis://127.0.0.1:6379").rstrip("/")
LOCUST_PYTHON = os.environ.get("RSAE_BENCH_LOCUST_PYTHON") or sys.executable
"""The interpreter that runs locust (``RSAE_BENCH_LOCUST_PYTHON``; default this one, with the ``bench`` extra):
locust and gevent may live in a virtual environment of their own, apart from the service's."""


# -- the servers -----------------------------------------------------------------------------------
@contextlib.contextmanager
def database(backend: str, tmp: Path) -> Iterator[str]:
    """A fresh, migrated database: a SQLite file under ``tmp``, or a new Postgres database (dropped afterwards).

    Yields:
        Its SQLAlchemy URL.

    Raises:
        psycopg.OperationalError: Postgres unreachable.
    """
    from service.migrate import upgrade

    if backend == "sqlite":
        url = f"sqlite:///{tmp / 'bench.db'}"
        upgrade(url, wait_seconds=5)
        yield url
        return
    import psycopg
    from sqlalchemy.engine import make_url

    admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5)
    name = f"rsae_bench_{secrets.token_hex(4)}"
    admin.execute(f'CREATE DATABASE "{name}"')
    info = admin.info
    url = make_url("postgresql+psycopg://").set(
        username=info.user, password=info.password or None, host=info.host, port=info.port, database=name
    )
    try:
        url_str = url.render_as_string(hide_password=False)
        upgrade(url_str, wait_seconds=10)
        yield url_str
    finally:
        from service.db import get_engine

        with contextlib.suppress(Exception):
            get_engine(url_str).dispose()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Api:
    """A running API process: its base URL, pid, the code it runs (``label``) and the log file."""

    url: str
    process: subprocess.Popen
    label: str
    log: Path

    @property
    def pid(self) -> int:
        """Process id of the uvicorn process (for ``py-spy dump --pid``)."""
        return self.process.pid


def bench_env(db_url: str, data_dir: Path) -> dict[str, str]:
    """The ``RSAE_*`` environment of the bench's API processes (limits raised, see the module docstring)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RSAE_")}
    env.update(
        RSAE_DATABASE_URL=db_url,
        RSAE_DATA_DIR=str(data_dir),
        RSAE_BROKER_URL=f"{REDIS_URL}/{REDIS_DB}",
        RSAE_MAX_ACTIVE_JOBS_PER_USER=str(10**9),
        RSAE_MAX_STORAGE_BYTES_PER_USER=str(2**62),
        RSAE_RATE_LIMIT_SUBMISSIONS_PER_TOKEN="1000000/minute",
        RSAE_RATE_LIMIT_SUBMISSIONS_PER_ADDRESS="1000000/minute",
        RSAE_MAX_STREAMS_PER_USER=str(STREAMS + 28),
        RSAE_MAX_CONCURRENCY="2000",
    )
    return env


@contextlib.contextmanager
def api_process(env: dict[str, str], code_root: Path, label: str, tmp: Path) -> Iterator[Api]:
    """``rsae-service serve --no-migrate`` of the code under ``code_root`` on a free loopback port.

    Raises:
        RuntimeError: it did not answer ``/healthz`` within 60 s (the log's tail is in the message).
    """
    import httpx

    port = _free_port()
    log = tmp / f"api-{label}-{port}.log"
    cmd = [sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main())"]
    cmd += ["serve", "--no-migrate", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=code_root, env={**env, "PYTHONPATH": str(code_root)}, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"API {label} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield Api(url, proc, label, log)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Fixture:
    """What the load runs use: tokens, the queued job everyone reads, the POST /jobs body."""

    token: str
    job_id: str
    job_body: dict[str, Any]
    db_url: str


def arrange(db_url: str, api_url: str, tmp: Path) -> Fixture:
    """Create the bench user ``bench`` and its token, upload a small teacher through the API
    (d_in 576, d_sae 64) and create the queued job through ``POST /jobs``."""
    import httpx
    import torch

    from rsae.saes import ReLUSAE
    from service.auth import issue_token
    from service.client import submit_job, upload_sae
    from service.db import get_sessionmaker

    with get_sessionmaker(db_url).begin() as s:
        token = issue_token(s, "bench", "bench").token
    sae = ReLUSAE(d_in=576, d_sae=64)
    sae.init_weights(torch.Generator().manual_seed(0))
    folder = sae.save(tmp / "teacher")
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        sae_id = upload_sae(http, folder)["id"]
        body = {"model": "smollm2-135m", "layer": 3, "teacher": {"sae_id": sae_id}, "settings": {}}
        job_id = submit_job(http, body)["id"]
    return Fixture(token, job_id, body, db_url)


def cancel_bench_jobs(fx: Fixture) -> int:
    """Mark every queued job but the fixture's ``cancelled`` (keeps POST /jobs' quota count small); returns
    how many."""
    from sqlalchemy import update

    from service.db import get_sessionmaker
    from service.models import Job

    with get_sessionmaker(fx.db_url).begin() as s:
        q = update(Job).where(Job.status == "queued", Job.id != fx.job_id).values(status="cancelled")
        return s.execute(q).rowcount


@contextlib.contextmanager
def cancelling(fx: Fixture, on: bool, every_s: float = 0.1) -> Iterator[None]:
    """While ``on``, a thread marks the jobs POST /jobs creates ``cancelled`` every ``every_s`` seconds, as
    finishing jobs would: the quota and storage checks of POST /jobs read the user's unfinished jobs, which a
    real user holds at most ``RSAE_MAX_ACTIVE_JOBS_PER_USER`` (20) of, not thousands."""
    if not on:
        yield
        return
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            with contextlib.suppress(Exception):  # a locked SQLite: next time
                cancel_bench_jobs(fx)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


# -- event streams held alongside ------------------------------------------------------------------
async def _hold_streams(url: str, token: str, job_id: str, n: int) -> None:
    """Open ``n`` event streams at once, print one JSON line (how many opened, the failures by status, the
    seconds it took), then hold the open ones until stdin closes."""
    import httpx

    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=0)
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
    settled = asyncio.Semaphore(0)
    outcomes: list[str] = []

    async def hold(client: httpx.AsyncClient) -> None:
        try:
            async with client.stream("GET", f"/jobs/{job_id}/events", headers=headers) as r:
                chunks = r.aiter_raw()
                await chunks.__anext__()
                outcomes.append(str(r.status_code))
                settled.release()
                if r.status_code == 200:
                    async for _ in chunks:
                        pass
        except Exception as e:  # noqa: BLE001 - counted as a failure
            outcomes.append(type(e).__name__)
            settled.release()

    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(60, read=None)) as client:
        tasks = [asyncio.create_task(hold(client)) for _ in range(n)]
        for _ in range(n):
            await asyncio.wait_for(settled.acquire(), 180)
        failed = {k: outcomes.count(k) for k in sorted(set(outcomes)) if k != "200"}
        info = {"streams_open": outcomes.count("200"), "stream_failures": failed, "streams_open_s": 0.0}
        info["streams_open_s"] = round(time.monotonic() - t0, 2)
        print(json.dumps(info), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
        for t in tasks:
            t.cancel()


@contextlib.contextmanager
def streams(api: Api, fx: Fixture, n: int, prefix: str = "/v1") -> Iterator[dict[str, Any]]:
    """``n`` event streams of the bench user on the fixture's job, opened at once and held open by a child
    process.

    Yields:
        ``{"streams_open", "stream_failures" (status or exception name -> count), "streams_open_s"}``.
    """
    if n <= 0:
        yield {}
        return
    cmd = [sys.executable, "-m", "bench.api_load", "--hold-streams", api.url + prefix, fx.token, fx.job_id, str(n)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the stream holder died (rc {proc.wait()})")
        yield json.loads(line)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- one load run ----------------------------------------------------------------------------------
@dataclass
class Scenario:
    """One kind of request: ``name``, method, path, body, token and the expected status."""

    name: str
    method: str
    path: str
    expect: int
    token: str | None = None
    body: dict[str, Any] | None = None


def api_prefix(url: str) -> str:
    """The resource path prefix of the API at ``url``: ``/v1`` when its OpenAPI schema has versioned routes
    (current code), else ``""`` (a ``--baseline`` ref from before the routes moved under ``/v1``)."""
    import httpx

    paths = httpx.get(f"{url}/openapi.json", timeout=30).json()["paths"]
    return "/v1" if any(p.startswith("/v1/") for p in paths) else ""


def scenarios(fx: Fixture, prefix: str = "/v1") -> dict[str, Scenario]:
    """The requests of the benchmark: ``get_job``, ``post_job``, ``healthz`` (resource paths under ``prefix``)."""
    return {
        "get_job": Scenario("get_job", "GET", f"{prefix}/jobs/{fx.job_id}", 200, fx.token),
        "post_job": Scenario("post_job", "POST", f"{prefix}/jobs", 202, fx.token, fx.job_body),
        "healthz": Scenario("healthz", "GET", "/healthz", 200),
    }


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values`` by the nearest-rank method; None if empty."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def load(api: Api, sc: Scenario, rate: float | None, seconds: float, tmp: Path) -> dict[str, Any]:
    """Drive ``sc`` against ``api`` for ``seconds`` (+ the ramp) with locust at ``rate`` requests/s, or back to
    back with :data:`SATURATION_USERS` connections when ``rate`` is None.

    Returns:
        ``{"throughput_rps", "p50_ms", "p90_ms", "p99_ms", "max_ms", "requests", "errors", "error_sample"}``
        over the samples sent after the ramp-up, and ``server_cpu_ms_per_req``: CPU seconds the API process
        used during the run over the requests sent (user + system; includes the ramp and any stream polling).
    """
    users = SATURATION_USERS if rate is None else max(1, round(rate / USER_RATE))
    user_rate = 0.0 if rate is None else rate / users
    out = tmp / f"samples-{secrets.token_hex(4)}.json"
    env = {
        **os.environ,
        "BENCH_METHOD": sc.method,
        "BENCH_PATH": sc.path,
        "BENCH_BODY": json.dumps(sc.body) if sc.body is not None else "",
        "BENCH_TOKEN": sc.token or "",
        "BENCH_EXPECT": str(sc.expect),
        "BENCH_USER_RATE": str(user_rate),
        "BENCH_OUT": str(out),
    }
    run_s = seconds + RAMP_SECONDS
    cmd = [LOCUST_PYTHON, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary", "--skip-log"]
    cmd += ["-u", str(users), "-r", str(max(users, 1) / (RAMP_SECONDS * 0.8)), "-t", f"{math.ceil(run_s)}s"]
    cmd += ["--host", api.url, "--stop-timeout", "5", "--exit-code-on-error", "0"]
    started = time.time()
    server = psutil.Process(api.pid)
    cpu0 = sum(server.cpu_times()[:2])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=run_s + 60)
    server_cpu_s = sum(server.cpu_times()[:2]) - cpu0
    if not out.exists():
        raise RuntimeError(f"locust wrote no samples (rc {done.returncode}): {done.stderr[-2000:]}")
    samples = json.loads(out.read_text())
    out.unlink()
    t0 = min((s[0] for s in samples), default=started) + RAMP_SECONDS
    kept = [s for s in samples if s[0] >= t0]
    window = max((s[0] + s[1] / 1000 for s in kept), default=t0) - t0
    lat = [s[1] for s in kept]
    errors = [s for s in kept if s[3] is not None or s[2] != sc.expect]
    return {
        "throughput_rps": round(len(kept) / window, 1) if window > 0 else 0.0,
        "p50_ms": _r(percentile(lat, 50)),
        "p90_ms": _r(percentile(lat, 90)),
        "p99_ms": _r(percentile(lat, 99)),
        "max_ms": _r(max(lat, default=None)),
        "requests": len(kept),
        # CPU time of the API process per request (all samples, ramp included, and the streams' polling): the
        # steadiest figure on a busy machine; one process serves at most about 1000 / this requests per second
        "server_cpu_ms_per_req": round(1000 * server_cpu_s / len(samples), 3) if samples else None,
        "errors": len(errors),
        "error_sample": (errors[0][3] or f"status {errors[0][2]}") if errors else None,
    }


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


# -- the benchmark ---------------------------------------------------------------------------------
@dataclass
class Plan:
    """What to run: backends, scenarios, rates (None = saturation), stream counts, seconds per run."""

    backends: Sequence[str] = ("sqlite", "postgres")
    runs: Sequence[tuple[str, float | None]] = field(default_factory=list)
    stream_counts: Sequence[int] = (0, STREAMS)
    seconds: float = 10.0


def full_plan(rates: Sequence[float] = RATES, seconds: float = 10.0) -> Plan:
    """Every scenario at every rate, plus saturation of the two GETs, with and without streams."""
    runs: list[tuple[str, float | None]] = [("healthz", None), ("get_job", None)]
    runs += [(name, float(rate)) for rate in rates for name in ("get_job", "post_job", "healthz")]
    return Plan(runs=runs, seconds=seconds)


def targets_plan(seconds: float = 10.0) -> Plan:
    """Only the runs the issue's targets read: saturation of both GETs and GET /jobs/{id} at 200/s, without and
    with 100 streams (full-size runs, about a third of :func:`full_plan`)."""
    return Plan(runs=[("healthz", None), ("get_job", None), ("get_job", 200.0)], seconds=seconds)


def quick_plan() -> Plan:
    """The smoke test: saturation of both GETs and GET /jobs/{id} at 50/s, with 100 streams, 1.5 s each."""
    return Plan(runs=[("healthz", None), ("get_job", None), ("get_job", 50.0)], stream_counts=(STREAMS,), seconds=1.5)


def _git_export(ref: str, dest: Path) -> Path:
    """The tree of commit ``ref`` of this repository, extracted under ``dest``."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def _redis_flush() -> None:
    import redis

    redis.Redis.from_url(f"{REDIS_URL}/{REDIS_DB}", socket_connect_timeout=3).flushdb()


def run_backend(backend: str, plan: Plan, baseline: str | None, tmp: Path, echo: bool = True) -> list[dict]:
    """All runs of ``plan`` on one database backend (and, with ``baseline``, against both APIs alternately)."""
    rows: list[dict] = []
    tmp.mkdir(parents=True, exist_ok=True)
    codes = [("current", ROOT)]
    if baseline is not None:
        codes.insert(0, (f"baseline@{baseline}", _git_export(baseline, tmp / f"baseline-{backend}")))
    with database(backend, tmp) as db_url, contextlib.ExitStack() as stack:
        env = bench_env(db_url, tmp / f"data-{backend}")
        apis = [stack.enter_context(api_process(env, root, label, tmp)) for label, root in codes]
        fx = arrange(db_url, apis[-1].url, tmp)
        prefixes = {api.label: api_prefix(api.url) for api in apis}
        for n_streams in plan.stream_counts:
            for name, rate in plan.runs:
                for api in apis:
                    case = scenarios(fx, prefixes[api.label])[name]
                    with streams(api, fx, n_streams, prefixes[api.label]) as opened, cancelling(fx, name == "post_job"):
                        r = load(api, case, rate, plan.seconds, tmp)
                    cancel_bench_jobs(fx)
                    row = {
                        "bench": "api_load",
                        "backend": backend,
                        "code": api.label,
                        "endpoint": name,
                        "rate_rps": rate,
                        "streams": n_streams,
                        "seconds": plan.seconds,
                        **r,
                        **opened,
                    }
                    rows.append(row)
                    if echo:
                        print(json.dumps(row), flush=True)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per (backend, code, streams): saturation throughput of GET /jobs/{id} over /healthz's (target >= 0.5)."""
    out = []
    rows = [r for r in rows if "code" in r]
    keys = {(r["backend"], r["code"], r["streams"]) for r in rows}
    for backend, code, n in sorted(keys):
        sat = {
            r["endpoint"]: r["throughput_rps"]
            for r in rows
            if (r["backend"], r["code"], r["streams"]) == (backend, code, n) and r["rate_rps"] is None
        }
        if sat.get("healthz") and "get_job" in sat:
            out.append(
                {
                    "bench": "api_load_summary",
                    "backend": backend,
                    "code": code,
                    "streams": n,
                    "get_job_over_healthz": round(sat["get_job"] / sat["healthz"], 3),
                }
            )
    return out


def run(quick: bool = False, *, plan: Plan | None = None, baseline: str | None = None) -> list[dict]:
    """Run benchmark 5 and return one dict per run (see :func:`load` for the figures) plus summary rows.

    Args:
        quick: the smoke test (:func:`quick_plan`, about 40 s) instead of :func:`full_plan` (about 15 min).
        plan: overrides the plan.
        baseline: a git ref whose API also runs, interleaved (before/after in one run).

    A backend whose server (Postgres, Redis) is unreachable gives one row with ``skipped`` and the reason.
    """
    if not _has_locust():  # the `bench` extra: pip install -e ".[bench]"
        return [{"bench": "api_load", "skipped": "locust is not installed (pip install -e '.[bench]')"}]
    plan = plan or (quick_plan() if quick else full_plan())
    rows: list[dict] = []
    keep = os.environ.get("RSAE_BENCH_KEEP")  # a folder: keep the logs and databases there
    with tempfile.TemporaryDirectory(prefix="rsae-api-load-") as d:
        tmp = Path(keep or d)
        try:
            _redis_flush()
        except Exception as e:  # noqa: BLE001 - report, do not crash run_all
            return [{"bench": "api_load", "skipped": f"Redis at {REDIS_URL} unreachable: {e}"}]
        for backend in plan.backends:
            try:
                rows += run_backend(backend, plan, baseline, tmp / backend)
            except Exception as e:  # noqa: BLE001 - e.g. Postgres unreachable
                rows.append({"bench": "api_load", "backend": backend, "skipped": f"{type(e).__name__}: {e}"})
        with contextlib.suppress(Exception):
            _redis_flush()
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows + summarize(rows)


def _has_locust() -> bool:
    """Whether :data:`LOCUST_PYTHON` can import locust."""
    if LOCUST_PYTHON == sys.executable:
        return importlib.util.find_spec("locust") is not None
    probe = [LOCUST_PYTHON, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('locust') is None)"]
    try:
        return subprocess.run(probe, capture_output=True).returncode == 0
    except OSError:  # no such interpreter
        return False


def machine() -> dict[str, Any]:
    """The machine and versions the figures were taken on."""
    from importlib.metadata import version  # (importing locust here would monkey-patch this process)

    packages = ("fastapi", "uvicorn", "sqlalchemy", "psycopg", "redis", "limits")
    probe = [LOCUST_PYTHON, "-c", "from importlib.metadata import version; print(version('locust'))"]
    locust = subprocess.run(probe, capture_output=True, text=True).stdout.strip() or None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        **{p: version(p) for p in packages},
        "locust": locust,
    }


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: a few 1.5 s runs")
    p.add_argument("--backends", default="sqlite,postgres")
    p.add_argument("--rates", default=",".join(map(str, RATES)), help="fixed request rates per second")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run (after 1 s ramp-up)")
    p.add_argument("--streams", default=f"0,{STREAMS}", help="open event streams alongside, comma list")
    p.add_argument("--endpoints", default="get_job,post_job,healthz", help="fixed-rate scenarios")
    p.add_argument("--no-saturation", action="store_true", help="skip the back-to-back runs")
    p.add_argument("--baseline", help="git ref whose API also runs, interleaved with the current code")
    p.add_argument("--json", type=Path, help="also write the rows and the machine to this file")
    p.add_argument("--hold-streams", nargs=4, metavar=("URL", "TOKEN", "JOB", "N"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.hold_streams:
        url, token, job, n = a.hold_streams
        asyncio.run(_hold_streams(url, token, job, int(n)))
        return 0
    if a.quick:
        plan = quick_plan()
    else:
        runs: list[tuple[str, float | None]] = [] if a.no_saturation else [("healthz", None), ("get_job", None)]
        runs += [(e, float(r)) for r in a.rates.split(",") if r for e in a.endpoints.split(",") if e]
        plan = Plan(runs=runs, stream_counts=[int(s) for s in a.streams.split(",")], seconds=a.seconds)
    plan.backends = [b for b in a.backends.split(",") if b]
    rows = run(a.quick, plan=plan, baseline=a.baseline)
    for r in rows:
        if r.get("bench") != "api_load" or "skipped" in r:
            print(json.dumps(r))
    if a.json:
        a.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
