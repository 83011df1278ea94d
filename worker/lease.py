"""Job leases: claim, heartbeat, reaper, and retry policies for transient errors.

The SQL row is the truth (``../shared/docs/design.md``). A worker may run a job only while it holds the
row's lease: ``lease_owner`` = its owner id and ``lease_expires_at`` in the future.

- :func:`claim` takes a ``queued`` job with one conditional UPDATE (``WHERE status = 'queued'``), so of two
  copies of a message (Redis redelivery after the visibility timeout, a re-publish by the reaper, a user
  retry) exactly one runs the job; the other finds it leased and exits.
- :class:`Heartbeat` (a thread beside the running task) renews ``lease_expires_at`` every
  ``heartbeat_interval`` seconds with ``WHERE lease_owner = me``. When a renewal changes no row (the reaper
  re-queued the job and maybe another worker took it) or cannot reach the database before the lease runs
  out, ``lost`` is set and the task stops cooperatively at its next check, touching nothing.
- :func:`reap_once` (run every ``reaper_interval_seconds`` by a :class:`Reaper` thread in every worker
  process) handles expired leases: ``cancelling`` -> ``cancelled``; past the deadline -> ``failed``
  (``deadline_exceeded``); ``attempt >= max_attempts`` -> ``failed`` (``max_attempts_exceeded``); otherwise
  ``queued`` again and re-published. It also re-publishes jobs queued for long without a message,
  deletes the scratch folders of finished jobs and the expired idempotency keys.

Times are the workers' wall clocks (UTC); keep them NTP-synchronised, with skew far below the lease.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

import tenacity
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.idempotency import prune_expired
from service.jobs import add_event, transition
from service.models import TERMINAL_STATUSES, Job, utcnow
from service.webhooks import notify_in_background

log = logging.getLogger(__name__)

T = TypeVar("T")

ACTIVE = ("running", "cancelling")
"""Statuses in which a lease holder owns the job."""


# -- transient errors --------------------------------------------------------------------------------
def is_transient_db_error(exc: BaseException) -> bool:
    """True for database errors worth retrying: lost or refused connections, SQLite lock timeouts.

    Constraint violations, bad SQL and data errors are deterministic and are not retried.
    """
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, (OperationalError, InterfaceError))


def db_retry(fn: Callable[[], T], *, attempts: int = 6, max_wait: float = 5.0) -> T:
    """Call ``fn`` (one whole transaction) again on transient database errors, with exponential backoff
    (0.2 s doubling up to ``max_wait``, jittered) for at most ``attempts`` calls.

    Raises:
        The last error once the attempts are used up, or any non-transient error at once.
    """
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_exponential(multiplier=0.2, max=max_wait) + tenacity.wait_random(0, 0.2),
        retry=tenacity.retry_if_exception(is_transient_db_error),
        before_sleep=lambda rs: log.warning(
            "transient database error (attempt %d): %s",
            rs.attempt_number,
            rs.outcome.exception() if rs.outcome else None,
        ),
        reraise=True,
    )
    return retrying(fn)


# -- claim / renew -----------------------------------------------------------------------------------
def new_owner() -> str:
    """A lease owner id unique to one run of one job: ``<host>:<pid>:<8 hex>``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class Claim:
    """A job this process now leases."""

    job_id: str
    owner: str
    attempt: int
    """Starts of the job so far, this one included (1 on the first run)."""
    deadline_at: datetime | None
    request: dict[str, Any] = field(repr=False, default_factory=dict)


