"""Storage bounds (issue 11): deleting teacher SAEs and jobs, the per-user storage quota, artifact retention.

What a user stores: their uploaded teachers (``<uploads>/<sae id>/``, size on ``saes.size_bytes``), the
artifacts of their jobs (``<artifacts>/<job id>/sae/``, sizes on the ``artifacts`` rows) and, while a job is
unfinished, an estimate of the artifacts it will write (:func:`output_estimate`). Scratch (``<work>/<job>/``)
is transient and not counted.

Deletion follows the rest of the service: **the SQL row is the truth**. A row is deleted (or marked) and
committed first, then its files are removed. A crash in between leaves files without a row, which the
reaper's :func:`sweep_orphans` removes after :data:`ORPHAN_MIN_AGE_SECONDS`; nobody ever sees a row whose
files were deleted (except an artifact deleted by retention, which answers 410 Gone).

- ``DELETE /saes/{id}`` (:func:`delete_sae`): refused with 409 ``sae_in_use`` while an unfinished job of the
  owner uses the SAE as its teacher; else row and folder go (204). Again: 404.
- ``DELETE /jobs/{id}`` (:func:`request_job_deletion`): a queued or finished job goes at once (row, events,
  artifact rows by cascade, artifact and scratch folders; 204). A running job is cancelled (``cancelling``)
  and marked ``deleted_at`` (202); the worker stops at its next check and the reaper's
  :func:`purge_deleted_jobs` removes it once it is terminal. Again: 202 while pending, 404 once gone.
- Quota (:func:`check_storage`): 413 ``storage_quota_exceeded`` with ``used_bytes``, ``limit_bytes``,
  ``requested_bytes``.
- Retention (:func:`expire_artifacts`): succeeded jobs finished more than ``RSAE_RETENTION_DAYS`` ago lose
  their artifact files and rows; the job row keeps ``expired_at``, its events and metrics.

:func:`storage_pass` is what the reaper (``worker.lease.reap_once``) runs each pass.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from .config import Settings
from .jobs import transition
from .models import TERMINAL_STATUSES, Artifact, Dataset, Job, Sae, User, is_uuid, utcnow
from .problems import ProblemError

log = logging.getLogger(__name__)

ESTIMATE_BYTES_PER_WEIGHT = 8
"""Bytes per ``d_in * d_sae`` of an upgraded SAE's artifacts: float32 ``W_enc`` and ``W_dec`` (the per-latent
tensors and the reports are covered by :data:`ESTIMATE_OVERHEAD_BYTES`)."""
ESTIMATE_OVERHEAD_BYTES = 1024**2
"""Bytes added to every job's estimate: biases, gate parameters, cfg.json, report.json, report.html."""
ORPHAN_MIN_AGE_SECONDS = 3600.0
"""An artifacts or uploads folder with no row is deleted by :func:`sweep_orphans` only once this old
(an upload moves its folder in place a moment before inserting its row)."""
ORPHAN_SWEEP_EVERY_SECONDS = 600.0
"""Least interval between two orphan sweeps of one process (:func:`storage_pass`; they list folders)."""
_BATCH = 500


# -- sizes -----------------------------------------------------------------------------------------
def dir_bytes(path: Path) -> int:
    """Total size in bytes of the regular files under ``path`` (symbolic links not followed; 0 if missing)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def output_estimate(d_in: int, d_sae: int) -> int:
    """Bytes an upgrade of a ``d_in`` x ``d_sae`` teacher is expected to store as artifacts:
    ``ESTIMATE_BYTES_PER_WEIGHT * d_in * d_sae + ESTIMATE_OVERHEAD_BYTES``."""
    return ESTIMATE_BYTES_PER_WEIGHT * d_in * d_sae + ESTIMATE_OVERHEAD_BYTES


def _teacher_sae_id(request: dict[str, Any] | None) -> str | None:
    sae_id = ((request or {}).get("teacher") or {}).get("sae_id")
    return sae_id if isinstance(sae_id, str) and is_uuid(sae_id) else None


def job_output_estimates(session: Session, requests: Iterable[dict[str, Any] | None]) -> list[int]:
    """:func:`output_estimate` of each job request whose teacher is an uploaded SAE (``teacher.sae_id``);
    0 for hub and server-side teachers, whose size is unknown before the worker reads them."""
    requests = list(requests)
    ids = {i for r in requests if (i := _teacher_sae_id(r)) is not None}
    rows = session.execute(select(Sae.id, Sae.d_in, Sae.d_sae).where(Sae.id.in_(ids))) if ids else []
    shapes = {row.id: (row.d_in, row.d_sae) for row in rows}
    out = []
    for r in requests:
        shape = shapes.get(_teacher_sae_id(r) or "")
        out.append(0 if shape is None else output_estimate(*shape))
    return out


# -- quota -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StorageUsage:
    """Bytes a user stores: ``uploads`` (teachers), ``artifacts`` (of their jobs), ``reserved`` (the
    estimated artifacts of their unfinished jobs) and ``datasets`` (uploaded corpora, ``POST /datasets``)."""

    uploads: int
    artifacts: int
    reserved: int
    datasets: int = 0

    @property
    def total(self) -> int:
        """``uploads + artifacts + reserved + datasets``."""
        return self.uploads + self.artifacts + self.reserved + self.datasets


def unfinished_jobs(session: Session, user_id: str) -> list[tuple[str, dict[str, Any]]]:
    """``(id, request)`` of the user's jobs that are not terminal (at most ``max_active_jobs_per_user``)."""
    rows = session.execute(
        select(Job.id, Job.request)
        .where(Job.owner_id == user_id, Job.status.not_in(tuple(TERMINAL_STATUSES)))
        .order_by(Job.created_at)
    )
    return [(r.id, r.request) for r in rows]


