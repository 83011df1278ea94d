"""Storage bounds (issue 11, ``service/storage.py``): DELETE of SAEs and jobs, the per-user storage quota,
artifact retention and the orphan sweep, against the real Postgres and Redis (and SQLite, the embedded
default, for deletion and retention: its cascades and locks differ).

No worker runs here: a running job is a row with a lease, and the worker's end is the reaper's (a lease
that expired while ``cancelling`` ends ``cancelled``), run with :func:`worker.lease.reap_once`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.app import create_app
from service.client import upload_sae
from service.config import Settings, get_settings
from service.db import get_sessionmaker
from service.migrate import upgrade
from service.models import Artifact, Job, JobEvent, Sae, User, new_id, utcnow
from service.storage import dir_bytes, expire_artifacts, output_estimate, storage_usage, sweep_orphans
from support.servers import API_REDIS_DB, REDIS_URL, assert_problem, bearer, job_body, make_token, post_sae
from worker.lease import reap_once


# -- helpers ---------------------------------------------------------------------------------------
def app_client(monkeypatch: pytest.MonkeyPatch, user: str = "alice", **env: str) -> TestClient:
    """A TestClient of an app created after setting ``RSAE_<KEY>`` variables, authenticated as ``user``."""
    for k, v in env.items():
        monkeypatch.setenv(f"RSAE_{k.upper()}", v)
    get_settings.cache_clear()
    return TestClient(create_app(), headers=bearer(make_token(get_settings().database_url, user)))


def no_publish(job_id: str) -> None:
    """The reaper's publish callback where nothing may be published."""
    raise AssertionError(f"{job_id} must not be published")


def finish_with_artifacts(
    make_session: sessionmaker[Session], settings: Settings, job_id: str, *, days_ago: float = 0.0
) -> Path:
    """Make ``job_id`` a succeeded job that finished ``days_ago`` days ago, with one artifact file and row and
    a scratch folder left over; returns the artifact file."""
    data = hashlib.sha256(job_id.encode()).digest() * 32
    path = settings.artifacts_dir / job_id / "sae" / "report.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    (settings.work_dir / job_id).mkdir(parents=True)
    finished = utcnow() - timedelta(days=days_ago)
    with make_session.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(status="succeeded", finished_at=finished))
        s.add(
            Artifact(
                job_id=job_id,
                name="report.json",
                kind="report",
                content_type="application/json",
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                path=f"{job_id}/sae/report.json",
                created_at=finished,
            )
        )
    return path


def rows_of(make_session: sessionmaker[Session], job_id: str) -> tuple[int, int, int]:
    """(jobs, job_events, artifacts) rows of ``job_id``."""
    with make_session() as s:
        return tuple(
            s.scalar(select(func.count()).select_from(m).where(col == job_id))
            for m, col in ((Job, Job.id), (JobEvent, JobEvent.job_id), (Artifact, Artifact.job_id))
        )


