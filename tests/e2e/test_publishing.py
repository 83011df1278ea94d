"""Issue 11, durability: two-step publishing, cancels that arrive while packaging, leases by the database
clock, checkpoint fencing, database connection timeouts, Celery limits and a worker that survives a Redis
crash. Against the real Postgres, Redis and Celery worker (``tests/support/servers.py``); SQLite where it
behaves differently. Every test here runs in seconds: the pipeline is replaced by a stand-in that writes the
four artifact files (the code under test is what happens around it), and the worker's job fails at once on a
missing teacher (what is tested is that the worker claims it).

Run: ``pytest tests/e2e/test_publishing.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import test_durability
from sqlalchemy import event, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from test_durability import LEASE, Workers, check_single_artifact_set, get_job, insert_job, statuses

import worker.publish
import worker.tasks
from service.config import Settings
from service.db import DbTimeouts, db_now, get_engine, get_sessionmaker, make_engine
from service.embedded import Child, free_port, wait_until
from service.jobs import transition
from service.migrate import upgrade as migrate
from service.models import Job, utcnow
from service.queue import create_celery, enqueue_upgrade
from worker.lease import claim, is_transient_db_error, new_owner, reap_once

pytestmark = pytest.mark.e2e

dsettings, make_session, teacher = test_durability.dsettings, test_durability.make_session, test_durability.teacher
"""Fixtures shared with ``test_durability.py`` (short leases, the e2e Redis db, a small teacher)."""

REPORT = {"headline": {"fvu": 0.1, "l0": 12.0}, "metrics": {"rsae": {"fvu": 0.1}}}


FAKE_FILES = ("cfg.json", "report.json", "report.html", "sae_weights.safetensors")
"""The files of :func:`fake_run_upgrade`'s artifact folder."""


