"""Durability against the real Postgres, Redis and Celery workers: leases, heartbeat, reaper, checkpoints,
SIGKILLed workers, a restarted Redis, a restarted API, duplicate messages, deadlines, cancellation.

Run: ``pytest tests/test_durability.py`` (about 3-5 minutes on 2 CPU cores). Worker subprocesses run with
a 3 s lease, 0.5 s heartbeat and 1 s reaper interval (``RSAE_LEASE_SECONDS`` ...), one torch thread and
the fused gate kernel, on a random 576 x 256 ReLU teacher and a few thousand tokens of the bundled text.
``docs/reliability.md`` lists each fault and the command reproducing it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db import get_sessionmaker
from service.embedded import Child, Stack, free_port, wait_until
from service.models import Artifact, Job, JobEvent, User, utcnow
from service.queue import create_celery, enqueue_upgrade
from support.servers import bearer, queued_messages
from worker.lease import Heartbeat, claim, new_owner, reap_once

pytestmark = pytest.mark.e2e

LEASE = 3.0
"""Lease of the test workers (seconds)."""
FAST = {
    "data": {"train_tokens": 2048, "eval_tokens": 512, "ctx_len": 32},
    "calibrate": {"steps": 10, "tokens": 512},
    "finetune": {"steps": 40, "batch_size": 256, "eval_every": 20, "control": False},
    "eval": {"ce_sequences": 0, "probe_ks": [], "probe_train_sequences": 0},
}
"""A job of a few seconds' compute (plus extraction)."""


def _with_steps(steps: int) -> dict[str, Any]:
    return {**FAST, "finetune": {**FAST["finetune"], "steps": steps, "eval_every": 100}}


# -- fixtures and helpers ------------------------------------------------------------------------------
@pytest.fixture
def teacher(make_teacher: Callable[..., Path]) -> Path:
    """A random-init ReLU teacher (d_in 576 = SmolLM2-135M, d_sae 256)."""
    return make_teacher(d_sae=256)


@pytest.fixture
def dsettings(database_url: str, clean_db: None, e2e_broker_url: str, tmp_path: Path) -> Settings:
    """Short leases and intervals; the e2e Redis db; a temp data dir."""
    s = Settings(
        database_url=database_url,
        broker_url=e2e_broker_url,
        data_dir=tmp_path / "data",
        lease_seconds=LEASE,
        heartbeat_seconds=0.5,
        reaper_interval_seconds=1.0,
        checkpoint_every_steps=10,
        max_attempts=3,
        broker_visibility_timeout=30,
        allow_local_paths=True,  # the jobs name their teacher by server-side path, under tmp_path
        local_path_roots=[tmp_path],
    )
    s.ensure_dirs()
    return s


@pytest.fixture
def make_session(database_url: str) -> sessionmaker[Session]:
    """The test database's session factory."""
    return get_sessionmaker(database_url)


def worker_env(settings: Settings) -> dict[str, str]:
    """Environment of a worker subprocess for ``settings`` (one torch thread: the CPU is shared)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", RSAE_GATE_IMPL="fused")
    for name in (
        "database_url",
        "broker_url",
        "data_dir",
        "lease_seconds",
        "heartbeat_seconds",
        "reaper_interval_seconds",
        "checkpoint_every_steps",
        "max_attempts",
        "broker_visibility_timeout",
        "job_deadline_seconds",
        "republish_after_seconds",
    ):
        value = getattr(settings, name)
        if value is not None:
            env[f"RSAE_{name.upper()}"] = str(value)
    env["RSAE_ALLOW_LOCAL_PATHS"] = str(settings.allow_local_paths).lower()
    env["RSAE_LOCAL_PATH_ROOTS"] = json.dumps([str(r) for r in settings.local_path_roots])
    return env


class Workers:
    """Celery worker subprocesses (``rsae-service worker``), each in its own process group."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings, self.log_dir, self.children = settings, log_dir, {}

    def start(self, name: str) -> Child:
        """Start worker ``name`` and wait until Celery reports it ready."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        child = Child(
            name,
            [sys.executable, "-m", "service.cli", "worker", "--", "-n", f"{name}@%h"],
            worker_env(self.settings),
            self.log_dir,
        )
        self.children[name] = child
        wait_until(lambda: " ready." in child.tail(400), 90, f"worker {name}", alive=child.check)
        return child

    def owner_of(self, lease_owner: str) -> Child:
        """The worker whose pool process holds ``lease_owner`` (``host:pid:rand``)."""
        pgid = os.getpgid(int(lease_owner.split(":")[1]))
        return next(c for c in self.children.values() if c.proc.pid == pgid)

    def kill(self, child: Child) -> None:
        """SIGKILL the worker's whole process group (main process and pool child), like the OOM killer."""
        os.killpg(child.proc.pid, signal.SIGKILL)
        child.proc.wait()

    def tails(self) -> str:
        """The last lines of every worker log."""
        return "\n".join(f"----- {n} -----\n{c.tail(80)}" for n, c in self.children.items())

    def stop(self) -> None:
        """Stop every worker still running."""
        for c in self.children.values():
            c.stop(timeout=5)