def storage_usage(session: Session, settings: Settings, user_id: str) -> StorageUsage:
    """What ``user_id`` stores now (see :class:`StorageUsage`).

    Teachers uploaded before sizes were recorded (``size_bytes`` NULL) are measured on disk here and their
    size is written back in ``session`` (flushed, committed by the caller).
    """
    for row in session.scalars(select(Sae).where(Sae.owner_id == user_id, Sae.size_bytes.is_(None))):
        row.size_bytes = dir_bytes(settings.uploads_dir / row.path)
    session.flush()
    uploads = session.scalar(select(func.coalesce(func.sum(Sae.size_bytes), 0)).where(Sae.owner_id == user_id))
    artifacts = session.scalar(
        select(func.coalesce(func.sum(Artifact.size), 0))
        .join(Job, Job.id == Artifact.job_id)
        .where(Job.owner_id == user_id)
    )
    reserved = sum(job_output_estimates(session, (req for _id, req in unfinished_jobs(session, user_id))))
    datasets = session.scalar(select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.owner_id == user_id))
    return StorageUsage(uploads=int(uploads), artifacts=int(artifacts), reserved=int(reserved), datasets=int(datasets))


def _mib(n: int) -> str:
    return f"{n / 1024**2:,.1f} MiB"


def check_storage(session: Session, settings: Settings, user_id: str, adding: int, *, what: str) -> StorageUsage:
    """Refuse to store ``adding`` more bytes for ``user_id`` beyond ``max_storage_bytes_per_user`` (also when
    ``adding`` is 0 and the user is already at or over it). The caller holds the user's row lock, so one
    user's concurrent uploads and submissions cannot both pass.

    Args:
        adding: bytes the request will store (an upload's stored folder, a job's :func:`output_estimate`).
        what: the request in words, for the message ("this upload", "this job's estimated artifacts").

    Returns:
        The usage before the request.

    Raises:
        ProblemError: 413 ``storage_quota_exceeded`` (field ``body``) carrying ``used_bytes``, ``limit_bytes``,
            ``requested_bytes`` and ``usage`` (``uploads``, ``artifacts``, ``reserved``, ``datasets``).
    """
    usage = storage_usage(session, settings, user_id)
    limit = settings.max_storage_bytes_per_user
    if usage.total >= limit or usage.total + adding > limit:
        raise ProblemError(
            413,
            "storage_quota_exceeded",
            f"storage quota exceeded: you store {usage.total} bytes ({_mib(usage.total)}: uploads "
            f"{usage.uploads}, job artifacts {usage.artifacts}, reserved for unfinished jobs {usage.reserved}, "
            f"corpora {usage.datasets}) "
            f"of your {limit} bytes ({_mib(limit)}, RSAE_MAX_STORAGE_BYTES_PER_USER); {what} needs {adding} "
            "more. Free space with DELETE /v1/saes/{id}, DELETE /v1/datasets/{id} or DELETE /v1/jobs/{id}",
            field="body",
            used_bytes=usage.total,
            limit_bytes=limit,
            requested_bytes=adding,
            usage={
                "uploads": usage.uploads,
                "artifacts": usage.artifacts,
                "reserved": usage.reserved,
                "datasets": usage.datasets,
            },
        )
    return usage