# -- the flows, run on Postgres and on SQLite --------------------------------------------------------
def delete_flow(
    c: TestClient, other: TestClient, settings: Settings, make_session: sessionmaker[Session], teacher: Path
) -> None:
    """DELETE /saes/{id} and DELETE /jobs/{id}: ownership, the in-use conflict, queued, finished and running
    jobs, repeats."""
    sae = upload_sae(c, teacher)["id"]
    stored = settings.uploads_dir / sae
    assert stored.is_dir()

    # Another user's SAE is a 404 and stays.
    assert_problem(other.delete(f"/v1/saes/{sae}"), 404, code="sae_not_found", field="id")
    # In use by an unfinished job: 409 naming the job.
    queued = c.post("/v1/jobs", json=job_body(sae)).json()["id"]
    body = assert_problem(c.delete(f"/v1/saes/{sae}"), 409, code="sae_in_use", field="id")
    assert body["job_ids"] == [queued] and queued in body["detail"]
    assert stored.is_dir() and c.get(f"/v1/saes/{sae}").status_code == 200

    # A queued job (scratch kept by an earlier attempt) is deleted at once: 204, rows and files gone.
    (settings.work_dir / queued).mkdir(parents=True)
    assert_problem(other.delete(f"/v1/jobs/{queued}"), 404, code="job_not_found")
    assert rows_of(make_session, queued)[0] == 1
    r = c.delete(f"/v1/jobs/{queued}")
    assert r.status_code == 204 and r.content == b""
    assert rows_of(make_session, queued) == (0, 0, 0)
    assert not (settings.work_dir / queued).exists()
    assert_problem(c.get(f"/v1/jobs/{queued}"), 404, code="job_not_found")
    assert_problem(c.delete(f"/v1/jobs/{queued}"), 404, code="job_not_found")  # repeating: 404

    # A finished job: its artifact files and rows, events and scratch go.
    done = c.post("/v1/jobs", json=job_body(sae)).json()["id"]
    art = finish_with_artifacts(make_session, settings, done)
    assert c.get(f"/v1/jobs/{done}/artifacts/report.json").content == art.read_bytes()
    assert c.delete(f"/v1/jobs/{done}").status_code == 204
    assert rows_of(make_session, done) == (0, 0, 0)
    assert not (settings.artifacts_dir / done).exists() and not (settings.work_dir / done).exists()
    assert_problem(c.get(f"/v1/jobs/{done}/artifacts/report.json"), 404, code="job_not_found")

    # A running job: cancelled first (202, cancelling, deleted_at), removed by the reaper once it ended.
    running = c.post("/v1/jobs", json=job_body(sae)).json()["id"]
    with make_session.begin() as s:
        s.execute(
            update(Job)
            .where(Job.id == running)
            .values(
                status="running",
                attempt=1,
                lease_owner="w:1:x",
                lease_expires_at=utcnow() + timedelta(minutes=5),
                started_at=utcnow(),
            )
        )
    (settings.work_dir / running).mkdir(parents=True)
    (settings.artifacts_dir / running / ".staging-1-x").mkdir(parents=True)
    for _ in range(2):  # repeating while pending: 202 again
        r = c.delete(f"/v1/jobs/{running}")
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] == "cancelling" and job["deleted_at"] is not None
    assert c.get(f"/v1/jobs/{running}").json()["deleted_at"] == job["deleted_at"]
    assert_problem(c.delete(f"/v1/saes/{sae}"), 409, code="sae_in_use")  # still unfinished
    reap_once(settings, make_session, no_publish)  # lease still held: the worker has not stopped yet
    assert rows_of(make_session, running)[0] == 1
    with make_session.begin() as s:  # the worker died (or stopped) and its lease lapsed
        s.execute(update(Job).where(Job.id == running).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    r = reap_once(settings, make_session, no_publish)
    assert r.cancelled == [running]
    assert rows_of(make_session, running) == (0, 0, 0)  # purged in the same reaper pass
    assert not (settings.work_dir / running).exists() and not (settings.artifacts_dir / running).exists()
    assert_problem(c.get(f"/v1/jobs/{running}"), 404, code="job_not_found")

    # No unfinished job uses the SAE any more: deleted (row, then files); repeating is a 404.
    assert c.delete(f"/v1/saes/{sae}").status_code == 204
    assert not stored.exists()
    with make_session() as s:
        assert s.get(Sae, sae) is None
    assert_problem(c.get(f"/v1/saes/{sae}"), 404, code="sae_not_found")
    assert_problem(c.delete(f"/v1/saes/{sae}"), 404, code="sae_not_found")
    assert_problem(c.delete("/v1/saes/not-an-id"), 404, code="sae_not_found")


def retention_flow(c: TestClient, settings: Settings, make_session: sessionmaker[Session], teacher: Path) -> None:
    """RSAE_RETENTION_DAYS: the reaper deletes old succeeded jobs' artifacts; the rows stay, marked expired;
    downloads answer 410."""
    sae = upload_sae(c, teacher)["id"]
    old, recent, failed = (c.post("/v1/jobs", json=job_body(sae, seed=i)).json()["id"] for i in range(3))
    old_file = finish_with_artifacts(make_session, settings, old, days_ago=10)
    recent_file = finish_with_artifacts(make_session, settings, recent, days_ago=1)
    with make_session.begin() as s:
        s.execute(
            update(Job).where(Job.id == failed).values(status="failed", finished_at=utcnow() - timedelta(days=30))
        )
        owner = s.scalar(select(Job.owner_id).where(Job.id == old))
    with make_session() as s:
        before = storage_usage(s, settings, owner)
    assert before.artifacts == old_file.stat().st_size + recent_file.stat().st_size

    assert settings.retention_days is None and expire_artifacts(settings, make_session) == []  # off by default
    week = settings.model_copy(update={"retention_days": 7.0})
    reap_once(week, make_session, no_publish)  # the reaper applies it
    assert not old_file.exists() and not (settings.artifacts_dir / old).exists()
    assert recent_file.exists()
    job = c.get(f"/v1/jobs/{old}").json()
    assert job["status"] == "succeeded" and job["artifacts"] == [] and job["expired_at"] is not None
    assert job["metrics"] is None or isinstance(job["metrics"], dict)
    assert rows_of(make_session, old)[:2] == (1, 1)  # row and events kept
    assert rows_of(make_session, old)[2] == 0
    body = assert_problem(c.get(f"/v1/jobs/{old}/artifacts/report.json"), 410, code="artifact_expired", field="name")
    assert body["expired_at"]
    assert c.get(f"/v1/jobs/{recent}/artifacts/report.json").content == recent_file.read_bytes()
    assert c.get(f"/v1/jobs/{failed}").json()["expired_at"] is None  # only succeeded jobs have artifacts
    with make_session() as s:
        assert storage_usage(s, settings, owner).artifacts == recent_file.stat().st_size
    assert expire_artifacts(week, make_session) == []  # nothing left to do
    assert c.delete(f"/v1/jobs/{old}").status_code == 204  # an expired job can still be deleted


# -- Postgres --------------------------------------------------------------------------------------
def test_delete_saes_and_jobs(
    client: TestClient,
    other_client: TestClient,
    settings: Settings,
    database_url: str,
    make_teacher: Callable[..., Path],
) -> None:
    delete_flow(client, other_client, settings, get_sessionmaker(database_url), make_teacher())


def test_retention_expires_old_artifacts(
    client: TestClient, settings: Settings, database_url: str, make_teacher: Callable[..., Path]
) -> None:
    retention_flow(client, settings, get_sessionmaker(database_url), make_teacher())


def test_storage_quota(
    settings: Settings,
    clean_db: None,
    broker: redis.Redis,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    make_teacher: Callable[..., Path],
) -> None:
    """Uploads + artifacts + the estimate of unfinished jobs must fit RSAE_MAX_STORAGE_BYTES_PER_USER:
    413 storage_quota_exceeded with the figures; deleting and cancelling free space; other users unaffected."""
    teacher = make_teacher()  # 576 x 64
    make_session = get_sessionmaker(database_url)
    with app_client(monkeypatch) as c:  # default quota (50 GiB)
        first = upload_sae(c, teacher)["id"]
    size = dir_bytes(settings.uploads_dir / first)
    with make_session() as s:
        assert s.get(Sae, first).size_bytes == size
        alice = s.scalar(select(User.id).where(User.name == "alice"))
    estimate = output_estimate(576, 64)
    cfg, weights = (teacher / "cfg.json").read_bytes(), (teacher / "sae_weights.safetensors").read_bytes()

    with app_client(monkeypatch, max_storage_bytes_per_user=str(size + estimate)) as c:
        job = c.post("/v1/jobs", json=job_body(first))  # exactly fits
        assert job.status_code == 202, job.text
        # The job's estimate is reserved: nothing more fits, not even before the upload is read.
        body = assert_problem(c.post("/v1/jobs", json=job_body(first, seed=1)), 413, code="storage_quota_exceeded")
        assert (body["used_bytes"], body["limit_bytes"], body["requested_bytes"]) == (
            size + estimate,
            size + estimate,
            estimate,
        )
        assert body["usage"] == {"uploads": size, "artifacts": 0, "reserved": estimate, "datasets": 0}
        assert body["field"] == "body" and str(size + estimate) in body["detail"]
        body = assert_problem(post_sae(c, cfg, weights), 413, code="storage_quota_exceeded")
        assert body["requested_bytes"] == 0 and body["used_bytes"] == size + estimate
        # Cancelling frees the reservation; a second upload fits, then a job no longer does.
        assert c.post(f"/v1/jobs/{job.json()['id']}/cancel").json()["status"] == "cancelled"
        second = upload_sae(c, teacher)["id"]
        body = assert_problem(c.post("/v1/jobs", json=job_body(first)), 413, code="storage_quota_exceeded")
        assert (body["used_bytes"], body["requested_bytes"]) == (2 * size, estimate)
        # Deleting an SAE frees its bytes.
        assert c.delete(f"/v1/saes/{second}").status_code == 204
        assert c.post("/v1/jobs", json=job_body(first)).status_code == 202
        # Another user has their own quota.
        with TestClient(c.app, headers=bearer(make_token(database_url, "mallory"))) as m:
            assert upload_sae(m, teacher)["id"]

    # Concurrent submissions of one user cannot overshoot it (the user's row lock serialises the checks).
    with app_client(monkeypatch, max_storage_bytes_per_user=str(size + 2 * estimate)) as c:
        queued = [j["id"] for j in c.get("/v1/jobs", params={"status": "queued"}).json()["data"]]
        assert len(queued) == 1  # one estimate reserved: room for one more job
        with ThreadPoolExecutor(6) as pool:
            codes = sorted(
                pool.map(lambda i: c.post("/v1/jobs", json=job_body(first, seed=10 + i)).status_code, range(6))
            )
        assert codes == [202] + [413] * 5, codes
        for job in c.get("/v1/jobs", params={"status": "queued"}).json()["data"]:
            if job["id"] not in queued:
                assert c.delete(f"/v1/jobs/{job['id']}").status_code == 204  # frees its reservation again

    # The stored folder does not fit although the user is under the quota: refused after the import,
    # nothing left in the uploads folder.
    with app_client(monkeypatch, max_storage_bytes_per_user=str(size + estimate + size // 2)) as c:
        before = sorted(p.name for p in settings.uploads_dir.iterdir())
        body = assert_problem(post_sae(c, cfg, weights), 413, code="storage_quota_exceeded")
        assert (body["used_bytes"], body["requested_bytes"]) == (size + estimate, size)
        assert sorted(p.name for p in settings.uploads_dir.iterdir()) == before

    # Rows uploaded before sizes were recorded are measured on disk once.
    with make_session.begin() as s:
        s.execute(update(Sae).where(Sae.id == first).values(size_bytes=None))
    with make_session.begin() as s:
        assert storage_usage(s, settings, alice).uploads == size
    with make_session() as s:
        assert s.get(Sae, first).size_bytes == size
    get_settings.cache_clear()


def test_sweep_orphans(client: TestClient, settings: Settings, database_url: str, sae_id: str) -> None:
    """Folders no row owns (a crash between a committed deletion and the file removal, a job gone while a
    lost worker still wrote) are removed once old enough; owned and temporary folders stay."""
    make_session = get_sessionmaker(database_url)
    job = client.post("/v1/jobs", json=job_body(sae_id)).json()["id"]
    expired = client.post("/v1/jobs", json=job_body(sae_id, seed=1)).json()["id"]
    finish_with_artifacts(make_session, settings, expired, days_ago=3)
    with make_session.begin() as s:
        s.execute(update(Job).where(Job.id == expired).values(expired_at=utcnow()))
    orphans = [settings.artifacts_dir / new_id(), settings.artifacts_dir / expired, settings.uploads_dir / new_id()]
    kept = [settings.artifacts_dir / job, settings.uploads_dir / sae_id, settings.uploads_dir / ".upload-x"]
    for p in orphans + kept:
        (p / "sub").mkdir(parents=True, exist_ok=True)
    assert sweep_orphans(settings, make_session) == []  # too young
    assert sorted(sweep_orphans(settings, make_session, min_age=0)) == sorted(map(str, orphans))
    assert all(not p.exists() for p in orphans) and all(p.exists() for p in kept)


# -- SQLite (the embedded default) -------------------------------------------------------------------
@pytest.fixture
def sqlite_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broker: redis.Redis) -> Iterator[Settings]:
    """Settings of a SQLite database in a temp data dir (migrated by Alembic), Redis db 15 as broker."""
    monkeypatch.delenv("RSAE_DATABASE_URL", raising=False)
    for var in ("RSAE_ARTIFACTS_DIR", "RSAE_UPLOADS_DIR", "RSAE_WORK_DIR", "RSAE_MAX_STORAGE_BYTES_PER_USER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RSAE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RSAE_BROKER_URL", f"{REDIS_URL}/{API_REDIS_DB}")
    get_settings.cache_clear()
    settings = get_settings()
    upgrade(settings.database_url)
    yield settings
    get_settings.cache_clear()


def test_delete_and_retention_on_sqlite(sqlite_env: Settings, make_teacher: Callable[..., Path]) -> None:
    url = sqlite_env.database_url
    make_session = get_sessionmaker(url)
    with (
        TestClient(create_app(), headers=bearer(make_token(url))) as c,
        TestClient(c.app, headers=bearer(make_token(url, "mallory"))) as other,
    ):
        delete_flow(c, other, sqlite_env, make_session, make_teacher())
        retention_flow(c, sqlite_env, make_session, make_teacher("second", seed=1))