@pytest.fixture
def workers(dsettings: Settings, tmp_path: Path) -> Iterator[Workers]:
    """Worker subprocesses of one test (stopped afterwards; log tails printed on failure)."""
    w = Workers(dsettings, tmp_path / "logs")
    try:
        yield w
    finally:
        w.stop()


def insert_job(
    make_session: sessionmaker[Session], teacher: Path, job_settings: dict[str, Any] | None = None, **cols: Any
) -> str:
    """Insert a job row (default: queued, teacher by server-side path) and return its id."""
    values = {
        "status": "queued",
        "progress": 0.0,
        "attempt": 0,
        "request": {
            "model": "smollm2-135m",
            "layer": 3,
            "teacher": {"path": str(teacher)},
            "settings": job_settings if job_settings is not None else FAST,
        },
        **cols,
    }
    with make_session.begin() as s:
        job = Job(**values)
        s.add(job)
        s.flush()
        return job.id


def get_job(make_session: sessionmaker[Session], job_id: str) -> Job:
    """A fresh copy of the job row."""
    with make_session() as s:
        return s.get(Job, job_id)


def log_messages(make_session: sessionmaker[Session], job_id: str) -> list[str]:
    """Messages of the job's ``log`` events, in order."""
    with make_session() as s:
        return [
            e.data.get("message", "")
            for e in s.scalars(
                select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "log").order_by(JobEvent.id)
            )
        ]


def statuses(make_session: sessionmaker[Session], job_id: str) -> list[str]:
    """The job's status events, in order."""
    with make_session() as s:
        return [
            e.data["status"]
            for e in s.scalars(
                select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "status").order_by(JobEvent.id)
            )
        ]


def wait_status(
    make_session: sessionmaker[Session],
    job_id: str,
    wanted: set[str],
    timeout: float,
    alive: Callable[[], None] | None = None,
) -> Job:
    """Poll the row until its status is in ``wanted``."""
    wait_until(
        lambda: get_job(make_session, job_id).status in wanted,
        timeout,
        f"job {job_id} in {wanted}",
        interval=0.2,
        alive=alive,
    )
    return get_job(make_session, job_id)


def check_single_artifact_set(
    settings: Settings, make_session: sessionmaker[Session], job_id: str, names: Iterable[str] | None = None
) -> None:
    """Exactly one artifact folder (``sae``, no staging leftovers), the files ``names`` (default: all of
    ``rsae.pipeline.ARTIFACT_FILES``, what a real upgrade writes), registered sha256s."""
    if names is None:
        from rsae.pipeline import ARTIFACT_FILES

        names = ARTIFACT_FILES
    job_dir = settings.artifacts_dir / job_id
    assert sorted(p.name for p in job_dir.iterdir()) == ["sae"], list(job_dir.iterdir())
    with make_session() as s:
        arts = {a.name: a for a in s.scalars(select(Artifact).where(Artifact.job_id == job_id))}
    files = sorted(p.name for p in (job_dir / "sae").iterdir())
    assert files == sorted(arts) == sorted(names), files
    for name, a in arts.items():
        assert hashlib.sha256((settings.artifacts_dir / a.path).read_bytes()).hexdigest() == a.sha256, name


# -- leases, heartbeat, reaper (no model needed) -------------------------------------------------------------
def test_claim_is_exclusive_and_a_duplicate_message_is_a_noop(dsettings: Settings, make_session, teacher) -> None:
    """Two claims of one queued job: one wins; run_job on the leased job (a redelivered message) changes
    nothing."""
    from worker.tasks import run_job

    job_id = insert_job(make_session, teacher)
    first, second = new_owner(), new_owner()
    c = claim(make_session, job_id, first, dsettings)
    assert c is not None and c.attempt == 1 and c.deadline_at is not None
    assert claim(make_session, job_id, second, dsettings) is None
    before = get_job(make_session, job_id)
    assert (before.status, before.lease_owner) == ("running", first)
    assert before.lease_expires_at > utcnow()
    assert run_job(job_id, dsettings) is None  # the duplicate: no claim, no write
    after = get_job(make_session, job_id)
    assert (after.status, after.attempt, after.updated_at, after.lease_owner) == (
        "running",
        1,
        before.updated_at,
        first,
    )