def lock_user(session: Session, user_id: str) -> None:
    """Lock the user's row until the transaction ends (serialises one user's uploads, submissions and
    deletions on Postgres; a no-op on SQLite, whose writers are serialised anyway)."""
    session.scalar(select(User.id).where(User.id == user_id).with_for_update())


# -- files -----------------------------------------------------------------------------------------
def _remove_under(root: Path, rel: str) -> None:
    """``rmtree(root / rel)`` if it lies strictly inside ``root`` (never ``root`` itself or outside it)."""
    root = root.resolve()
    path = (root / rel).resolve()
    if path != root and path.is_relative_to(root):
        shutil.rmtree(path, ignore_errors=True)


def delete_job_files(settings: Settings, job_id: str) -> None:
    """Delete a job's artifacts folder and scratch folder (both may be missing)."""
    _remove_under(settings.artifacts_dir, job_id)
    _remove_under(settings.work_dir, job_id)


# -- deletion --------------------------------------------------------------------------------------
def delete_sae(session: Session, settings: Settings, sae: Sae) -> None:
    """Delete the uploaded teacher ``sae`` (row committed first, then its folder).

    Raises:
        ProblemError: 409 ``sae_in_use`` (field ``id``, ``job_ids``) while an unfinished job of the owner uses
            it as its teacher (only the owner can use it; finished jobs keep their request echo only).
    """
    lock_user(session, sae.owner_id)  # a POST /jobs naming this SAE waits, then finds it gone (422)
    using = [job_id for job_id, req in unfinished_jobs(session, sae.owner_id) if _teacher_sae_id(req) == sae.id]
    if using:
        raise ProblemError(
            409,
            "sae_in_use",
            f"SAE {sae.id} is the teacher of unfinished job(s) {', '.join(using)}; wait until they end or "
            "cancel them (POST /jobs/{id}/cancel), then delete it",
            field="id",
            job_ids=using,
        )
    session.execute(delete(Sae).where(Sae.id == sae.id), execution_options={"synchronize_session": False})
    session.commit()
    _remove_under(settings.uploads_dir, sae.path)


def _delete_job_row(session: Session, job_id: str, statuses: Iterable[str]) -> bool:
    """Delete the job row (its events and artifact rows go by ``ON DELETE CASCADE``) if its status is in
    ``statuses``. Not committed."""
    res = session.execute(
        delete(Job).where(Job.id == job_id, Job.status.in_(tuple(statuses))),
        execution_options={"synchronize_session": False},
    )
    return res.rowcount == 1


def request_job_deletion(session: Session, settings: Settings, job_id: str) -> Literal["deleted", "pending"]:
    """Delete job ``job_id`` now, or cancel it and leave the deletion to the reaper.

    - ``queued`` or terminal: row, events and artifact rows deleted and committed, then its artifact and
      scratch folders (a message still in the broker finds no row and is skipped) -> ``"deleted"``;
    - ``running``: -> ``cancelling`` with ``deleted_at`` set; ``cancelling`` or ``publishing`` (a publish is
      never interrupted): ``deleted_at`` set -> ``"pending"``
      (the worker stops at its next check; :func:`purge_deleted_jobs` deletes the job once it is terminal).

    Every change is conditional on the status read, under the row lock (Postgres); a status that changed
    meanwhile is read again. Commits.

    Raises:
        ProblemError: 409 ``job_busy`` if the status kept changing under three tries (not expected).
    """
    for _ in range(3):
        status = session.scalar(select(Job.status).where(Job.id == job_id).with_for_update())
        if status is None:  # deleted by a concurrent request
            return "deleted"
        if status == "running":
            if transition(session, job_id, {"running"}, "cancelling", deleted_at=utcnow()):
                session.commit()
                return "pending"
        elif status in ("cancelling", "publishing"):  # ends soon by itself; deleted once terminal
            res = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == status)
                .values(deleted_at=func.coalesce(Job.deleted_at, utcnow())),
                execution_options={"synchronize_session": False},
            )
            if res.rowcount == 1:
                session.commit()
                return "pending"
        elif _delete_job_row(session, job_id, {"queued", *TERMINAL_STATUSES}):
            session.commit()
            delete_job_files(settings, job_id)
            return "deleted"
        session.rollback()
    raise ProblemError(409, "job_busy", f"job {job_id} changed status while being deleted; try again", field="id")


