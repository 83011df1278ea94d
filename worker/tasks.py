"""The Celery task ``rsae.upgrade``: run one job through :func:`rsae.pipeline.run_upgrade`.

Thin on purpose: it moves the job row through its states, feeds the pipeline's progress and metrics into
SQL, answers the pipeline's cancellation polls from SQL, and registers the artifacts. Heavy modules
(torch) are imported inside the task only, so the prefork parent never initialises torch or CUDA; the
SQL engine is likewise created lazily in the child, so no connection crosses a fork.
"""

from __future__ import annotations

import logging
import math
import mimetypes
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import shared_task
from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from rsae.config import STAGES
from rsae.errors import Cancelled, RSAEError
from rsae.pipeline import ARTIFACT_FILES, run_upgrade
from service.config import Settings, get_settings
from service.db import get_sessionmaker
from service.jobs import add_event, build_upgrade_config, resolve_teacher, transition
from service.models import Artifact, Job, utcnow
from service.schemas import JobCreate

from .celery_app import TASK_UPGRADE

log = logging.getLogger(__name__)

ACTIVE = ("running", "cancelling")
"""Statuses in which the worker owns the job."""
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
    """The pipeline's ``on_progress`` and ``should_cancel`` for one job, writing to and reading from SQL.

    Args:
        make_session: session factory.
        job_id: the job.
        clock: monotonic clock in seconds (injectable for tests).
    """

    def __init__(self, make_session: sessionmaker[Session], job_id: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.make_session, self.job_id, self.clock = make_session, job_id, clock
        self._stage: str | None = None
        self._last_write = self._last_poll = -math.inf
        self._event_progress = -math.inf
        self._cancel = False

    def __call__(self, stage: str, progress: float, metrics: dict[str, Any] | None = None) -> None:
        """Record ``stage``/``progress`` on the job row (throttled) and ``metrics`` as an event."""
        now = self.clock()
        stage_changed = stage != self._stage
        if not stage_changed and metrics is None and now - self._last_write < PROGRESS_WRITE_SECONDS:
            return
        if stage_changed and stage not in STAGES:
            log.warning("job %s: pipeline reported unknown stage %r", self.job_id, stage)
        progress = min(1.0, max(0.0, float(progress)))
        with self.make_session.begin() as s:
            s.execute(update(Job).where(Job.id == self.job_id, Job.status.in_(ACTIVE))
                      .values(stage=stage, progress=progress, updated_at=utcnow()))
            if stage_changed or progress - self._event_progress >= PROGRESS_EVENT_STEP:
                add_event(s, self.job_id, "progress", {"stage": stage, "progress": progress})
                self._event_progress = progress
            if metrics is not None:
                add_event(s, self.job_id, "metrics", {"stage": stage, **json_safe(metrics)})
        self._stage, self._last_write = stage, now

    def should_cancel(self) -> bool:
        """True once the job is ``cancelling`` (or no longer ours); reads SQL at most every 2 s."""
        now = self.clock()
        if not self._cancel and now - self._last_poll >= CANCEL_POLL_SECONDS:
            self._last_poll = now
            with self.make_session() as s:
                status = s.scalar(select(Job.status).where(Job.id == self.job_id))
            self._cancel = status != "running"
        return self._cancel


def _headline_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The job's ``metrics``: the report's flat ``headline`` plus its per-SAE ``metrics`` under ``by_sae``."""
    metrics = dict(report.get("headline") or {})
    if report.get("metrics") is not None:
        metrics["by_sae"] = report["metrics"]
    return json_safe(metrics)


def _register_artifacts(session: Session, settings: Settings, job_id: str, out_dir: Path) -> None:
    """Insert one ``artifacts`` row per file of ``out_dir`` (temporary dot-files skipped)."""
    from rsae.sae import sha256_file  # imports torch: only inside the task

    for f in sorted(out_dir.iterdir()):
        if not f.is_file() or f.name.startswith("."):
            continue
        kind, ctype = ARTIFACT_FILES.get(
            f.name, ("other", mimetypes.guess_type(f.name)[0] or "application/octet-stream"))
        session.add(Artifact(job_id=job_id, name=f.name, kind=kind, content_type=ctype,
                             size=f.stat().st_size, sha256=sha256_file(f),
                             path=str(f.relative_to(settings.artifacts_dir)), created_at=utcnow()))


def _finish(make_session: sessionmaker[Session], job_id: str, status: str, **values: Any) -> bool:
    with make_session.begin() as s:
        ok = transition(s, job_id, ACTIVE, status, **values)
    if not ok:
        log.warning("job %s: could not move to %s (status changed under us)", job_id, status)
    return ok


def _fail(make_session: sessionmaker[Session], job_id: str, code: str, detail: str,
          field: str | None = None) -> None:
    _finish(make_session, job_id, "failed", error={"code": code, "detail": detail, "field": field})


def _discard(settings: Settings, job_id: str, work_dir: Path) -> None:
    """Delete a job's scratch folder and partial artifacts (before it is marked failed or cancelled)."""
    shutil.rmtree(work_dir, ignore_errors=True)
    shutil.rmtree(settings.artifacts_dir / job_id, ignore_errors=True)


def run_job(job_id: str, settings: Settings) -> str | None:
    """Run job ``job_id`` to a terminal status; returns that status (None if the job was not queued).

    The queued -> running claim is a conditional UPDATE, so a duplicate message, a cancelled job or an
    unknown id is a no-op.
    """
    make_session = get_sessionmaker(settings.database_url)
    with make_session.begin() as s:
        claimed = transition(s, job_id, {"queued"}, "running", started_at=utcnow(), attempt=Job.attempt + 1,
                             stage=None, progress=0.0, error=None)
        if claimed:
            add_event(s, job_id, "log", {"message": f"started on {socket.gethostname()} pid {os.getpid()}"})
    if not claimed:
        log.info("job %s is not queued (taken, cancelled or unknown): skipped", job_id)
        return None

    out_dir = settings.artifacts_dir / job_id / "sae"
    work_dir = settings.work_dir / job_id
    reporter = JobReporter(make_session, job_id)
    status = "failed"
    try:
        with make_session() as s:
            req = JobCreate.model_validate(s.get(Job, job_id).request)
            cfg = build_upgrade_config(req, resolve_teacher(s, settings, req.teacher))
        report = run_upgrade(cfg, out_dir, work_dir=work_dir, on_progress=reporter,
                             should_cancel=reporter.should_cancel)
        shutil.rmtree(work_dir, ignore_errors=True)  # scratch gone before anyone can see 'succeeded'
        with make_session.begin() as s:
            if transition(s, job_id, ACTIVE, "succeeded", stage=STAGES[-1], progress=1.0,
                          metrics=_headline_metrics(report)):
                _register_artifacts(s, settings, job_id, out_dir)
                status = "succeeded"
    except Cancelled:
        _discard(settings, job_id, work_dir)  # before the terminal status, so no one sees leftovers
        status = "cancelled" if _finish(make_session, job_id, "cancelled") else status
    except RSAEError as e:
        _discard(settings, job_id, work_dir)
        _fail(make_session, job_id, e.code, e.message, e.field)
    except ValidationError as e:
        _discard(settings, job_id, work_dir)
        _fail(make_session, job_id, "invalid_request", f"stored request no longer validates: {e}")
    except Exception as e:  # noqa: BLE001 - any other failure is recorded on the row
        log.exception("job %s failed", job_id)
        _discard(settings, job_id, work_dir)
        _fail(make_session, job_id, "internal_error", f"{type(e).__name__}: {e}")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        if status != "succeeded":
            shutil.rmtree(settings.artifacts_dir / job_id, ignore_errors=True)
    log.info("job %s %s", job_id, status)
    return status


@shared_task(name=TASK_UPGRADE, ignore_result=True)
def upgrade(job_id: str) -> None:
    """Celery entry point: run job ``job_id`` (the message carries nothing else)."""
    run_job(job_id, get_settings())