def test_heartbeat_renews_the_lease_and_notices_its_loss(dsettings: Settings, make_session, teacher) -> None:
    """The heartbeat pushes lease_expires_at forward; when another owner takes the row it sets ``lost``."""
    job_id = insert_job(make_session, teacher)
    owner = new_owner()
    assert claim(make_session, job_id, owner, dsettings)
    first_expiry = get_job(make_session, job_id).lease_expires_at
    hb = Heartbeat(make_session, job_id, owner, dsettings)
    hb.start()
    try:
        wait_until(lambda: hb.beats >= 2, 5, "two heartbeats")
        assert get_job(make_session, job_id).lease_expires_at > first_expiry
        assert not hb.lost.is_set()
        with make_session.begin() as s:
            s.execute(update(Job).where(Job.id == job_id).values(lease_owner="thief"))
        assert hb.lost.wait(3), "heartbeat did not notice the lost lease"
    finally:
        hb.stop()


def test_reaper_requeues_caps_attempts_enforces_deadlines_and_finishes_cancels(
    dsettings: Settings, make_session, teacher, e2e_broker_url: str
) -> None:
    """One reaper pass over every case; re-queued jobs are re-published to the real Redis queue, and a
    failed publish is retried by the next pass."""
    now = utcnow()
    past, future = now - timedelta(seconds=5), now + timedelta(seconds=60)
    run = {"status": "running", "lease_owner": "dead:1:x", "lease_expires_at": past, "started_at": past}
    requeue = insert_job(make_session, teacher, attempt=1, **run)
    capped = insert_job(make_session, teacher, attempt=3, **run)
    overdue = insert_job(make_session, teacher, attempt=1, deadline_at=past, **run)
    cancelling = insert_job(make_session, teacher, attempt=1, **{**run, "status": "cancelling"})
    alive = insert_job(make_session, teacher, attempt=1, **{**run, "lease_expires_at": future})
    stale = insert_job(make_session, teacher, created_at=now - timedelta(hours=1))
    fresh = insert_job(make_session, teacher)
    (dsettings.work_dir / cancelling).mkdir(parents=True)
    (dsettings.work_dir / requeue).mkdir(parents=True)

    def broken(job_id: str) -> None:
        raise ConnectionError("broker down")

    r = reap_once(dsettings, make_session, broken)
    assert (r.requeued, sorted(r.failed), r.cancelled, r.published) == (
        [requeue],
        sorted([capped, overdue]),
        [cancelling],
        [],
    )
    j = get_job(make_session, requeue)
    assert (j.status, j.attempt, j.lease_owner, j.enqueued_at) == ("queued", 1, None, None)
    assert (dsettings.work_dir / requeue).is_dir()  # checkpoints survive a re-queue
    assert get_job(make_session, capped).error["code"] == "max_attempts_exceeded"
    assert "RSAE_MAX_ATTEMPTS=3" in get_job(make_session, capped).error["detail"]
    assert get_job(make_session, overdue).error["code"] == "deadline_exceeded"
    assert get_job(make_session, cancelling).status == "cancelled"
    assert not (dsettings.work_dir / cancelling).exists()
    assert get_job(make_session, alive).status == "running"
    assert any("re-queued" in m for m in log_messages(make_session, requeue))

    celery = create_celery(dsettings)
    try:
        r2 = reap_once(dsettings, make_session, lambda job_id: enqueue_upgrade(celery, job_id))
    finally:
        celery.close()
    assert sorted(r2.published) == sorted([requeue, stale]) and not r2.requeued
    assert get_job(make_session, requeue).enqueued_at is not None
    assert get_job(make_session, fresh).enqueued_at is None
    broker = redis.Redis.from_url(e2e_broker_url)
    assert sorted(args[0] for _, args in queued_messages(broker)) == sorted([requeue, stale])
    assert reap_once(dsettings, make_session, broken).published == []  # nothing due any more


