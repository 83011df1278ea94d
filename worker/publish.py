"""Publishing a finished job's artifacts in two commits, so a crash at any point finishes the same publish.

1. :func:`begin_publish`: one conditional UPDATE ``running -> publishing`` by the lease holder (lease not
   expired, by the database clock) records the staging folder (``jobs.publish_dir``), the headline metrics,
   stage and progress, and commits. A job in ``cancelling`` never gets here: it ends ``cancelled``.
2. :func:`publish_files`: the staging folder is renamed to ``<artifacts>/<job>/sae`` (replacing an older set)
   and leftover staging folders are removed. Idempotent: after a crash before or after the rename, running it
   again ends in the same state.
3. :func:`finish_publish`: the artifact rows (sha256, size) are registered and the job becomes ``succeeded``
   in one commit (``WHERE status = 'publishing' AND lease_owner = me``); only after that commit is the work
   folder (checkpoints) deleted. If the commit fails, the job is still ``publishing`` with its checkpoints:
   the worker retries (transient errors), else its lease lapses and the reaper (:func:`worker.lease.reap_once`)
   takes the lease and calls :func:`finish_publish` itself.
"""

from __future__ import annotations

import logging
import mimetypes
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from rsae.config import STAGES
from rsae.pipeline import ARTIFACT_FILES
from service.config import Settings
from service.db import db_now
from service.jobs import transition
from service.models import Artifact, Job, utcnow

from .lease import db_retry

log = logging.getLogger(__name__)

FINAL_DIR = "sae"
"""Name of a job's published artifact folder under ``<artifacts>/<job id>/``."""


class PublishLost(RuntimeError):
    """A ``publishing`` job has neither its staging folder nor a published folder (e.g. the artifacts dir
    is not shared with this machine): the publish cannot be completed; the job must run again."""


@dataclass(frozen=True)
class _File:
    name: str
    kind: str
    content_type: str
    size: int
    sha256: str
    path: str


def begin_publish(
    make_session: sessionmaker[Session],
    settings: Settings,
    job_id: str,
    owner: str,
    staging: Path,
    metrics: dict[str, Any],
) -> str:
    """Commit ``running -> publishing`` for ``owner``'s job (lease renewed for the publish).

    Args:
        staging: the folder the pipeline wrote (under ``settings.artifacts_dir``).
        metrics: the job's headline metrics (stored now; the API shows them once ``succeeded``).

    Returns:
        ``"publishing"`` (committed), ``"cancelling"`` (a cancel arrived first: the caller ends the job
        ``cancelled``) or ``"lost"`` (the lease is gone or expired: the caller touches nothing).
    """

    def tx() -> str:
        with make_session.begin() as s:
            if transition(
                s,
                job_id,
                {"running"},
                "publishing",
                where=(Job.lease_owner == owner, Job.lease_expires_at > db_now()),
                lease_expires_at=db_now(settings.lease_seconds),
                stage=STAGES[-1],
                progress=1.0,
                metrics=metrics,
                publish_dir=str(staging.relative_to(settings.artifacts_dir)),
            ):
                return "publishing"
            row = s.execute(select(Job.status, Job.lease_owner).where(Job.id == job_id)).first()
            if row is not None and row.lease_owner == owner and row.status == "cancelling":
                return "cancelling"
            return "lost"

    return db_retry(tx)


def publish_files(settings: Settings, job_id: str, publish_dir: str) -> Path:
    """Move the staging folder ``<artifacts>/<publish_dir>`` to ``<artifacts>/<job>/sae`` and delete other
    ``.staging-*`` folders of the job. Idempotent (a re-run after a crash anywhere in here ends the same).

    Returns:
        The published folder.

    Raises:
        PublishLost: neither the staging folder nor the published folder exists.
    """
    final = settings.artifacts_dir / job_id / FINAL_DIR
    staging = settings.artifacts_dir / publish_dir
    if staging.is_dir():
        if final.exists():  # an older set, or a half-deleted one from a crash in this very step
            shutil.rmtree(final)
        staging.rename(final)
    elif not final.is_dir():
        raise PublishLost(f"job {job_id}: neither {staging} nor {final} exists; the publish cannot complete")
    for other in final.parent.glob(".staging-*"):  # leftovers of dead attempts
        shutil.rmtree(other, ignore_errors=True)
    return final


def _describe_files(settings: Settings, folder: Path) -> list[_File]:
    from rsae.saes import sha256_file  # imports torch: only when publishing

    out = []
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.name.startswith("."):  # temporary dot-files skipped
            continue
        kind, ctype = ARTIFACT_FILES.get(
            f.name, ("other", mimetypes.guess_type(f.name)[0] or "application/octet-stream")
        )
        rel = str(f.relative_to(settings.artifacts_dir))
        out.append(_File(f.name, kind, ctype, f.stat().st_size, sha256_file(f), rel))
    return out


def finish_publish(make_session: sessionmaker[Session], settings: Settings, job_id: str, owner: str) -> bool:
    """Complete the publish of ``publishing`` job ``job_id`` held by ``owner``: :func:`publish_files`, then
    one commit registering the artifact rows (replacing any) and setting ``succeeded``; after that commit,
    the job's work folder is deleted. Safe to call again after a failure at any point (also by another
    process that took the lease over). Transient database errors are retried (tenacity).

    Returns:
        True if the job is ``succeeded`` (by this call or an earlier one whose commit reply was lost),
        False if it is not ``publishing`` under ``owner`` (the lease passed to someone else).

    Raises:
        PublishLost: the staged files are gone (see :func:`publish_files`).
    """

    def attempt() -> bool:
        with make_session() as s:
            row = s.execute(select(Job.status, Job.lease_owner, Job.publish_dir).where(Job.id == job_id)).first()
        if row is None or row.status != "publishing" or row.lease_owner != owner:
            return row is not None and row.status == "succeeded"
        files = _describe_files(settings, publish_files(settings, job_id, row.publish_dir))
        with make_session.begin() as s:
            if not transition(
                s,
                job_id,
                {"publishing"},
                "succeeded",
                where=(Job.lease_owner == owner,),
                lease_owner=None,
                lease_expires_at=None,
                publish_dir=None,
            ):
                return s.scalar(select(Job.status).where(Job.id == job_id)) == "succeeded"
            s.execute(delete(Artifact).where(Artifact.job_id == job_id))
            now = utcnow()
            s.add_all(
                Artifact(
                    job_id=job_id,
                    name=f.name,
                    kind=f.kind,
                    content_type=f.content_type,
                    size=f.size,
                    sha256=f.sha256,
                    path=f.path,
                    created_at=now,
                )
                for f in files
            )
        return True

    done = db_retry(attempt)
    if done:
        shutil.rmtree(settings.work_dir / job_id, ignore_errors=True)  # only after the commit
    return done