def claim(make_session: sessionmaker[Session], job_id: str, owner: str, settings: Settings) -> Claim | None:
    """Lease job ``job_id`` if it is ``queued`` (conditional UPDATE; one winner among racing workers).

    Sets ``running``, the lease, ``attempt + 1``, ``started_at`` (first start only) and ``deadline_at``
    (first start + ``job_deadline_seconds`` unless already set).

    Returns:
        The claim, or None if the job is not queued (running elsewhere, finished, cancelled, unknown).
    """

    def tx() -> Claim | None:
        now = utcnow()
        with make_session.begin() as s:
            ok = transition(
                s,
                job_id,
                {"queued"},
                "running",
                lease_owner=owner,
                lease_expires_at=now + timedelta(seconds=settings.lease_seconds),
                attempt=Job.attempt + 1,
                started_at=func.coalesce(Job.started_at, now),
                error=None,
                finished_at=None,
                deadline_at=func.coalesce(Job.deadline_at, now + timedelta(seconds=settings.job_deadline_seconds)),
            )
            if not ok:
                return None
            row = s.execute(select(Job.attempt, Job.deadline_at, Job.request).where(Job.id == job_id)).one()
            add_event(
                s,
                job_id,
                "log",
                {"message": f"attempt {row.attempt} started by {owner}", "attempt": row.attempt, "lease_owner": owner},
            )
            return Claim(job_id, owner, row.attempt, row.deadline_at, row.request)

    return db_retry(tx)


def describe(make_session: sessionmaker[Session], job_id: str) -> str:
    """A short description of a job's status and lease, for log lines."""
    with make_session() as s:
        row = s.execute(select(Job.status, Job.lease_owner, Job.lease_expires_at).where(Job.id == job_id)).first()
    if row is None:
        return "unknown job"
    if row.status in ACTIVE:
        return f"status {row.status}, leased by {row.lease_owner} until {row.lease_expires_at:%H:%M:%S}"
    return f"status {row.status}"


def renew(make_session: sessionmaker[Session], job_id: str, owner: str, lease_seconds: float) -> bool:
    """Extend ``owner``'s lease on ``job_id`` by ``lease_seconds`` from now; False if it is no longer held."""
    with make_session.begin() as s:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.lease_owner == owner, Job.status.in_(ACTIVE))
            .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds)),
            execution_options={"synchronize_session": False},
        )
        return res.rowcount == 1


class Heartbeat(threading.Thread):
    """Daemon thread renewing one lease every ``settings.heartbeat_interval`` seconds.

    ``lost`` becomes set when a renewal finds the lease gone, or when no renewal succeeded before the lease
    would have expired (database unreachable: the reaper may hand the job to another worker meanwhile).
    Database errors are otherwise retried at the next beat.
    """

    def __init__(self, make_session: sessionmaker[Session], job_id: str, owner: str, settings: Settings) -> None:
        super().__init__(name=f"heartbeat-{job_id[:8]}", daemon=True)
        self.make_session, self.job_id, self.owner = make_session, job_id, owner
        self.lease_seconds, self.interval = settings.lease_seconds, settings.heartbeat_interval
        self.lost = threading.Event()
        self._halt = threading.Event()
        self._valid_until = time.monotonic() + self.lease_seconds
        self.beats = 0

    def run(self) -> None:
        """Renew until :meth:`stop` or the lease is lost."""
        while not self._halt.wait(self.interval):
            started = time.monotonic()
            try:
                held = renew(self.make_session, self.job_id, self.owner, self.lease_seconds)
            except Exception as e:  # noqa: BLE001 - any failure: try again next beat, unless too late
                log.warning("job %s: lease renewal failed: %s: %s", self.job_id, type(e).__name__, e)
                if time.monotonic() >= self._valid_until:
                    log.error("job %s: lease could not be renewed before it expired; stopping", self.job_id)
                    self.lost.set()
                    return
                continue
            if not held:
                log.warning(
                    "job %s: lease of %s lost (re-queued or finished elsewhere); stopping", self.job_id, self.owner
                )
                self.lost.set()
                return
            self.beats += 1
            self._valid_until = started + self.lease_seconds

    def stop(self) -> None:
        """Stop renewing (the lease then lapses unless the job was finished)."""
        self._halt.set()


