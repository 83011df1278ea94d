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

from rsae.checks import check_teacher
from rsae.declared import check_declared_size
from rsae.errors import TeacherError, TeacherTooLargeError
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
from .jsonbody import InvalidBody, parse_json_body
from .models import Sae, is_uuid, new_id, utcnow
from .problems import NotFound, ProblemError, validation_error
from .sandbox import ChildFailed, run_bounded
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
JSON_FIELDS = ("cfg", "config")
"""Fields that carry JSON (size-limited by ``max_cfg_bytes`` while streaming, depth by :func:`check_json_parts`)."""
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


def weights_field(form: ReceivedForm) -> str:
    """The weights file field of a form that passed :func:`check_upload_form` (``weights``, ``sae``, ...)."""
    return next(f for f in WEIGHT_FIELDS if f in form.paths)


def check_json_parts(form: ReceivedForm) -> None:
    """Parse every JSON part of an upload (:data:`JSON_FIELDS`) with the strict parser of JSON request bodies
    (:func:`service.jsonbody.parse_json_body`: no duplicate keys, no over-long integers, no lone
    surrogates, the depth limit); their size was limited to ``max_cfg_bytes`` while they streamed. Bytes that
    are not UTF-8 or not JSON at all are left to the format's reader, which names the key.

    Raises:
        ProblemError: 422 ``validation_error`` whose errors name the part (``cfg``, ``config``) or a key in it
            (``cfg.d_in``), with the body parser's codes (``json_too_deep``, ``duplicate_key``, ...).
    """
    for name in JSON_FIELDS:
        path = form.paths.get(name)
        if path is None:
            continue
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:  # the format's reader names the key (422 ``cfg``, code invalid_teacher)
            continue
        try:
            parse_json_body(raw)
        except InvalidBody as e:
            raise validation_error(
                [{**err, "field": name if err["field"] == "body" else f"{name}.{err['field']}"} for err in e.errors]
            ) from None
        except ValueError:  # not JSON: the format's reader reports it with the key
            pass


def check_upload_size(src: Path, fmt: str | None, max_bytes: int) -> int:
    """Refuse an upload whose weights file declares more than ``max_bytes`` once read
    (:func:`rsae.declared.check_declared_size`: zip members' uncompressed sizes, ``.npy`` and safetensors
    header shapes), before any of its data is read. Returns the declared bytes.

    Raises:
        ProblemError: 413 ``teacher_too_large`` naming the weights field.
        rsae.errors.TeacherError: no recognised teacher files (422, as the import would say).
    """
    try:
        return check_declared_size(src, max_bytes, format=fmt)
    except TeacherTooLargeError as e:
        message = e.message.replace(str(src), "the upload")
        raise ProblemError(413, e.code, message, field=form_field(e.field)) from None
    except TeacherError as e:
        raise TeacherError(e.message.replace(str(src), "the upload"), field=form_field(e.field)) from None


def import_upload(src: Path, out: Path, fmt: str | None) -> ImportedTeacher:
    """Read the uploaded files in ``src`` in whichever format they are and write the teacher in the
    project's SAELens layout at ``out`` (what the pipeline reads).

    The files are read and validated once, by :func:`rsae.formats.load_teacher` (format and conventions
    detected; config keys, shapes, dtypes and finite values checked), the teacher is checked for what an
    upgrade needs (:func:`rsae.checks.check_teacher`: valid thresholds, a finite forward, a live latent); the
    folder is then written by the project's own :meth:`rsae.saes.SAE.save`, so it is not read back. Runs
    in-process: the API calls it through :func:`import_upload_bounded`.

    Raises:
        rsae.errors.TeacherError: the files are not a supported teacher, or one that cannot be upgraded (typed
            subclasses: ``invalid_thresholds``, ``non_finite_teacher``, ``dead_teacher``); ``field`` names the
            form field and key (:func:`form_field`) and messages say "the upload" instead of server paths.
    """
    try:
        teacher = load_teacher(src, format=fmt)
        check_teacher(teacher.sae, field=_WEIGHTS_FILES[teacher.detected.format])
    except TeacherError as e:
        message = e.message.replace(str(src), "the upload").replace(str(out), "the upload")
        raise type(e)(message, field=form_field(e.field)) from None
    source = teacher.sae.metadata.get("source")
    if isinstance(source, dict):  # the import report names the temporary upload folder: not kept
        source.pop("path", None)
    teacher.sae.save(out)
    # the cfg.json just written, as it reads back (JSON types)
    return ImportedTeacher(teacher.detected, json.loads(json.dumps(teacher.sae.cfg_dict())))


_WEIGHTS_FILES = {
    "saelens": WEIGHTS_NAME,
    "sparsify": SPARSIFY_WEIGHTS,
    "gemma_scope": GEMMA_SCOPE_PARAMS,
    "dictionary_learning": DL_WEIGHTS,
}
"""The weights file of each format (the field of the checks' errors, mapped to the form field by :func:`form_field`)."""


def _import_in_child(src: Path, out: Path, fmt: str | None) -> ImportedTeacher:
    """:func:`import_upload` in the bounded child: one torch thread (no thread pools or per-thread malloc
    arenas eating the address-space bound)."""
    import torch

    torch.set_num_threads(1)
    return import_upload(src, out, fmt)


def import_upload_bounded(src: Path, out: Path, fmt: str | None, field: str, settings: Settings) -> ImportedTeacher:
    """:func:`import_upload` in a child process (:func:`service.sandbox.run_bounded`) whose address space may
    grow by at most ``settings.teacher_import_memory_limit`` and that may run ``settings.teacher_import_seconds``;
    the API process never holds the teacher's tensors.

    Args:
        field: the weights form field, named by the errors of a child stopped by a bound.

    Raises:
        ProblemError: 413 ``teacher_import_memory`` (the child hit the memory bound or died), 422
            ``teacher_import_timeout``; both naming ``field``.
        rsae.errors.TeacherError: as :func:`import_upload`.
    """
    try:
        return run_bounded(
            _import_in_child,
            src,
            out,
            fmt,
            memory_bytes=settings.teacher_import_memory_limit,
            timeout=settings.teacher_import_seconds,
            preload=["service.teachers"],
        )
    except ChildFailed as e:
        if e.reason == "timeout":
            raise ProblemError(
                422,
                "teacher_import_timeout",
                f"reading the teacher took longer than {settings.teacher_import_seconds:g} s "
                "(RSAE_TEACHER_IMPORT_SECONDS)",
                field=field,
            ) from None
        raise ProblemError(
            413,
            "teacher_import_memory",
            f"reading the teacher needs more than the {settings.teacher_import_memory_limit:,} bytes of memory an "
            f"import may use (RSAE_TEACHER_IMPORT_MEMORY_BYTES): {e.detail}",
            field=field,
        ) from None


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
