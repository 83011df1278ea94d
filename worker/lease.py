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
  delivers the webhook notices due (:func:`service.webhooks.deliver_due`), deletes the scratch folders
  of finished jobs and the expired idempotency keys, and applies the storage rules (:mod:`service.storage`).

Lease and deadline instants come from one clock, the database's (:class:`service.db.db_now` in the SQL
statements), never from a worker's own clock: a worker whose clock is off cannot steal or keep a lease.
Durations a worker measures alone (heartbeat validity, time to the deadline) use its monotonic clock.
"""

from __future__ import annotations

import hashlib
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
from datetime import datetime
from typing import Any, TypeVar

import tenacity
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db import db_now
from service.idempotency import prune_expired
from service.jobs import add_event, transition
from service.models import TERMINAL_STATUSES, Job
from service.storage import storage_pass
from service.webhooks import deliver_due

log = logging.getLogger(__name__)

T = TypeVar("T")

ACTIVE = ("running", "cancelling")
"""Statuses in which a lease holder runs the pipeline of the job."""
LEASED = ("running", "cancelling", "publishing")
"""Statuses in which a job has a lease holder (``publishing``: it moves the artifacts; see ``worker.publish``)."""


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


def worker_label(owner: str) -> str:
    """The name users see for a lease owner: ``worker-<8 hex>`` (a hash of ``owner``), so events and errors
    can tell attempts apart without showing the worker's host name or pid; the worker logs which owner
    has which label when it claims a job."""
    return "worker-" + hashlib.sha256(owner.encode()).hexdigest()[:8]


@dataclass
class Claim:
    """A job this process now leases."""

    job_id: str
    owner: str
    attempt: int
    """Starts of the job so far, this one included (1 on the first run)."""
    deadline_at: datetime | None
    request: dict[str, Any] = field(repr=False, default_factory=dict)
    deadline_in: float | None = None
    """Seconds from the claim to ``deadline_at``, both by the database clock (for a monotonic countdown)."""


def claim(make_session: sessionmaker[Session], job_id: str, owner: str, settings: Settings) -> Claim | None:
    """Lease job ``job_id`` if it is ``queued`` (conditional UPDATE; one winner among racing workers).

    Sets ``running``, the lease, ``attempt + 1``, ``started_at`` (first start only) and ``deadline_at``
    (first start + ``job_deadline_seconds`` unless already set), all by the database clock.

    Returns:
        The claim, or None if the job is not queued (running elsewhere, finished, cancelled, unknown).
    """

    def tx() -> Claim | None:
        with make_session.begin() as s:
            ok = transition(
                s,
                job_id,
                {"queued"},
                "running",
                lease_owner=owner,
                lease_expires_at=db_now(settings.lease_seconds),
                attempt=Job.attempt + 1,
                started_at=func.coalesce(Job.started_at, db_now()),
                error=None,
                finished_at=None,
                deadline_at=func.coalesce(Job.deadline_at, db_now(settings.job_deadline_seconds)),
            )
            if not ok:
                return None
            row = s.execute(
                select(Job.attempt, Job.deadline_at, Job.request, db_now().label("now")).where(Job.id == job_id)
            ).one()
            left = None if row.deadline_at is None else (row.deadline_at - row.now).total_seconds()
            label = worker_label(owner)
            add_event(
                s,
                job_id,
                "log",
                {"message": f"attempt {row.attempt} started by {label}", "attempt": row.attempt, "worker": label},
            )
            return Claim(job_id, owner, row.attempt, row.deadline_at, row.request, left)

    result = db_retry(tx)
    if result is not None:
        log.info("job %s: attempt %d claimed by %s (%s)", job_id, result.attempt, owner, worker_label(owner))
    return result


def describe(make_session: sessionmaker[Session], job_id: str) -> str:
    """A short description of a job's status and lease, for log lines."""
    with make_session() as s:
        row = s.execute(select(Job.status, Job.lease_owner, Job.lease_expires_at).where(Job.id == job_id)).first()
    if row is None:
        return "unknown job"
    if row.status in LEASED:
        return f"status {row.status}, leased by {row.lease_owner} until {row.lease_expires_at:%H:%M:%S}"
    return f"status {row.status}"


def renew(make_session: sessionmaker[Session], job_id: str, owner: str, lease_seconds: float) -> bool:
    """Extend ``owner``'s lease on ``job_id`` to ``lease_seconds`` from now (database clock), if it still holds
    it: owner unchanged, status in :data:`LEASED`, and not yet expired (an expired lease may already be
    handed to another worker by the reaper, so it is never revived). False if it is no longer held."""
    with make_session.begin() as s:
        res = s.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.lease_owner == owner,
                Job.status.in_(LEASED),
                Job.lease_expires_at > db_now(),
            )
            .values(lease_expires_at=db_now(lease_seconds)),
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

    def expired(self) -> bool:
        """True once no renewal succeeded for a whole lease (e.g. a renewal hangs on a dead connection): the
        job must stop even though the heartbeat thread has not yet come back to set ``lost``."""
        return time.monotonic() >= self._valid_until

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
    finished_publishing: list[str] = field(default_factory=list)
    """Jobs left ``publishing`` by a lost worker whose publish this pass completed (now ``succeeded``)."""
    webhooks: dict[str, str] = field(default_factory=dict)
    """Webhook delivery id -> outcome of the attempt made in this pass (:func:`service.webhooks.deliver_due`)."""
    pruned_keys: int = 0
    """Expired idempotency keys deleted (:func:`service.idempotency.prune_expired`)."""