def test_cancel_while_the_lease_is_expired_ends_cancelled(
    client: TestClient, settings: Settings, make_session, teacher
) -> None:
    """Over the API: a running job whose worker died is cancelled (not re-queued) by the reaper; cancel is
    idempotent; a queued job is cancelled at once."""
    with make_session() as s:
        alice = s.scalar(select(User.id).where(User.name == "alice"))
    past = utcnow() - timedelta(seconds=5)
    dead = insert_job(
        make_session,
        teacher,
        owner_id=alice,
        status="running",
        attempt=1,
        lease_owner="dead:1:x",
        lease_expires_at=past,
        started_at=past,
    )
    queued = insert_job(make_session, teacher, owner_id=alice)
    assert client.post(f"/v1/jobs/{dead}/cancel").json()["status"] == "cancelling"
    assert client.post(f"/v1/jobs/{queued}/cancel").json()["status"] == "cancelled"
    r = reap_once(settings, make_session, lambda job_id: pytest.fail(f"{job_id} must not be published"))
    assert r.cancelled == [dead] and not r.requeued
    for job_id in (dead, queued):
        again = client.post(f"/v1/jobs/{job_id}/cancel")
        assert again.status_code == 200 and again.json()["status"] == "cancelled"
    assert statuses(make_session, dead)[-2:] == ["cancelling", "cancelled"]


def test_out_of_memory_fails_fast_with_an_actionable_message(
    dsettings: Settings, make_session, teacher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OOM at the chosen size is deterministic: failed at once (no re-queue), naming the sizes to lower."""
    import torch

    import worker.tasks

    def oom(*args: Any, **kwargs: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(worker.tasks, "run_upgrade", oom)
    job_id = insert_job(make_session, teacher)
    assert worker.tasks.run_job(job_id, dsettings) == "failed"
    j = get_job(make_session, job_id)
    assert (j.status, j.attempt, j.error["code"], j.lease_owner) == ("failed", 1, "out_of_memory", None)
    assert "finetune.batch_size" in j.error["detail"] and "Not retried" in j.error["detail"]


def test_transient_database_errors_are_retried_and_deterministic_ones_are_not(database_url: str) -> None:
    """``db_retry``: a dropped connection (a real one: Postgres terminates our backend) is retried with
    backoff; a constraint violation raises at once."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import IntegrityError

    from worker.lease import db_retry

    engine = create_engine(database_url, pool_size=1, max_overflow=0)  # no pre-ping: the blip reaches us
    try:
        with engine.connect() as conn:
            pid = conn.scalar(text("SELECT pg_backend_pid()"))
        killer = create_engine(database_url)
        with killer.connect() as k:
            k.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        killer.dispose()
        calls: list[int] = []

        def tx() -> int:
            calls.append(1)
            with engine.connect() as conn:
                return conn.scalar(text("SELECT 1"))

        assert db_retry(tx) == 1 and len(calls) == 2, calls  # first call hit the dead connection

        def bad() -> None:
            calls.append(1)
            raise IntegrityError("INSERT", {}, Exception("duplicate key"))

        calls.clear()
        with pytest.raises(IntegrityError):
            db_retry(bad)
        assert len(calls) == 1
    finally:
        engine.dispose()


def test_broker_publish_is_retried_with_backoff_then_raises(dsettings: Settings) -> None:
    """``enqueue_upgrade`` against a broker that refuses connections: retried ``retries`` times with
    exponential backoff, then the error surfaces (the API answers 503, the reaper retries next pass)."""
    dead = dsettings.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"})
    celery = create_celery(dead)
    try:
        t0 = time.monotonic()
        with pytest.raises(Exception) as e:
            enqueue_upgrade(celery, "00000000-0000-0000-0000-000000000000", retries=2)
        assert time.monotonic() - t0 >= 1.0  # 0.5 s + 1 s of backoff between the three attempts
        assert "111" in str(e.value) or "refused" in str(e.value).lower(), e.value
    finally:
        celery.close()


# -- the real pipeline, in this process -------------------------------------------------------------------
def _run_in_thread(job_id: str, settings: Settings) -> tuple[threading.Thread, list[Any]]:
    from worker.tasks import run_job

    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(run_job(job_id, settings)), daemon=True)
    t.start()
    return t, result