# -- reaper ------------------------------------------------------------------------------------------
@dataclass
class ReapResult:
    """What one :func:`reap_once` pass did (job ids per action)."""

    requeued: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    published: list[str] = field(default_factory=list)
    swept: list[str] = field(default_factory=list)
    pruned_keys: int = 0
    """Expired idempotency keys deleted (:func:`service.idempotency.prune_expired`)."""


def discard_dirs(settings: Settings, job_id: str, *, keep_artifacts: bool = False) -> None:
    """Delete a job's scratch folder (and its artifacts folder unless ``keep_artifacts``)."""
    shutil.rmtree(settings.work_dir / job_id, ignore_errors=True)
    if not keep_artifacts:
        shutil.rmtree(settings.artifacts_dir / job_id, ignore_errors=True)


def reap_once(settings: Settings, make_session: sessionmaker[Session], publish: Callable[[str], None]) -> ReapResult:
    """One reaper pass (safe to run in many processes at once: every change is conditional).

    Args:
        publish: sends the upgrade message for a job id (e.g. :func:`service.queue.enqueue_upgrade`);
            failures are logged and retried at the next pass.

    Returns:
        What was done.
    """
    out = ReapResult()
    now = utcnow()

    def expire() -> None:
        with make_session.begin() as s:
            rows = s.execute(
                select(Job.id, Job.status, Job.attempt, Job.deadline_at, Job.lease_owner, Job.lease_expires_at)
                .where(Job.status.in_(ACTIVE), Job.lease_expires_at < now)
                .with_for_update(skip_locked=True)
            ).all()
            for r in rows:
                lapsed = (Job.lease_expires_at < now, Job.lease_owner == r.lease_owner)
                reset = {"lease_owner": None, "lease_expires_at": None}
                why = f"lease of {r.lease_owner} expired at {r.lease_expires_at:%Y-%m-%d %H:%M:%S} UTC"
                if r.status == "cancelling":
                    if transition(s, r.id, {"cancelling"}, "cancelled", where=lapsed, **reset):
                        out.cancelled.append(r.id)
                elif r.deadline_at is not None and r.deadline_at < now:
                    if transition(
                        s,
                        r.id,
                        {"running"},
                        "failed",
                        where=lapsed,
                        **reset,
                        error={
                            "code": "deadline_exceeded",
                            "field": None,
                            "detail": f"the job passed its deadline ({r.deadline_at:%Y-%m-%d %H:%M:%S} UTC) "
                            f"and its {why}; raise RSAE_JOB_DEADLINE_SECONDS or use smaller settings",
                        },
                    ):
                        out.failed.append(r.id)
                elif r.attempt >= settings.max_attempts:
                    if transition(
                        s,
                        r.id,
                        {"running"},
                        "failed",
                        where=lapsed,
                        **reset,
                        error={
                            "code": "max_attempts_exceeded",
                            "field": None,
                            "detail": f"the worker running the job was lost {r.attempt} times (last: {why}); "
                            f"giving up after RSAE_MAX_ATTEMPTS={settings.max_attempts}. Check the "
                            "worker logs (often the kernel OOM killer: use smaller settings)",
                        },
                    ):
                        out.failed.append(r.id)
                elif transition(s, r.id, {"running"}, "queued", where=lapsed, enqueued_at=None, **reset):
                    add_event(
                        s,
                        r.id,
                        "log",
                        {"message": f"{why}; re-queued (attempt {r.attempt} of {settings.max_attempts} used)"},
                    )
                    out.requeued.append(r.id)

    db_retry(expire)
    for job_id in out.cancelled + out.failed:
        discard_dirs(settings, job_id)

    def overdue_queued() -> None:
        with make_session.begin() as s:
            for (job_id,) in s.execute(select(Job.id).where(Job.status == "queued", Job.deadline_at < now)):
                if transition(
                    s,
                    job_id,
                    {"queued"},
                    "failed",
                    where=(Job.deadline_at < now,),
                    error={
                        "code": "deadline_exceeded",
                        "field": None,
                        "detail": "the job passed its deadline while waiting to be resumed; raise "
                        "RSAE_JOB_DEADLINE_SECONDS or add workers",
                    },
                ):
                    out.failed.append(job_id)
                    discard_dirs(settings, job_id)

    db_retry(overdue_queued)

    # Publish: jobs just re-queued (or whose re-publish failed before), and jobs queued for long.
    stale = now - timedelta(seconds=settings.republish_after_seconds)
    with make_session() as s:
        due = list(
            s.scalars(
                select(Job.id)
                .where(
                    Job.status == "queued",
                    or_(
                        and_(Job.enqueued_at.is_(None), Job.attempt > 0),
                        func.coalesce(Job.enqueued_at, Job.created_at) < stale,
                    ),
                )
                .order_by(Job.created_at)
                .limit(500)
            )
        )
    for job_id in due:
        try:
            publish(job_id)
        except Exception as e:  # noqa: BLE001 - broker down: the next pass tries again
            log.warning("reaper: publishing job %s failed (%s: %s); will retry", job_id, type(e).__name__, e)
            continue
        out.published.append(job_id)
        db_retry(lambda: _mark_published(make_session, job_id))

    for job_id in out.cancelled + out.failed:  # terminal here: their webhooks are due
        notify_in_background(make_session, settings, job_id)
    out.swept = sweep_dirs(settings, make_session)
    out.pruned_keys = db_retry(lambda: prune_expired(make_session))
    if out.requeued or out.cancelled or out.failed or out.published:
        log.info(
            "reaper: requeued %s, cancelled %s, failed %s, published %s",
            out.requeued,
            out.cancelled,
            out.failed,
            out.published,
        )
    return out