def purge_deleted_jobs(settings: Settings, make_session: sessionmaker[Session]) -> list[str]:
    """Delete the jobs marked ``deleted_at`` that have ended (rows, then folders); returns their ids.

    Safe in many processes at once (rows locked ``SKIP LOCKED``; the delete is conditional)."""
    with make_session.begin() as s:
        ids = list(
            s.scalars(
                select(Job.id)
                .where(Job.deleted_at.is_not(None), Job.status.in_(tuple(TERMINAL_STATUSES)))
                .limit(_BATCH)
                .with_for_update(skip_locked=True)
            )
        )
        gone = [i for i in ids if _delete_job_row(s, i, TERMINAL_STATUSES)]
    for job_id in gone:
        delete_job_files(settings, job_id)
    return gone


# -- retention -------------------------------------------------------------------------------------
def expire_artifacts(
    settings: Settings, make_session: sessionmaker[Session], *, now: datetime | None = None
) -> list[str]:
    """Apply ``retention_days``: succeeded jobs finished before ``now - retention_days`` lose their artifact
    rows and files; the job row gets ``expired_at`` (downloads then answer 410). Returns the job ids
    expired (none when ``retention_days`` is unset). Safe in many processes at once."""
    if settings.retention_days is None:
        return []
    now = now or utcnow()
    cutoff = now - timedelta(days=settings.retention_days)
    with make_session.begin() as s:
        ids = list(
            s.scalars(
                select(Job.id)
                .where(Job.status == "succeeded", Job.expired_at.is_(None), Job.finished_at < cutoff)
                .order_by(Job.finished_at)
                .limit(_BATCH)
                .with_for_update(skip_locked=True)
            )
        )
        if ids:
            s.execute(
                update(Job).where(Job.id.in_(ids), Job.expired_at.is_(None)).values(expired_at=now, updated_at=now),
                execution_options={"synchronize_session": False},
            )
            s.execute(
                delete(Artifact).where(Artifact.job_id.in_(ids)), execution_options={"synchronize_session": False}
            )
    for job_id in ids:
        _remove_under(settings.artifacts_dir, job_id)
    return ids


# -- orphans ---------------------------------------------------------------------------------------
def sweep_orphans(
    settings: Settings, make_session: sessionmaker[Session], *, min_age: float = ORPHAN_MIN_AGE_SECONDS
) -> list[str]:
    """Delete folders, older than ``min_age`` seconds, that no row owns: ``<artifacts>/<id>`` of a job that
    is gone or expired, ``<uploads>/<id>`` of an SAE or ``<datasets>/<id>`` of a corpus that is gone (left by
    a crash between a committed deletion and the removal of the files, or by a worker that lost its job). Only
    folders named like ids are considered (temporary ``.upload-*`` folders are their request's). Returns the
    paths removed."""
    cutoff = time.time() - min_age
    removed: list[str] = []
    for root, model in ((settings.artifacts_dir, Job), (settings.uploads_dir, Sae), (settings.datasets_dir, Dataset)):
        if root is None or not root.is_dir():
            continue
        names = [p.name for p in root.iterdir() if p.is_dir() and is_uuid(p.name) and p.stat().st_mtime < cutoff]
        kept: set[str] = set()
        with make_session() as s:
            for i in range(0, len(names), _BATCH):
                q = select(model.id).where(model.id.in_(names[i : i + _BATCH]))
                if model is Job:
                    q = q.where(Job.expired_at.is_(None))
                kept.update(s.scalars(q))
        for name in names:
            if name not in kept:
                _remove_under(root, name)
                removed.append(str(root / name))
    return removed


# -- the reaper's pass -----------------------------------------------------------------------------
@dataclass
class StoragePass:
    """What one :func:`storage_pass` did: jobs purged after a deletion, jobs expired, orphan folders swept."""

    purged: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    swept: list[str] = field(default_factory=list)


_last_sweep = float("-inf")


def storage_pass(settings: Settings, make_session: sessionmaker[Session]) -> StoragePass:
    """The reaper's storage work (called by ``worker.lease.reap_once`` every pass): :func:`purge_deleted_jobs`,
    :func:`expire_artifacts`, and, at most every :data:`ORPHAN_SWEEP_EVERY_SECONDS` per process,
    :func:`sweep_orphans`. Errors propagate (the reaper logs them and tries again next pass)."""
    global _last_sweep
    out = StoragePass(purge_deleted_jobs(settings, make_session), expire_artifacts(settings, make_session))
    if time.monotonic() - _last_sweep >= ORPHAN_SWEEP_EVERY_SECONDS:
        _last_sweep = time.monotonic()
        out.swept = sweep_orphans(settings, make_session)
    if out.purged or out.expired or out.swept:
        log.info("storage: purged deleted jobs %s, expired the artifacts of %s, swept %s", *vars(out).values())
    return out