def discard_dirs(settings: Settings, job_id: str, *, keep_artifacts: bool = False) -> None:
    """Delete a job's scratch folder (and its artifacts folder unless ``keep_artifacts``)."""
    shutil.rmtree(settings.work_dir / job_id, ignore_errors=True)
    if not keep_artifacts:
        shutil.rmtree(settings.artifacts_dir / job_id, ignore_errors=True)


def reap_once(settings: Settings, make_session: sessionmaker[Session], publish: Callable[[str], None]) -> ReapResult:
    """One reaper pass (safe to run in many processes at once: every change is conditional). "Now" is the
    database's clock.

    A ``publishing`` job whose lease expired (its worker died after committing the publish) is taken over:
    the reaper leases it itself and completes the same publish (:func:`worker.publish.finish_publish`);
    were its staged files gone, it is re-queued instead (the pipeline resumes from its checkpoint).

    Args:
        publish: sends the upgrade message for a job id (e.g. :func:`service.queue.enqueue_upgrade`);
            failures are logged and retried at the next pass.

    Returns:
        What was done.
    """
    out = ReapResult()
    me = new_owner()
    takeovers: list[str] = []

    def expire() -> None:
        with make_session.begin() as s:
            now = s.scalar(select(db_now()))
            rows = s.execute(
                select(Job.id, Job.status, Job.attempt, Job.deadline_at, Job.lease_owner, Job.lease_expires_at)
                .where(Job.status.in_(LEASED), Job.lease_expires_at < db_now())
                .with_for_update(skip_locked=True)
            ).all()
            for r in rows:
                lapsed = (Job.lease_expires_at < db_now(), Job.lease_owner == r.lease_owner)
                reset = {"lease_owner": None, "lease_expires_at": None}
                label = worker_label(r.lease_owner or "")
                log.warning("job %s: lease of %s (%s) expired", r.id, r.lease_owner, label)
                why = f"lease of {label} expired at {r.lease_expires_at:%Y-%m-%d %H:%M:%S} UTC"
                if r.status == "publishing":
                    took = s.execute(
                        update(Job)
                        .where(Job.id == r.id, Job.status == "publishing", *lapsed)
                        .values(lease_owner=me, lease_expires_at=db_now(settings.lease_seconds)),
                        execution_options={"synchronize_session": False},
                    )
                    if took.rowcount == 1:
                        add_event(s, r.id, "log", {"message": f"{why} while publishing; the reaper completes it"})
                        takeovers.append(r.id)
                elif r.status == "cancelling":
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
    if takeovers:
        from .publish import PublishLost, finish_publish  # imports the task side lazily (artifact hashing)

        for job_id in takeovers:
            try:
                if finish_publish(make_session, settings, job_id, me):
                    out.finished_publishing.append(job_id)
            except PublishLost as e:
                log.error("reaper: job %s: %s; re-queued", job_id, e)
                with make_session.begin() as s:
                    if transition(
                        s,
                        job_id,
                        {"publishing"},
                        "queued",
                        where=(Job.lease_owner == me,),
                        lease_owner=None,
                        lease_expires_at=None,
                        publish_dir=None,
                        enqueued_at=None,
                    ):
                        add_event(s, job_id, "log", {"message": f"{e}; re-queued"})
                        out.requeued.append(job_id)
            except Exception:  # noqa: BLE001 - the lease lapses again and the next pass retries
                log.exception("reaper: completing the publish of job %s failed", job_id)

    def overdue_queued() -> None:
        with make_session.begin() as s:
            for (job_id,) in s.execute(select(Job.id).where(Job.status == "queued", Job.deadline_at < db_now())):
                if transition(
                    s,
                    job_id,
                    {"queued"},
                    "failed",
                    where=(Job.deadline_at < db_now(),),
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
    stale = db_now(-settings.republish_after_seconds)
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

    # Webhook notices due: those of the jobs finished above, retries, and any a dead process left behind.
    out.webhooks = deliver_due(settings, make_session).outcomes
    out.swept = sweep_dirs(settings, make_session)
    storage_pass(settings, make_session)  # deleted jobs, artifact retention, orphan folders (service.storage)
    out.pruned_keys = db_retry(lambda: prune_expired(make_session))
    if out.requeued or out.cancelled or out.failed or out.published or out.finished_publishing:
        log.info(
            "reaper: requeued %s, cancelled %s, failed %s, published %s, finished publishing %s",
            out.requeued,
            out.cancelled,
            out.failed,
            out.published,
            out.finished_publishing,
        )
    return out


def _mark_published(make_session: sessionmaker[Session], job_id: str) -> None:
    with make_session.begin() as s:
        s.execute(
            update(Job).where(Job.id == job_id, Job.status == "queued").values(enqueued_at=db_now()),
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
