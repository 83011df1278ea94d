"""Job state machine and job-request resolution, shared by the API and the worker.

Every status change is a conditional UPDATE from the expected states (:func:`transition`), so two actors
racing on one job (a cancel and a worker start, two workers) cannot both win.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import update
from sqlalchemy.orm import Session

from rsae.config import UpgradeConfig
from rsae.errors import TeacherError

from .config import Settings
from .models import TERMINAL_STATUSES, Job, JobEvent, Sae, is_uuid, utcnow
from .problems import validation_errors
from .schemas import SETTINGS_FIELDS, JobCreate, TeacherRef


def add_event(session: Session, job_id: str, type_: str, data: dict[str, Any]) -> None:
    """Append an event (``status``, ``progress``, ``metrics`` or ``log``) to the job's history."""
    session.add(JobEvent(job_id=job_id, type=type_, data=data, created_at=utcnow()))


def transition(
    session: Session, job_id: str, from_states: Iterable[str], to: str, *, where: Iterable[Any] = (), **values: Any
) -> bool:
    """Move job ``job_id`` to status ``to`` if it is in one of ``from_states``; record a status event.

    ``where`` are further conditions (e.g. ``Job.lease_owner == me``: only the lease holder may finish a
    job). ``values`` are further columns to set (e.g. ``error``, ``started_at``, ``attempt=Job.attempt + 1``).
    ``updated_at`` is always set, ``finished_at`` too when ``to`` is terminal. Does not commit, and does not
    refresh a loaded ``Job`` object (call ``session.refresh``).

    Returns:
        True if this call changed the row, False if the job was not in ``from_states`` (or is unknown).
    """
    now = utcnow()
    values["updated_at"] = now
    if to in TERMINAL_STATUSES:
        values.setdefault("finished_at", now)
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.status.in_(tuple(from_states)), *where).values(status=to, **values),
        execution_options={"synchronize_session": False},
    )
    if result.rowcount != 1:
        return False
    data: dict[str, Any] = {"status": to}
    if values.get("error") is not None:
        data["error"] = values["error"]
    add_event(session, job_id, "status", data)
    return True


def resolve_teacher(
    session: Session,
    settings: Settings,
    ref: TeacherRef,
    owner_id: str | None = None,
    dest: Path | None = None,
    *,
    hub_files: list[Any] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> str:
    """The teacher folder a job reads: the uploaded SAE's folder, the given server-side path, or a hub
    reference fetched and converted to ``dest``.

    Args:
        owner_id: when given (the API), the SAE must belong to this user; another user's SAE is reported
            exactly like a missing one. The worker passes None (the job was checked when it was accepted).
        dest: where a hub teacher is imported (the worker passes ``<work dir>/<job>/teacher``). None (the
            API): a hub reference is only validated, without network, and ``""`` is returned.
        hub_files, should_cancel: the hub repository's files (:class:`rsae.hub.HubFile`, as listed and
            size-checked by :func:`service.bounds.check_hub_sizes`) and the cancellation check: the worker then
            fetches the folder file by file, stopping between files (:func:`rsae.hub.resolve_hub_teacher`).

    Raises:
        rsae.errors.TeacherError: ``teacher.sae_id`` names no uploaded SAE (of ``owner_id``); a malformed or
            unknown hub reference (fields ``teacher.hub.*``); hub files neither cached nor downloadable.
        rsae.errors.Cancelled: ``should_cancel`` returned True during the download.
    """
    if ref.path is not None:
        return ref.path
    if ref.hub is not None:
        from rsae.formats import import_teacher
        from rsae.hub import check_hub_ref, resolve_hub_teacher
        from rsae.saes import CFG_NAME

        hub = ref.hub.model_dump()
        try:
            if dest is None:
                check_hub_ref(**hub)
                return ""
            if not (dest / CFG_NAME).is_file():  # imported by an earlier attempt: reuse
                fetched = resolve_hub_teacher(**hub, files=hub_files, should_cancel=should_cancel)
                import_teacher(fetched.path, dest)
            return str(dest)
        except TeacherError as e:
            # rsae.hub names fields teacher / teacher.<key>; here they sit under teacher.hub
            tail = e.field[len("teacher") :] if e.field and e.field.startswith("teacher") else ""
            raise TeacherError(e.message, field="teacher.hub" + tail) from None
    sae = session.get(Sae, ref.sae_id) if is_uuid(ref.sae_id) else None
    if sae is None or (owner_id is not None and sae.owner_id != owner_id):
        raise TeacherError(f"no uploaded SAE with id {ref.sae_id!r} (POST /saes first)", field="teacher.sae_id")
    return str(settings.uploads_dir / sae.path)


def build_upgrade_config(req: JobCreate, teacher_path: str) -> UpgradeConfig:
    """The core's :class:`UpgradeConfig` for a job request.

    Raises:
        pydantic.ValidationError: the combination is invalid (see :func:`upgrade_config_errors`).
    """
    return UpgradeConfig(model=req.model, layer=req.layer, teacher=teacher_path, **req.settings.model_dump())


def upgrade_config_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Errors of :func:`build_upgrade_config` with fields named as in the job request (``settings.*``)."""
    errors = validation_errors(exc.errors())
    for e in errors:
        if e["field"].split(".", 1)[0] in SETTINGS_FIELDS:
            e["field"] = f"settings.{e['field']}"
    return errors
