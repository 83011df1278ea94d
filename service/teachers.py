"""Teacher SAE uploads apart from their route (:mod:`service.api.routes.saes`): which form fields carry which
file, the checks on the form, the one read and validation of the files (:func:`rsae.formats.load_teacher`)
and the registration of the stored teacher.

The file names are the formats' own, imported from :mod:`rsae` (``docs/formats.md``), never restated here.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from rsae.errors import TeacherError
from rsae.formats import (
    DL_CONFIG,
    DL_WEIGHTS,
    FORMATS,
    GEMMA_SCOPE_PARAMS,
    SPARSIFY_WEIGHTS,
    DetectedFormat,
    load_teacher,
)
from rsae.saes import CFG_NAME, WEIGHTS_NAME

from .config import Settings
from .models import Sae, is_uuid, new_id, utcnow
from .problems import NotFound, ProblemError
from .storage import check_storage, dir_bytes, lock_user
from .uploads import ReceivedForm

MAX_NAME_CHARS = 200
"""Longest accepted ``name`` of an upload."""
UPLOAD_FILES: dict[str, str] = {
    "cfg": CFG_NAME,  # SAELens, sparsify
    "weights": WEIGHTS_NAME,  # SAELens
    "sae": SPARSIFY_WEIGHTS,  # EleutherAI sparsify
    "params": GEMMA_SCOPE_PARAMS,  # Gemma Scope
    "ae": DL_WEIGHTS,  # dictionary_learning (read with torch.load(weights_only=True))
    "config": DL_CONFIG,  # dictionary_learning
}
"""Multipart file field -> the file name it is stored under (the formats' own names; see docs/formats.md)."""
WEIGHT_FIELDS = ("weights", "sae", "params", "ae")
"""Fields of which exactly one must be present: the teacher's tensors."""
_FORM_FIELDS = {fname: form for form, fname in UPLOAD_FILES.items()}


@dataclass(frozen=True)
class UploadOptions:
    """The text fields of an upload form, checked: the optional label and the forced format."""

    name: str | None
    format: str | None


@dataclass(frozen=True)
class ImportedTeacher:
    """An upload read and stored in the SAELens layout: how it was read, and the ``cfg.json`` written."""

    detected: DetectedFormat
    cfg: dict[str, Any]


def check_upload_form(form: ReceivedForm) -> UploadOptions:
    """Check a received upload form: exactly one weights file, a printable ``name`` of at most
    :data:`MAX_NAME_CHARS` characters, a ``format`` among :data:`rsae.formats.FORMATS`.

    Raises:
        ProblemError: 422 naming the field (``missing_field`` when no weights file was sent, else
            ``validation_error``).
    """
    given = [f for f in WEIGHT_FIELDS if f in form.paths]
    if len(given) != 1:
        raise ProblemError(
            422,
            "missing_field" if not given else "validation_error",
            "send exactly one weights file: 'weights' (SAELens), 'sae' (sparsify), 'params' "
            "(Gemma Scope) or 'ae' (dictionary_learning)",
            field=(given or ["weights"])[-1],
        )
    name = form.text.get("name", "")
    if len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise ProblemError(
            422, "validation_error", f"name must be at most {MAX_NAME_CHARS} printable characters", field="name"
        )
    fmt = form.text.get("format") or None
    if fmt is not None and fmt not in FORMATS:
        raise ProblemError(422, "validation_error", f"format must be one of {list(FORMATS)}", field="format")
    return UploadOptions(name=name or None, format=fmt)


def form_field(field: str | None) -> str | None:
    """An rsae error field in upload terms: ``cfg.json.d_in`` -> ``cfg.d_in``,
    ``sae_weights.safetensors.W_enc`` -> ``weights.W_enc``, ...; other fields unchanged."""
    for fname, form in _FORM_FIELDS.items():
        if field is not None and (field == fname or field.startswith(fname + ".")):
            return form + field[len(fname) :]
    return field


def import_upload(src: Path, out: Path, fmt: str | None) -> ImportedTeacher:
    """Read the uploaded files in ``src`` in whichever format they are and write the teacher in the
    project's SAELens layout at ``out`` (what the pipeline reads).

    The files are read and validated once, by :func:`rsae.formats.load_teacher` (format and conventions
    detected; config keys, shapes, dtypes and finite values checked); the folder is then written by the
    project's own :meth:`rsae.saes.SAE.save`, so it is not read back.

    Raises:
        rsae.errors.TeacherError: the files are not a supported teacher; ``field`` names the form field and
            key (:func:`form_field`) and messages say "the upload" instead of server paths.
    """
    try:
        teacher = load_teacher(src, format=fmt)
    except TeacherError as e:
        message = e.message.replace(str(src), "the upload").replace(str(out), "the upload")
        raise TeacherError(message, field=form_field(e.field)) from None
    source = teacher.sae.metadata.get("source")
    if isinstance(source, dict):  # the import report names the temporary upload folder: not kept
        source.pop("path", None)
    teacher.sae.save(out)
    # the cfg.json just written, as it reads back (JSON types)
    return ImportedTeacher(teacher.detected, json.loads(json.dumps(teacher.sae.cfg_dict())))


def sae_or_404(session: Session, sae_id: str, user_id: str) -> Sae:
    """The uploaded teacher ``sae_id`` of user ``user_id``.

    Raises:
        NotFound: unknown or malformed id, or another user's SAE (indistinguishable on purpose).
    """
    row = session.get(Sae, sae_id) if is_uuid(sae_id) else None
    if row is None or row.owner_id != user_id:
        raise NotFound("sae", sae_id)
    return row


def register_upload(
    make_session: sessionmaker[Session],
    settings: Settings,
    folder: Path,
    form: ReceivedForm,
    options: UploadOptions,
    teacher: ImportedTeacher,
    owner_id: str,
) -> Sae:
    """Move the imported teacher ``folder`` to ``<uploads>/<id>/`` and insert its ``saes`` row (the folder
    is removed again if the insert fails). The row's sha256 is that of the uploaded weights file, its
    ``size_bytes`` the stored folder's.

    Raises:
        ProblemError: 413 ``storage_quota_exceeded`` when the stored folder does not fit in the owner's
            ``max_storage_bytes_per_user`` (:func:`service.storage.check_storage`, under the owner's row lock).
    """
    weights_field = next(f for f in WEIGHT_FIELDS if f in form.sha256)
    cfg, detected = teacher.cfg, teacher.detected
    row = Sae(
        id=new_id(),
        owner_id=owner_id,
        name=options.name,
        family=detected.family,
        architecture=cfg.get("architecture", "standard"),
        d_in=detected.d_in,
        d_sae=detected.d_sae,
        sha256=form.sha256[weights_field],
        cfg=cfg,
        created_at=utcnow(),
    )
    row.path = row.id
    row.size_bytes = dir_bytes(folder)
    final = settings.uploads_dir / row.path
    os.replace(folder, final)
    try:
        with make_session() as session, session.begin():
            lock_user(session, owner_id)  # concurrent uploads of one user are checked one after the other
            check_storage(session, settings, owner_id, row.size_bytes, what="this upload (as stored)")
            session.add(row)
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise
    return row
