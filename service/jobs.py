"""Job state machine and job-request resolution, shared by the API and the worker.

Every status change is a conditional UPDATE from the expected states (:func:`transition`), so two actors
racing on one job (a cancel and a worker start, two workers) cannot both win.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import update
from sqlalchemy.orm import Session

from rsae.config import ArtifactRefs, UpgradeConfig
from rsae.data import UPLOAD_PREFIX
from rsae.errors import TeacherError

from .bounds import path_specs
from .config import Settings
from .models import TERMINAL_STATUSES, Dataset, Job, JobEvent, Sae, is_uuid, utcnow
from .problems import validation_errors
from .redact import redact_data
from .schemas import SETTINGS_FIELDS, JobCreate, TeacherRef
from .webhooks import enqueue as enqueue_notice


def add_event(session: Session, job_id: str, type_: str, data: dict[str, Any]) -> None:
    """Append an event (``status``, ``progress``, ``metrics`` or ``log``) to the job's history.

    Its strings pass :func:`service.redact.redact_data` (no server path, host, port or pid reaches a user).
    """
    session.add(JobEvent(job_id=job_id, type=type_, data=redact_data(data), created_at=utcnow()))


def transition(
    session: Session, job_id: str, from_states: Iterable[str], to: str, *, where: Iterable[Any] = (), **values: Any
) -> bool:
    """Move job ``job_id`` to status ``to`` if it is in one of ``from_states``; record a status event.

    ``where`` are further conditions (e.g. ``Job.lease_owner == me``: only the lease holder may finish a
    job). ``values`` are further columns to set (e.g. ``error``, ``started_at``, ``attempt=Job.attempt + 1``).
    An ``error`` passes :func:`service.redact.redact_data`.
    ``updated_at`` is always set, ``finished_at`` too when ``to`` is terminal. A terminal ``to`` also adds
    the job's webhook notice, if it asked for one, to the outbox (:func:`service.webhooks.enqueue`), so the
    notice commits or rolls back with the status. Does not commit, and does not refresh a loaded ``Job``
    object (call ``session.refresh``).

    Returns:
        True if this call changed the row, False if the job was not in ``from_states`` (or is unknown).
    """
    now = utcnow()
    if isinstance(values.get("error"), dict):  # shown to the user: no server path, host, port or pid
        values["error"] = redact_data(values["error"])
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
    if to in TERMINAL_STATUSES:  # the webhook notice commits with the status (outbox, service.webhooks)
        enqueue_notice(session, job_id)
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
            unknown hub reference (fields ``teacher.hub.*``); hub files neither cached nor downloadable;
            ``TeacherTooLargeError`` for hub files declaring more than ``settings.teacher_expanded_limit``
            bytes (checked from their headers before they are read).
        rsae.errors.Cancelled: ``should_cancel`` returned True during the download.
    """
    if ref.path is not None:
        return ref.path
    if ref.hub is not None:
        from rsae.declared import check_declared_size
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
                check_declared_size(fetched.path, settings.teacher_expanded_limit)  # before any tensor is read
                import_teacher(fetched.path, dest, norm_scaling_factor=fetched.norm_scaling_factor)
            return str(dest)
        except TeacherError as e:
            # rsae.hub names fields teacher / teacher.<key>; here they sit under teacher.hub
            tail = e.field[len("teacher") :] if e.field and e.field.startswith("teacher") else ""
            raise type(e)(e.message, field="teacher.hub" + tail) from None
    sae = session.get(Sae, ref.sae_id) if is_uuid(ref.sae_id) else None
    if sae is None or (owner_id is not None and sae.owner_id != owner_id):
        raise TeacherError(f"no uploaded SAE with id {ref.sae_id!r} (POST /saes first)", field="teacher.sae_id")
    return str(settings.uploads_dir / sae.path)


def build_upgrade_config(req: JobCreate, teacher_path: str) -> UpgradeConfig:
    """The core's :class:`UpgradeConfig` for a job request.

    Raises:
        pydantic.ValidationError: the combination is invalid (see :func:`upgrade_config_errors`).
    """
    return UpgradeConfig(
        model=req.model, layer=req.layer, hook=req.hook, teacher=teacher_path, **req.settings.model_dump()
    )


def upgrade_config_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Errors of :func:`build_upgrade_config` with fields named as in the job request (``settings.*``)."""
    errors = validation_errors(exc.errors())
    for e in errors:
        if e["field"].split(".", 1)[0] in SETTINGS_FIELDS:
            e["field"] = f"settings.{e['field']}"
    return errors


def _local_ref(path: str) -> str:
    """``local:<name> sha256:<hex>`` of a server-side file or folder (allowed by ``RSAE_ALLOW_LOCAL_PATHS``):
    its last path component and the sha256 over its files (names relative to it, and contents, in sorted
    order); just ``local:<name>`` if it cannot be read."""
    p = Path(path).expanduser()
    digest = hashlib.sha256()
    try:
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            digest.update(str(f.relative_to(p) if f != p else f.name).encode() + b"\0")
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    except OSError:
        return f"local:{p.name}"
    return f"local:{p.name} sha256:{digest.hexdigest()}"


def artifact_refs(session: Session, req: JobCreate) -> ArtifactRefs:
    """How a job's artifacts (cfg.json, report.json, report.html) name its inputs instead of server paths.

    The teacher: ``sae:<id> (<name>)`` for an upload; ``hub:<repo_id>[/<subfolder>][@<revision>]`` or
    ``hub:<release>/<sae_id>`` for a hub reference; ``local:<folder name> sha256:<hex>`` for a server path
    (the core records the weights' sha256 beside it). The dataset: its name (``bbc-news``, a hub id),
    ``upload:<id> (<name>) sha256:<hex>`` for an uploaded corpus, or ``local:<name> sha256:<hex>`` for a
    server-side file or folder. The model: ``local:<folder name>`` for
    a server-side folder, else None (a bundled name or hub id is shown as given).
    """
    ref = req.teacher
    if ref.sae_id is not None:
        sae = session.get(Sae, ref.sae_id) if is_uuid(ref.sae_id) else None
        name = getattr(sae, "name", None)
        teacher = f"sae:{ref.sae_id}" + (f" ({name})" if name else "")
    elif ref.hub is not None:
        hub = ref.hub
        if hub.release is not None:
            teacher = f"hub:{hub.release}/{hub.sae_id or ''}"
        else:
            teacher = f"hub:{hub.repo_id}" + (f"/{hub.subfolder}" if hub.subfolder else "")
        teacher += f"@{hub.revision}" if hub.revision else ""
    else:
        teacher = _local_ref(ref.path or "")
    paths = path_specs(req)
    dataset = req.settings.data.dataset
    corpus = session.get(Dataset, dataset[len(UPLOAD_PREFIX) :]) if dataset.startswith(UPLOAD_PREFIX) else None
    if corpus is not None:
        dataset = f"{dataset}" + (f" ({corpus.name})" if corpus.name else "") + f" sha256:{corpus.sha256}"
    return ArtifactRefs(
        teacher=teacher,
        dataset=_local_ref(dataset) if "settings.data.dataset" in paths else dataset,
        model=f"local:{Path(req.model).name}" if "model" in paths else None,
    )
