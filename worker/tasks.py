"""The Celery task ``rsae.upgrade``: run one job through :func:`rsae.pipeline.run_upgrade` under a lease.

Thin on purpose: it claims the job row (:mod:`worker.lease`), keeps the lease alive by heartbeat, feeds the
pipeline's progress, metrics and checkpoints into SQL, answers the pipeline's stop polls (cancel, lease
lost, deadline) and publishes the artifacts. Heavy modules (torch) are imported inside the task only, so
the prefork parent never initialises torch or CUDA; the SQL engine is likewise created lazily in the child,
so no connection crosses a fork. Every worker process also runs the reaper thread.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init
from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from rsae.config import STAGES
from rsae.device import device_label
from rsae.errors import Cancelled, RSAEError
from rsae.pipeline import run_upgrade
from service.bounds import check_disk_budget, fetch_model, job_width, worker_preflight
from service.config import Settings, get_settings
from service.datasets import resolve_upload, use_upload
from service.db import DbTimeouts, get_sessionmaker
from service.estimate import THROUGHPUT_KEY, throughput_record
from service.jobs import add_event, artifact_refs, build_upgrade_config, resolve_teacher, transition
from service.models import Job, utcnow
from service.problems import ProblemError, validation_errors
from service.queue import TASK_UPGRADE, create_celery, enqueue_upgrade
from service.redact import redact
from service.schemas import JobCreate
from service.webhooks import notify_in_background

from .lease import (
    ACTIVE,
    Heartbeat,
    Reaper,
    claim,
    db_retry,
    describe,
    discard_dirs,
    is_transient_db_error,
    new_owner,
    renew,
)
from .publish import begin_publish, finish_publish

log = logging.getLogger(__name__)

PROGRESS_WRITE_SECONDS = 0.5
"""Least time between two progress writes to the job row (stage changes and metrics always write)."""
PROGRESS_EVENT_STEP = 0.05
"""Overall progress advance that earns a ``progress`` event (stage changes always do)."""
CANCEL_POLL_SECONDS = 2.0
"""Least time between two reads of the job status for cancellation."""


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None and numpy/torch scalars as Python numbers (JSONB rejects NaN)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JobReporter:
    """The pipeline's ``on_progress``, ``should_cancel`` and ``on_checkpoint`` for one leased job.

    Writes go to the row only while ``owner`` holds the lease. A progress write that fails on a transient
    database error is retried briefly, then skipped (the next one carries the news).

    Args:
        make_session: session factory.
        job_id: the job.
        owner: the lease owner id of this run (None: no lease checks, e.g. tools).
        heartbeat: its ``lost`` event (or a lease unrenewed for a whole lease period) stops the job.
        deadline_at: the job stops (reason ``deadline``) after this instant (compared with this machine's
            clock; prefer ``deadline_in``).
        attempt: the attempt number, recorded with a resume.
        clock: monotonic clock in seconds (injectable for tests).
        deadline_in: seconds from now to the deadline, measured by the database clock at the claim
            (:attr:`worker.lease.Claim.deadline_in`); counted down on ``clock``, so this worker's wall
            clock plays no part.
        lease_seconds: lease length granted by :meth:`fence` (default: the heartbeat's).
    """

    def __init__(
        self,
        make_session: sessionmaker[Session],
        job_id: str,
        *,
        owner: str | None = None,
        heartbeat: Heartbeat | None = None,
        deadline_at: datetime | None = None,
        attempt: int = 1,
        clock: Callable[[], float] = time.monotonic,
        deadline_in: float | None = None,
        lease_seconds: float | None = None,
    ) -> None:
        self.make_session, self.job_id, self.clock = make_session, job_id, clock
        self.owner, self.heartbeat, self.deadline_at, self.attempt = owner, heartbeat, deadline_at, attempt
        self._deadline = None if deadline_in is None else clock() + deadline_in
        self.lease_seconds = lease_seconds or (heartbeat.lease_seconds if heartbeat is not None else 60.0)
        self._stage: str | None = None
        self._last_write = self._last_poll = -math.inf
        self._event_progress = -math.inf
        self.stop_reason: str | None = None
        """Why the job must stop: "cancel", "lease_lost" or "deadline" (None: keep going)."""

    def _mine(self) -> tuple[Any, ...]:
        return (Job.status.in_(ACTIVE),) + (() if self.owner is None else (Job.lease_owner == self.owner,))

    def __call__(self, stage: str, progress: float, metrics: dict[str, Any] | None = None) -> None:
        """Record ``stage``/``progress`` on the job row (throttled) and ``metrics`` as an event."""
        now = self.clock()
        stage_changed = stage != self._stage
        if not stage_changed and metrics is None and now - self._last_write < PROGRESS_WRITE_SECONDS:
            return
        if stage_changed and stage not in STAGES:
            log.warning("job %s: pipeline reported unknown stage %r", self.job_id, stage)
        progress = min(1.0, max(0.0, float(progress)))

        def tx() -> None:
            with self.make_session.begin() as s:
                res = s.execute(
                    update(Job)
                    .where(Job.id == self.job_id, *self._mine())
                    .values(stage=stage, progress=progress, updated_at=utcnow()),
                    execution_options={"synchronize_session": False},
                )
                if res.rowcount != 1:
                    return
                if stage_changed or progress - self._event_progress >= PROGRESS_EVENT_STEP:
                    add_event(s, self.job_id, "progress", {"stage": stage, "progress": progress})
                    self._event_progress = progress
                if metrics is not None:
                    add_event(s, self.job_id, "metrics", {"stage": stage, **json_safe(metrics)})

        try:
            db_retry(tx, attempts=3, max_wait=1.0)
        except Exception as e:  # noqa: BLE001 - progress is best effort; the lease decides ownership
            if not is_transient_db_error(e):
                raise
            log.warning("job %s: progress not recorded (database unreachable: %s)", self.job_id, e)
            return
        self._stage, self._last_write = stage, now

    def on_checkpoint(self, kind: str, info: dict[str, Any]) -> None:
        """Record a saved checkpoint on ``jobs.checkpoint`` and as a ``log`` event carrying ``checkpoint`` (the
        history of ``GET /v1/jobs/{id}/checkpoints``), a resume on ``jobs.resumed_from`` plus a log
        event ("resumed from stage finetune (finetune-rsae) at step N; reused: extract")."""
        info = json_safe({**info, "at": utcnow().isoformat()})

        def tx() -> None:
            with self.make_session.begin() as s:
                if kind == "saved":
                    res = s.execute(
                        update(Job).where(Job.id == self.job_id, *self._mine()).values(checkpoint=info),
                        execution_options={"synchronize_session": False},
                    )
                    if res.rowcount == 1:  # the history behind GET /v1/jobs/{id}/checkpoints
                        step = "" if info.get("step") is None else f" at step {info['step']}"
                        add_event(
                            s,
                            self.job_id,
                            "log",
                            {
                                "message": f"checkpoint {info.get('name')} saved (stage {info.get('stage')}{step})",
                                "checkpoint": {**info, "attempt": self.attempt},
                            },
                        )
                    return
                resumed = {**info, "attempt": self.attempt}
                s.execute(
                    update(Job).where(Job.id == self.job_id, *self._mine()).values(resumed_from=resumed),
                    execution_options={"synchronize_session": False},
                )
                reused = ", ".join(info.get("reused") or []) or "nothing"
                add_event(
                    s,
                    self.job_id,
                    "log",
                    {
                        "message": f"attempt {self.attempt} resumed from stage {info.get('stage')} "
                        f"({info.get('name')}) at step {info.get('step')}; reused: {reused}",
                        "resumed_from": resumed,
                    },
                )

        try:
            db_retry(tx, attempts=3, max_wait=1.0)
        except Exception as e:  # noqa: BLE001 - bookkeeping only; the checkpoint file is what matters
            if not is_transient_db_error(e):
                raise
            log.warning("job %s: checkpoint record not written: %s", self.job_id, e)

    def _past_deadline(self) -> bool:
        if self._deadline is not None:
            return self.clock() >= self._deadline
        return self.deadline_at is not None and utcnow() >= self.deadline_at

    def _lease_gone(self) -> bool:
        return self.heartbeat is not None and (self.heartbeat.lost.is_set() or self.heartbeat.expired())

    def check_stop(self) -> None:
        """Raise ``_Stop`` if the lease is lost or the deadline passed (no database read)."""
        if self._lease_gone():
            self.stop_reason = "lease_lost"
        elif self._past_deadline():
            self.stop_reason = "deadline"
        if self.stop_reason in ("lease_lost", "deadline"):
            raise _Stop(self.stop_reason)

    def fence(self) -> bool:
        """The pipeline's checkpoint fence: renew the lease in SQL (database clock) right before a checkpoint
        is renamed into place. True: the lease is ours for another ``lease_seconds``, so no other worker can
        own the job (and its checkpoint files) before the rename. False: do not write; if the lease is gone
        the job stops at its next check (``stop_reason`` ``lease_lost``); if the database is unreachable the
        write is skipped and the heartbeat decides. Without an ``owner`` (tools) always True."""
        if self.owner is None:
            return True
        if self._lease_gone() or self.stop_reason == "lease_lost":
            self.stop_reason = "lease_lost"
            return False
        try:
            held = renew(self.make_session, self.job_id, self.owner, self.lease_seconds)
        except Exception as e:  # noqa: BLE001 - cannot prove the lease: skip this checkpoint
            if not is_transient_db_error(e):
                raise
            log.warning("job %s: checkpoint not written (lease unconfirmed: %s)", self.job_id, e)
            return False
        if not held:
            log.warning("job %s: lease lost; checkpoint not written, stopping", self.job_id)
            self.stop_reason = "lease_lost"
        return held

    def should_cancel(self) -> bool:
        """True once the job must stop (see ``stop_reason``): the heartbeat lost the lease, the deadline
        passed, or the row is no longer ``running`` under this lease (read from SQL at most every 2 s)."""
        if self.stop_reason is not None:
            return True
        if self._lease_gone():
            self.stop_reason = "lease_lost"
        elif self._past_deadline():
            self.stop_reason = "deadline"
        elif (now := self.clock()) - self._last_poll >= CANCEL_POLL_SECONDS:
            self._last_poll = now
            try:
                with self.make_session() as s:
                    row = s.execute(select(Job.status, Job.lease_owner).where(Job.id == self.job_id)).first()
            except Exception as e:  # noqa: BLE001 - a blip: ask again at the next poll
                if not is_transient_db_error(e):
                    raise
                log.warning("job %s: status poll failed: %s", self.job_id, e)
                return False
            if row is None or (self.owner is not None and row.lease_owner != self.owner):
                self.stop_reason = "lease_lost"
            elif row.status != "running":
                self.stop_reason = "cancel"
        return self.stop_reason is not None


def _headline_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The job's ``metrics``: the report's flat ``headline``, its per-SAE ``metrics`` under ``by_sae``, and the
    throughput record of the run under ``throughput`` (device, sizes, seconds per stage:
    :func:`service.estimate.throughput_record`; what ``POST /v1/jobs/estimate`` learns its rates from)."""
    metrics = dict(report.get("headline") or {})
    if report.get("metrics") is not None:
        metrics["by_sae"] = report["metrics"]
    device = str((report.get("host_model") or {}).get("device") or "cpu")
    record = throughput_record(report, device_label(device))
    if record is not None:
        metrics[THROUGHPUT_KEY] = record
    return json_safe(metrics)


class _Stop(Exception):
    """Internal: the job must stop for ``reason`` ("lease_lost" or "deadline")."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _oom_types() -> tuple[type[BaseException], ...]:
    import torch

    types: list[type[BaseException]] = [MemoryError]
    for name in ("OutOfMemoryError",):
        t = getattr(torch, name, None) or getattr(torch.cuda, name, None)
        if isinstance(t, type):
            types.append(t)
    return tuple(types)


def _oom_detail(req: dict[str, Any], exc: BaseException) -> str:
    s = (req or {}).get("settings") or {}
    ft, data, cal = s.get("finetune") or {}, s.get("data") or {}, s.get("calibrate") or {}
    return (
        f"out of memory ({type(exc).__name__}) at the requested sizes (finetune.batch_size="
        f"{ft.get('batch_size', 'default')}, data.batch_size={data.get('batch_size', 'default')}, "
        f"calibrate.tokens={cal.get('tokens', 'default')}): submit again with smaller values, or run on "
        "a worker with more memory. Not retried: the same sizes would fail again"
    )


def _finish(
    make_session: sessionmaker[Session], settings: Settings, job_id: str, owner: str, status: str, **values: Any
) -> bool:
    """Move the job to terminal ``status`` if ``owner`` still holds its lease; delete its scratch (and, unless
    succeeded, its artifacts) inside the same transaction, so no one sees a finished job with leftovers and
    no one else's files are deleted (the row lock blocks the reaper and other workers meanwhile)."""

    def tx() -> bool:
        with make_session.begin() as s:
            if not transition(
                s,
                job_id,
                ACTIVE,
                status,
                where=(Job.lease_owner == owner,),
                lease_owner=None,
                lease_expires_at=None,
                **values,
            ):
                return False
            discard_dirs(settings, job_id)
            return True

    ok = db_retry(tx)
    if not ok:
        log.warning("job %s: could not move to %s (lease lost or status changed under us)", job_id, status)
    return ok


def _fail(
    make_session: sessionmaker[Session],
    settings: Settings,
    job_id: str,
    owner: str,
    code: str,
    detail: str,
    field: str | None = None,
) -> bool:
    return _finish(
        make_session, settings, job_id, owner, "failed", error={"code": code, "detail": detail, "field": field}
    )


def run_job(job_id: str, settings: Settings) -> str | None:
    """Run job ``job_id`` under a lease until it ends; returns the terminal status this call set, or None
    (the job was not queued — a duplicate message — or the lease was lost and the job left to the reaper).

    Steps: :func:`worker.lease.claim` (conditional UPDATE from ``queued``); a :class:`worker.lease.Heartbeat`
    renews the lease; the pipeline runs with checkpoints in ``<work_dir>/<job id>`` (kept across attempts,
    so a re-queued job resumes; checkpoint renames fenced by the lease: :meth:`JobReporter.fence`) and
    writes artifacts to a per-attempt staging folder, published in two commits (:mod:`worker.publish`:
    ``publishing`` first, then the files move, then ``succeeded``; the work dir is deleted after that).
    A cancel that arrives before the publish commit ends the job ``cancelled``, even if the pipeline
    already finished. Cancellation, lease loss and the deadline are checked between steps; Celery's soft
    time limit (``SoftTimeLimitExceeded``) ends the job ``deadline_exceeded``. Before anything is fetched,
    :func:`service.bounds.worker_preflight` checks paths and bounds again; hub files are downloaded one by one,
    and cancellation and the deadline are also checked between downloaded files and extraction batches.
    Errors (also a bound exceeded, with its code and field):
    ``RSAEError`` (bad teacher, model, data) and out-of-memory fail at once with an actionable message;
    transient database errors are retried (tenacity) and, if they persist, leave the job to the reaper.
    """
    make_session = get_sessionmaker(settings.database_url, DbTimeouts.from_settings(settings))
    owner = new_owner()
    c = claim(make_session, job_id, owner, settings)
    if c is None:
        log.info(
            "job %s is not queued (%s): duplicate or stale message, skipped", job_id, describe(make_session, job_id)
        )
        return None

    staging = settings.artifacts_dir / job_id / f".staging-{c.attempt}-{owner.rsplit(':', 1)[-1]}"
    work_dir = settings.work_dir / job_id
    heartbeat = Heartbeat(make_session, job_id, owner, settings)
    heartbeat.start()
    reporter = JobReporter(
        make_session,
        job_id,
        owner=owner,
        heartbeat=heartbeat,
        deadline_at=c.deadline_at,
        attempt=c.attempt,
        deadline_in=c.deadline_in,
        lease_seconds=settings.lease_seconds,
    )
    status: str | None = None
    publishing = False  # once committed, the staging folder belongs to the publish (never deleted here)
    try:
        reporter.check_stop()
        req = JobCreate.model_validate(c.request)
        plan = worker_preflight(req, settings)  # paths resolved under the roots, bounds, hub sizes
        with make_session() as s:
            teacher = resolve_teacher(
                s,
                settings,
                req.teacher,
                dest=work_dir / "teacher",
                hub_files=plan.teacher,
                should_cancel=reporter.should_cancel,
            )
            refs = artifact_refs(s, req)  # the artifacts name the inputs by id, name and sha256, not by folder
            corpus = resolve_upload(s, settings, req.settings.data.dataset, None)  # upload:<id> -> its file
            if corpus is not None:
                use_upload(req, settings, corpus)
        fetch_model(req, plan, reporter.should_cancel)  # file by file, cancellable between files
        check_disk_budget(req, settings, *job_width(None, req, teacher))
        cfg = build_upgrade_config(req, teacher)
        shutil.rmtree(staging, ignore_errors=True)
        report = run_upgrade(
            cfg,
            staging,
            work_dir=work_dir,
            on_progress=reporter,
            should_cancel=reporter.should_cancel,
            checkpoint_every=settings.checkpoint_every_steps,
            on_checkpoint=reporter.on_checkpoint,
            fence=reporter.fence,
            refs=refs,
        )
        reporter.check_stop()
        began = begin_publish(make_session, settings, job_id, owner, staging, _headline_metrics(report))
        if began == "cancelling":
            raise Cancelled("cancelled while packaging")
        if began == "lost":
            raise _Stop("lease_lost")
        publishing = True
        status = "succeeded" if finish_publish(make_session, settings, job_id, owner) else None
    except (Cancelled, _Stop, SoftTimeLimitExceeded) as e:
        if isinstance(e, _Stop):
            reason = e.reason
        elif isinstance(e, SoftTimeLimitExceeded):
            reason = "deadline"
        else:
            reason = reporter.stop_reason
        if publishing:  # a soft time limit during the file moves: the publish stays, the reaper ends it
            log.warning("job %s: stopped while publishing (%s); the reaper completes the publish", job_id, reason)
        elif reason == "lease_lost":
            log.warning("job %s: lease lost; this copy stops and leaves the job to its new owner", job_id)
        elif reason == "deadline":
            status = (
                "failed"
                if _fail(
                    make_session,
                    settings,
                    job_id,
                    owner,
                    "deadline_exceeded",
                    f"the job passed its deadline ({c.deadline_at:%Y-%m-%d %H:%M:%S} UTC, "
                    f"RSAE_JOB_DEADLINE_SECONDS={settings.job_deadline_seconds:g}); "
                    "use smaller settings or raise the deadline",
                )
                else None
            )
        else:
            status = "cancelled" if _finish(make_session, settings, job_id, owner, "cancelled") else None
    except RSAEError as e:
        status = "failed" if _fail(make_session, settings, job_id, owner, e.code, e.message, e.field) else None
    except ProblemError as e:  # a bound or path rule of service.bounds (settings may have changed since)
        status = "failed" if _fail(make_session, settings, job_id, owner, e.code, e.detail, e.field) else None
    except ValidationError as e:
        log.error("job %s: stored request no longer validates: %s", job_id, e)
        problems = "; ".join(f"{x['field']}: {x['detail']}" for x in validation_errors(e.errors())[:5])
        detail = f"stored request no longer validates: {problems}"
        status = "failed" if _fail(make_session, settings, job_id, owner, "invalid_request", detail) else None
    except Exception as e:  # noqa: BLE001 - classify, then record on the row
        if publishing:  # the row says publishing: only finish_publish may end it (here or by the reaper)
            log.exception(
                "job %s: publishing failed; the job stays publishing and the reaper completes it once the lease "
                "lapses (%.0f s)",
                job_id,
                settings.lease_seconds,
            )
        elif isinstance(e, _oom_types()):
            log.error("job %s: out of memory: %s", job_id, e)
            status = (
                "failed"
                if _fail(make_session, settings, job_id, owner, "out_of_memory", _oom_detail(c.request, e))
                else None
            )
        elif is_transient_db_error(e):
            log.error(
                "job %s: database unreachable (%s); leaving the job to the reaper (lease expires in "
                "%.0f s, then it is re-queued and resumes from its checkpoint)",
                job_id,
                e,
                settings.lease_seconds,
            )
        else:
            log.exception("job %s failed", job_id)
            status = (
                "failed"
                if _fail(
                    make_session,
                    settings,
                    job_id,
                    owner,
                    "internal_error",
                    f"{type(e).__name__}: {redact(str(e), 500)} (details in the worker log)",
                )
                else None
            )
    finally:
        heartbeat.stop()
        if status is None and not publishing:
            shutil.rmtree(staging, ignore_errors=True)  # our partial output only; the work dir stays
    log.info("job %s: %s", job_id, status or "left to its new owner / the reaper")
    if status is not None:
        notify_in_background(make_session, settings, job_id)  # no-op unless the job asked for a webhook
    return status


@shared_task(name=TASK_UPGRADE, ignore_result=True)
def upgrade(job_id: str) -> None:
    """Celery entry point: run job ``job_id`` (the message carries nothing else)."""
    run_job(job_id, get_settings())


@worker_process_init.connect
def _start_reaper(**_: Any) -> None:
    """Start this worker process's reaper thread (every worker reaps; all changes are conditional)."""
    start_reaper(get_settings())


_reaper: Reaper | None = None


def start_reaper(settings: Settings) -> Reaper:
    """Start (once per process) a :class:`worker.lease.Reaper` publishing through a Celery client of its own."""
    global _reaper
    if _reaper is None or not _reaper.is_alive():
        app = create_celery(settings)  # publishes only: the reaper sends messages, it runs no tasks
        _reaper = Reaper(
            settings,
            get_sessionmaker(settings.database_url, DbTimeouts.from_settings(settings)),
            lambda job_id: enqueue_upgrade(app, job_id, retries=settings.enqueue_retries),
        )
        _reaper.start()
    return _reaper