@pytest.mark.slow
def test_deadline_and_lost_lease_stop_a_running_job(dsettings: Settings, make_session, teacher) -> None:
    """A job past its deadline fails with ``deadline_exceeded`` (checked between steps); a copy whose lease
    was taken stops without touching the row or the work dir (the new owner's checkpoints)."""
    import torch

    torch.set_num_threads(1)
    late = insert_job(make_session, teacher, _with_steps(100_000), deadline_at=utcnow() + timedelta(seconds=3))
    t, result = _run_in_thread(late, dsettings)
    t.join(300)
    j = get_job(make_session, late)
    assert result == ["failed"] and j.error["code"] == "deadline_exceeded", j.error
    assert not (dsettings.work_dir / late).exists()

    stolen = insert_job(make_session, teacher, _with_steps(100_000))
    t, result = _run_in_thread(stolen, dsettings)
    wait_until(
        lambda: ((get_job(make_session, stolen).checkpoint or {}).get("step") or 0) >= 10, 300, "first checkpoint"
    )
    with make_session.begin() as s:
        s.execute(update(Job).where(Job.id == stolen).values(lease_owner="other:1:x"))
    t.join(60)
    assert not t.is_alive() and result == [None]
    j = get_job(make_session, stolen)
    assert (j.status, j.lease_owner) == ("running", "other:1:x")
    assert (dsettings.work_dir / stolen / "checkpoints" / "finetune-rsae.pt").is_file()
    assert not list((dsettings.artifacts_dir / stolen).glob(".staging-*"))


# -- real workers ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_mid_finetune_resumes_from_the_checkpoint(
    dsettings: Settings, make_session, teacher, workers: Workers
) -> None:
    """Two workers; the one running the job is SIGKILLed mid fine-tuning. Meanwhile a duplicate message
    reaches the idle worker and is a no-op. The reaper re-queues the job after the lease expires and the
    survivor resumes it at the last fine-tuning checkpoint, reusing the extracted activations; the job
    succeeds with exactly one artifact set."""
    w1, w2 = workers.start("w1"), workers.start("w2")
    job_id = insert_job(make_session, teacher, _with_steps(400))
    celery = create_celery(dsettings)
    try:
        enqueue_upgrade(celery, job_id)
        wait_until(
            lambda: ((get_job(make_session, job_id).checkpoint or {}).get("step") or 0) >= 20,
            300,
            "a fine-tuning checkpoint at step >= 20",
            alive=lambda: [w.check() for w in (w1, w2)],
        )
        running = get_job(make_session, job_id)
        victim = workers.owner_of(running.lease_owner)
        survivor = w2 if victim is w1 else w1
        enqueue_upgrade(celery, job_id)  # a duplicate while the job runs: the idle worker must skip it
        wait_until(
            lambda: f"job {job_id} is not queued (status running" in survivor.tail(400),
            60,
            "duplicate skipped",
            alive=survivor.check,
        )
        assert get_job(make_session, job_id).attempt == 1
        step_at_kill = get_job(make_session, job_id).checkpoint["step"]
        workers.kill(victim)
        done = wait_status(make_session, job_id, {"succeeded", "failed", "cancelled"}, 300, alive=survivor.check)
    finally:
        celery.close()
    assert done.status == "succeeded", (done.error, workers.tails())
    assert done.attempt == 2 and done.lease_owner is None
    resumed = done.resumed_from
    assert resumed["stage"] == "finetune" and resumed["name"] == "finetune-rsae", resumed
    assert resumed["step"] >= step_at_kill >= 20 and resumed["step"] < 400 and resumed["attempt"] == 2
    assert resumed["reused"] == ["extract", "init", "calibrate"]  # the state saved after each stage
    assert "resuming at stage finetune" in survivor.tail(400)  # extract, init, calibrate were not rerun
    msgs = log_messages(make_session, job_id)
    assert any(
        m.startswith(f"attempt 2 resumed from stage finetune (finetune-rsae) at step {resumed['step']}") for m in msgs
    ), msgs
    assert any("re-queued" in m for m in msgs), msgs
    assert statuses(make_session, job_id) == ["running", "queued", "running", "publishing", "succeeded"]
    check_single_artifact_set(dsettings, make_session, job_id)
    assert not (dsettings.work_dir / job_id).exists()


def _start_redis(port: int, data_dir: Path, log_dir: Path) -> Child:
    """A persistent redis-server (AOF, fsync always) on ``port``, as deployed (docker-compose: AOF on)."""
    child = Child(
        f"redis-{port}-{time.monotonic_ns()}",
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            str(data_dir),
        ],
        os.environ,
        log_dir,
    )
    wait_until(lambda: redis.Redis(port=port, socket_timeout=1).ping(), 20, "redis-server", alive=child.check)
    return child