def fake_run_upgrade(on_package: Callable[[], None] | None = None) -> Callable[..., dict[str, Any]]:
    """A stand-in for ``rsae.pipeline.run_upgrade``: a checkpoint in the work dir, the four artifact files in
    ``out_dir``, then ``on_package()`` (e.g. a cancel arriving while packaging)."""

    def run(cfg: Any, out_dir: Path, *, work_dir: Path, **kwargs: Any) -> dict[str, Any]:
        (work_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (work_dir / "checkpoints" / "state.pt").write_bytes(b"checkpoint")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in FAKE_FILES:
            (out_dir / name).write_text(json.dumps({"file": name}))
        if on_package is not None:
            on_package()
        return REPORT

    return run


@pytest.fixture
def engine_of(dsettings: Settings):
    """The engine ``run_job`` uses (same URL and timeouts), to hook SQLAlchemy events on."""
    return get_engine(dsettings.database_url, DbTimeouts.from_settings(dsettings))


def fail_final_commit(engine: Any, exc: BaseException, times: int = 1) -> list[int]:
    """Make the commit of the transaction that sets a job ``succeeded`` raise ``exc`` (``times`` times), after
    the UPDATE ran: the real final commit fails. Returns a list that counts the injected failures."""
    state = {"final": False}
    fired: list[int] = []

    def on_execute(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if statement.lstrip().upper().startswith("UPDATE JOBS") and "succeeded" in repr(params):
            state["final"] = True

    def on_commit(conn: Any) -> None:
        if state["final"]:
            state["final"] = False
            if len(fired) < times:
                fired.append(1)
                raise exc

    for name, fn in (("before_cursor_execute", on_execute), ("commit", on_commit)):
        event.listen(engine, name, fn)
        _LISTENERS.append((engine, name, fn))
    return fired


_LISTENERS: list[tuple[Any, str, Callable[..., None]]] = []


def remove_listeners() -> None:
    """Undo :func:`fail_final_commit`."""
    while _LISTENERS:
        target, name, fn = _LISTENERS.pop()
        if event.contains(target, name, fn):
            event.remove(target, name, fn)


def reap_until_published(settings: Settings, make_session: sessionmaker[Session], job_id: str) -> None:
    """Run reaper passes (the worker is gone) until the lease lapses and the publish is completed."""

    def done() -> bool:
        r = reap_once(settings, make_session, lambda j: pytest.fail(f"{j} must not be re-published"))
        return job_id in r.finished_publishing

    wait_until(done, LEASE + 10, "the reaper completing the publish", interval=0.5)


# -- publishing -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["commit_blip", "crash_at_commit", "crash_before_move"])
def test_a_failed_final_commit_still_ends_with_one_artifact_set(
    fault: str,
    dsettings: Settings,
    make_session,
    teacher,
    engine_of,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The job commits ``publishing`` before any file moves; the final commit (artifact rows + ``succeeded``)
    fails once: a transient error (the worker retries the whole idempotent publish), or a crash at that
    commit or before the files moved (the worker gives up; its lease lapses and the reaper completes the same
    publish). Every way: ``succeeded``, exactly one artifact set with the registered sha256s, and the work dir
    (checkpoints) kept until the commit, deleted after it."""
    monkeypatch.setattr(worker.tasks, "run_upgrade", fake_run_upgrade())
    job_id = insert_job(make_session, teacher)
    if fault == "crash_before_move":
        real = worker.publish.publish_files
        calls: list[int] = []

        def crash_once(*args: Any) -> Path:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("injected crash before the artifacts moved")
            return real(*args)

        monkeypatch.setattr(worker.publish, "publish_files", crash_once)
        fired = calls
    else:
        exc = (
            OperationalError("COMMIT", {}, ConnectionResetError("injected: connection lost at COMMIT"))
            if fault == "commit_blip"
            else RuntimeError("injected crash at the final commit")
        )
        fired = fail_final_commit(engine_of, exc)
    try:
        result = worker.tasks.run_job(job_id, dsettings)
    finally:
        remove_listeners()
    assert fired, "the fault was not injected"
    if fault == "commit_blip":
        assert result == "succeeded"
    else:
        assert result is None
        j = get_job(make_session, job_id)
        assert (j.status, j.publish_dir is not None, j.metrics["fvu"]) == ("publishing", True, 0.1)
        assert (dsettings.work_dir / job_id / "checkpoints" / "state.pt").is_file()  # kept: not committed
        reap_until_published(dsettings, make_session, job_id)
    j = get_job(make_session, job_id)
    assert (j.status, j.lease_owner, j.publish_dir, j.attempt) == ("succeeded", None, None, 1)
    assert statuses(make_session, job_id) == ["running", "publishing", "succeeded"]
    check_single_artifact_set(dsettings, make_session, job_id, FAKE_FILES)
    assert not (dsettings.work_dir / job_id).exists()


def test_a_publish_whose_files_are_gone_is_requeued(dsettings: Settings, make_session, teacher) -> None:
    """A ``publishing`` row whose staging folder vanished (artifacts dir not shared with the reaper's machine)
    cannot complete: the reaper re-queues it (the pipeline resumes from its checkpoint)."""
    past = utcnow() - timedelta(seconds=5)
    job_id = insert_job(
        make_session,
        teacher,
        status="publishing",
        attempt=1,
        lease_owner="dead:1:x",
        lease_expires_at=past,
        publish_dir="nowhere/.staging-1-x",
    )
    r = reap_once(dsettings, make_session, lambda j: None)
    assert r.requeued == [job_id] and r.published == [job_id]
    j = get_job(make_session, job_id)
    assert (j.status, j.lease_owner, j.publish_dir) == ("queued", None, None)


@pytest.mark.parametrize("when", ["last_stage", "packaging"])
def test_a_cancel_during_the_last_stage_or_packaging_ends_cancelled(
    when: str,
    dsettings: Settings,
    make_session,
    teacher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``cancelling`` always ends ``cancelled``: the cancel (the API's ``running -> cancelling``) arrives
    inside the last stage (the real ``run_upgrade`` with stand-in stages, no poll afterwards) or just after
    the pipeline returned, before the publish commit. Nothing is published; the work dir is gone."""
    import rsae.pipeline.run as run_mod

    job_id = insert_job(make_session, teacher)

    def cancel() -> None:
        with make_session.begin() as s:
            assert transition(s, job_id, {"running"}, "cancelling")

    if when == "packaging":
        monkeypatch.setattr(worker.tasks, "run_upgrade", fake_run_upgrade(on_package=cancel))
    else:

        def package(state: Any, ctx: Any) -> None:
            for name in ("cfg.json", "report.json", "report.html", "sae_weights.safetensors"):
                (state.out_dir / name).write_text("{}")
            state.report = REPORT
            cancel()

        monkeypatch.setattr(run_mod, "PIPELINE", {"package": package})
    assert worker.tasks.run_job(job_id, dsettings) == "cancelled"
    j = get_job(make_session, job_id)
    assert (j.status, j.lease_owner) == ("cancelled", None)
    assert statuses(make_session, job_id) == ["running", "cancelling", "cancelled"]
    assert not (dsettings.artifacts_dir / job_id).exists() and not (dsettings.work_dir / job_id).exists()


# -- leases by the database clock, fencing -----------------------------------------------------------------
@pytest.fixture(params=["postgres", "sqlite"])
def any_db(request: pytest.FixtureRequest, dsettings: Settings, tmp_path: Path) -> Settings:
    """``dsettings`` on the test Postgres, or on a fresh migrated SQLite file (the embedded default)."""
    if request.param == "postgres":
        return dsettings
    url = f"sqlite:///{tmp_path / 'rsae.db'}"
    migrate(url, wait_seconds=5)
    return dsettings.model_copy(update={"database_url": url})


def test_leases_and_the_reaper_use_the_database_clock(
    any_db: Settings,
    teacher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker whose clock is an hour ahead claims a lease that still ends LEASE seconds after the
    database's now, and its reaper does not expire a live lease (it used to compare with its own clock)."""
    import service.jobs
    import service.models

    ms = get_sessionmaker(any_db.database_url)
    job_id = insert_job(ms, teacher)
    skewed = lambda: utcnow() + timedelta(hours=1)  # noqa: E731
    monkeypatch.setattr(service.models, "utcnow", skewed)
    monkeypatch.setattr(service.jobs, "utcnow", skewed)
    c = claim(ms, job_id, new_owner(), any_db)
    assert c is not None and abs(c.deadline_in - any_db.job_deadline_seconds) < 5
    with ms() as s:
        expires, now = s.execute(select(Job.lease_expires_at, db_now()).where(Job.id == job_id)).one()
    assert LEASE - 2 < (expires - now).total_seconds() <= LEASE + 0.01, (expires, now)
    r = reap_once(any_db, ms, lambda j: pytest.fail("nothing to publish"))
    assert not r.requeued and get_job(ms, job_id).status == "running"


def test_checkpoint_writes_are_fenced_by_the_lease(any_db: Settings, teacher) -> None:
    """A worker that lost its lease (expired, or the row now names another owner) cannot rename a checkpoint
    over the new owner's: the fence (a SQL renewal) refuses, the file keeps the new owner's state, no temp
    file is left, and the old worker's reporter says ``lease_lost``."""
    import torch

    from rsae.pipeline.checkpoints import Checkpoints
    from worker.tasks import JobReporter

    ms = get_sessionmaker(any_db.database_url)
    job_id = insert_job(ms, teacher)
    old, new = new_owner(), new_owner()
    assert claim(ms, job_id, old, any_db)
    folder = any_db.work_dir / job_id / "checkpoints"
    stale = JobReporter(ms, job_id, owner=old, lease_seconds=LEASE)
    ck_old = Checkpoints(folder, key="k", fence=stale.fence)
    assert ck_old.save("finetune-rsae", {"step": 10, "w": torch.ones(2)})
    with ms.begin() as s:  # the lease expires unrenewed (worker paused)
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=db_now(-1)))
    assert not ck_old.save("finetune-rsae", {"step": 20, "w": torch.ones(2)})
    assert stale.stop_reason == "lease_lost" and stale.should_cancel()
    assert Checkpoints(folder, key="k").load("finetune-rsae")["step"] == 10
    # ... the reaper re-queued it and another worker claimed it and saved its own checkpoint
    with ms.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(lease_owner=new, lease_expires_at=db_now(LEASE)))
    ck_new = Checkpoints(folder, key="k", fence=JobReporter(ms, job_id, owner=new, lease_seconds=LEASE).fence)
    assert ck_new.save("finetune-rsae", {"step": 5, "w": torch.zeros(2)})
    stale.stop_reason = None  # even a stale copy that missed the news is refused by the SQL check
    assert not ck_old.save("finetune-rsae", {"step": 30, "w": torch.ones(2)})
    assert Checkpoints(folder, key="k").load("finetune-rsae")["step"] == 5
    assert sorted(p.name for p in folder.iterdir()) == ["finetune-rsae.pt"]  # no temp files left


# -- database connection bounds -------------------------------------------------------------------------------
def test_postgres_connections_have_connect_and_statement_timeouts_and_keepalives(database_url: str) -> None:
    """Every connection carries the libpq keepalive parameters, tcp_user_timeout and statement_timeout; a
    statement past it fails (a transient error, retried by ``db_retry``), and connecting to a server that
    accepts TCP but never answers fails after connect_timeout instead of hanging."""
    bounds = DbTimeouts(connect_s=2, statement_s=0.5, keepalives_idle_s=5, keepalives_interval_s=2, keepalives_count=2)
    engine = make_engine(database_url, timeouts=bounds)
    try:
        with engine.connect() as conn:
            params = conn.connection.dbapi_connection.info.get_parameters()
            assert {k: params.get(k) for k in ("keepalives", "keepalives_idle", "tcp_user_timeout")} == {
                "keepalives": "1",
                "keepalives_idle": "5",
                "tcp_user_timeout": "9000",
            }
            assert conn.scalar(text("SHOW statement_timeout")) == "500ms"
            t0 = time.monotonic()
            with pytest.raises(OperationalError) as e:
                conn.execute(text("SELECT pg_sleep(10)"))
            assert time.monotonic() - t0 < 3 and is_transient_db_error(e.value)
    finally:
        engine.dispose()

    with socket.socket() as silent:  # accepts connections (kernel backlog) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        dead = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/x", timeouts=bounds)
        t0 = time.monotonic()
        with pytest.raises(OperationalError):
            with dead.connect():
                pass
        assert 1.5 < time.monotonic() - t0 < 8
        dead.dispose()


def test_sqlite_waits_for_a_writer_at_most_the_busy_timeout(tmp_path: Path) -> None:
    """SQLite: a writer blocked by another's transaction waits ``busy_s`` then fails ("database is locked",
    transient), instead of failing at once or forever."""
    url = f"sqlite:///{tmp_path / 'busy.db'}"
    engine = make_engine(url, timeouts=DbTimeouts(busy_s=0.5))
    try:
        with engine.begin() as c:
            c.execute(text("CREATE TABLE t (x INTEGER)"))
        with engine.connect() as holder, engine.connect() as other:
            holder.exec_driver_sql("BEGIN IMMEDIATE")
            holder.exec_driver_sql("INSERT INTO t VALUES (1)")
            t0 = time.monotonic()
            with pytest.raises(OperationalError, match="locked") as e:
                other.exec_driver_sql("INSERT INTO t VALUES (2)")
                other.commit()
            assert 0.4 < time.monotonic() - t0 < 3 and is_transient_db_error(e.value)
            holder.rollback()
    finally:
        engine.dispose()


# -- Celery ---------------------------------------------------------------------------------------------------
def test_celery_time_limits_follow_the_deadline_and_workers_recycle(dsettings: Settings) -> None:
    """Soft / hard task time limits = deadline + grace / + 2 grace; recycling by task count and memory (KiB)."""
    s = dsettings.model_copy(
        update={
            "job_deadline_seconds": 100.0,
            "task_time_limit_grace_seconds": 10.0,
            "worker_max_tasks_per_child": 7,
            "worker_max_memory_per_child_mb": 512,
        }
    )
    app = create_celery(s)
    try:
        c = app.conf
        assert (c.task_soft_time_limit, c.task_time_limit) == (110.0, 120.0)
        assert (c.worker_max_tasks_per_child, c.worker_max_memory_per_child) == (7, 512 * 1024)
        assert c.broker_transport_options["health_check_interval"] > 0
    finally:
        app.close()


def _redis(port: int, log_dir: Path) -> Child:
    child = Child(
        f"redis-{port}-{time.monotonic_ns()}",
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1"]
        + ["--save", "", "--appendonly", "no"],
        os.environ,
        log_dir,
    )
    wait_until(lambda: redis.Redis(port=port, socket_timeout=1).ping(), 20, "redis-server", alive=child.check)
    return child


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[int, list[Child]]]:
    """A port for a redis-server of this test, and the list of servers started on it (stopped afterwards)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not on PATH")
    servers: list[Child] = []
    yield free_port(), servers
    for s in servers:
        s.stop(timeout=5)


def test_a_worker_picks_up_new_jobs_after_redis_crashes_and_restarts(
    database_url: str,
    clean_db: None,
    make_session,
    tmp_path: Path,
    own_redis,
) -> None:
    """A real Celery worker; its redis-server (no persistence) is SIGKILLed and started again on the same
    port; a job submitted afterwards is claimed within the lease period (the worker reconnects and consumes
    again; celery/celery#7276). The jobs name a missing teacher, so they end at once after the claim."""
    port, servers = own_redis
    logs = tmp_path / "logs"
    logs.mkdir()
    lease = 10.0
    settings = Settings(
        database_url=database_url,
        broker_url=f"redis://127.0.0.1:{port}/0",
        data_dir=tmp_path / "data",
        lease_seconds=lease,
        reaper_interval_seconds=1.0,
    )
    settings.ensure_dirs()
    servers.append(_redis(port, logs))
    workers = Workers(settings, logs)
    celery = create_celery(settings)
    missing = tmp_path / "no-teacher"
    try:
        w = workers.start("w1")
        before = insert_job(make_session, missing)
        enqueue_upgrade(celery, before)
        wait_until(lambda: get_job(make_session, before).attempt == 1, 30, "job before the crash claimed")
        os.kill(servers[-1].proc.pid, signal.SIGKILL)
        servers[-1].proc.wait()
        wait_until(lambda: "Connection to broker lost" in w.tail(200), 20, "worker noticing the crash")
        time.sleep(1.0)
        servers.append(_redis(port, logs))
        after = insert_job(make_session, missing)
        enqueue_upgrade(celery, after, retries=5)
        t0 = time.monotonic()
        wait_until(lambda: get_job(make_session, after).attempt == 1, lease, "job after the restart claimed")
        took = time.monotonic() - t0
        print(f"claimed {took:.1f} s after the submit that followed the Redis restart (lease {lease:g} s)")
        assert w.proc.poll() is None
    finally:
        celery.close()
        workers.stop()
    assert get_job(make_session, after).status == "failed"  # the missing teacher, found after the claim


def test_a_soft_time_limit_ends_the_job_deadline_exceeded(
    dsettings: Settings, make_session, teacher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery's soft time limit (``SoftTimeLimitExceeded`` raised inside the task) fails the job
    ``deadline_exceeded`` at once, releasing the lease and the work dir, instead of an internal error."""
    from celery.exceptions import SoftTimeLimitExceeded

    def too_long(*args: Any, **kwargs: Any) -> None:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(worker.tasks, "run_upgrade", too_long)
    job_id = insert_job(make_session, teacher)
    assert worker.tasks.run_job(job_id, dsettings) == "failed"
    j = get_job(make_session, job_id)
    assert (j.error["code"], j.lease_owner) == ("deadline_exceeded", None)
    assert not (dsettings.work_dir / job_id).exists()


def test_a_heartbeat_stuck_for_a_whole_lease_stops_the_job(dsettings: Settings, make_session, teacher) -> None:
    """A renewal that hangs (dead socket) cannot set ``lost``; the job still stops once no renewal succeeded
    for a whole lease (monotonic clock), and its fence refuses checkpoint writes."""
    from worker.lease import Heartbeat
    from worker.tasks import JobReporter

    job_id = insert_job(make_session, teacher)
    owner = new_owner()
    assert claim(make_session, job_id, owner, dsettings)
    short = dsettings.model_copy(update={"lease_seconds": 0.3})
    hb = Heartbeat(make_session, job_id, owner, short)  # never started: as if its renewal hung
    reporter = JobReporter(make_session, job_id, owner=owner, heartbeat=hb)
    assert not reporter.should_cancel() and reporter.fence()
    time.sleep(0.4)
    assert hb.expired() and not hb.lost.is_set()
    assert reporter.should_cancel() and reporter.stop_reason == "lease_lost"
    assert not reporter.fence()


def test_migration_0006_up_down_up_on_sqlite(tmp_path: Path) -> None:
    """The migration adds ``publishing`` to the status check and ``publish_dir``, and reverts (a job caught
    ``publishing`` goes back to ``running``), in SQLite's batch mode too."""
    from alembic import command

    from service.migrate import alembic_config

    url = f"sqlite:///{tmp_path / 'm.db'}"
    migrate(url, wait_seconds=5)
    engine = make_engine(url)
    try:
        with engine.begin() as c:
            c.execute(
                text(
                    "INSERT INTO jobs (id, status, progress, request, attempt, created_at, updated_at, publish_dir) "
                    "VALUES ('j', 'publishing', 1, '{}', 1, '2026-01-01', '2026-01-01', 'x/.staging-1-a')"
                )
            )
        command.downgrade(alembic_config(url), "0003")
        with engine.connect() as c:
            assert c.scalar(text("SELECT status FROM jobs")) == "running"
            with pytest.raises(Exception, match="CHECK"):
                c.execute(text("UPDATE jobs SET status = 'publishing'"))
            c.rollback()
        command.upgrade(alembic_config(url), "head")
        with engine.begin() as c:
            c.execute(text("UPDATE jobs SET status = 'publishing', publish_dir = 'y'"))
    finally:
        engine.dispose()