def _mark_published(make_session: sessionmaker[Session], job_id: str) -> None:
    with make_session.begin() as s:
        s.execute(
            update(Job).where(Job.id == job_id, Job.status == "queued").values(enqueued_at=utcnow()),
            execution_options={"synchronize_session": False},
        )


def sweep_dirs(settings: Settings, make_session: sessionmaker[Session], min_age: float = 60.0) -> list[str]:
    """Delete scratch folders (``work_dir/<job id>``) of finished or unknown jobs, older than ``min_age`` s
    (e.g. a job cancelled by the API while no worker held it). Returns the job ids swept."""
    root = settings.work_dir
    if root is None or not root.is_dir():
        return []
    cutoff = time.time() - min_age
    names = [p.name for p in root.iterdir() if p.is_dir() and p.stat().st_mtime < cutoff]
    if not names:
        return []
    with make_session() as s:
        status = dict(s.execute(select(Job.id, Job.status).where(Job.id.in_(names))).all())
    swept = [n for n in names if status.get(n, "gone") in TERMINAL_STATUSES | {"gone"}]
    for n in swept:
        discard_dirs(settings, n, keep_artifacts=status.get(n) == "succeeded")
    return swept


class Reaper(threading.Thread):
    """Daemon thread running :func:`reap_once` every ``settings.reaper_interval_seconds`` (+-20% jitter),
    forever. Errors of one pass are logged; the next pass runs anyway."""

    def __init__(self, settings: Settings, make_session: sessionmaker[Session], publish: Callable[[str], None]) -> None:
        super().__init__(name="rsae-reaper", daemon=True)
        self.settings, self.make_session, self.publish = settings, make_session, publish
        self._halt = threading.Event()
        self.passes = 0

    def run(self) -> None:
        """Reap until :meth:`stop`."""
        interval = self.settings.reaper_interval_seconds
        while not self._halt.wait(interval * random.uniform(0.8, 1.2)):
            try:
                reap_once(self.settings, self.make_session, self.publish)
            except Exception:  # noqa: BLE001 - keep reaping
                log.exception("reaper pass failed")
            self.passes += 1

    def stop(self) -> None:
        """Stop after the current pass."""
        self._halt.set()