@pytest.mark.slow
def test_redis_restart_while_a_job_runs_and_others_are_queued(
    database_url: str, clean_db: None, make_session, teacher, tmp_path: Path
) -> None:
    """A dedicated Redis is restarted while job 1 fine-tunes and jobs 2, 3 wait in its queue: all three
    succeed, each started exactly once (attempt 1, one 'started' event), nothing resumed."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not on PATH")
    port, rdir, logs = free_port(), tmp_path / "redis", tmp_path / "logs"
    rdir.mkdir()
    logs.mkdir()
    settings = Settings(
        database_url=database_url,
        broker_url=f"redis://127.0.0.1:{port}/0",
        data_dir=tmp_path / "data",
        lease_seconds=LEASE,
        heartbeat_seconds=0.5,
        reaper_interval_seconds=1.0,
        checkpoint_every_steps=10,
        broker_visibility_timeout=5,  # shorter than job 1: its message comes back while it runs
        allow_local_paths=True,  # the jobs name their teacher by server-side path, under tmp_path
        local_path_roots=[tmp_path],
    )
    settings.ensure_dirs()
    server = _start_redis(port, rdir, logs)
    w = Workers(settings, logs)
    celery = create_celery(settings)
    try:
        worker = w.start("w1")
        jobs = [insert_job(make_session, teacher, _with_steps(300))] + [
            insert_job(make_session, teacher) for _ in range(2)
        ]
        for job_id in jobs:
            enqueue_upgrade(celery, job_id)

        def fine_tuning() -> bool:
            job = get_job(make_session, jobs[0])
            assert job.status in ("queued", "running"), (job.status, job.error)  # fail fast, with the cause
            return ((job.checkpoint or {}).get("step") or 0) >= 10

        wait_until(
            fine_tuning,
            300,
            "job 1 fine-tuning",
            alive=worker.check,
        )
        assert [get_job(make_session, j).status for j in jobs[1:]] == ["queued", "queued"]
        server.stop(timeout=10)  # SIGTERM: Redis writes its AOF and exits
        time.sleep(2)
        server = _start_redis(port, rdir, logs)
        done = [
            wait_status(make_session, j, {"succeeded", "failed", "cancelled"}, 300, alive=worker.check) for j in jobs
        ]
    finally:
        celery.close()
        w.stop()
        server.stop()
    for j in done:
        assert j.status == "succeeded", (j.id, j.error, w.tails())
        assert j.attempt == 1 and j.resumed_from is None, (j.attempt, j.resumed_from)
        assert sum(m.startswith("attempt 1 started") for m in log_messages(make_session, j.id)) == 1
        assert statuses(make_session, j.id) == ["running", "publishing", "succeeded"]
        check_single_artifact_set(settings, make_session, j.id)


def test_api_restart_keeps_state(dsettings: Settings, make_session, teacher, api_token: str, tmp_path: Path) -> None:
    """The API process is stopped and started again on the same port: every job reads back identically
    (the SQL row is the truth; the API holds no state)."""
    import httpx

    with make_session() as s:
        alice = s.scalar(select(User.id).where(User.name == "alice"))
    ids = [
        insert_job(make_session, teacher, owner_id=alice, status=st, attempt=a, error=e)
        for st, a, e in (
            ("queued", 0, None),
            ("cancelled", 0, None),
            ("failed", 1, {"code": "invalid_teacher", "detail": "x", "field": "teacher"}),
        )
    ]
    with (
        Stack(dsettings, port=0, log_dir=tmp_path / "stack", ready_timeout=120) as stack,
        httpx.Client(base_url=stack.base_url, headers=bearer(api_token), timeout=30) as http,
    ):
        before = {j: http.get(f"/v1/jobs/{j}").json() for j in ids}
        assert [before[j]["status"] for j in ids] == ["queued", "cancelled", "failed"], before
        listing = http.get("/v1/jobs").json()
        api = next(c for c in stack.children if c.name == "api")
        api.stop()
        with pytest.raises(httpx.TransportError):
            http.get("/healthz")
        restarted = Child(
            "api",
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--no-migrate",
                "--host",
                stack.host,
                "--port",
                str(stack.port),
            ],
            stack._env(dsettings.broker_url),
            tmp_path / "stack",
        )
        stack.children[stack.children.index(api)] = restarted
        wait_until(lambda: http.get("/readyz").status_code == 200, 60, "restarted API", alive=restarted.check)
        assert {j: http.get(f"/v1/jobs/{j}").json() for j in ids} == before
        assert http.get("/v1/jobs").json() == listing
