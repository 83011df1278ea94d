"""Uploaded text corpora apart from their routes (:mod:`service.api.routes.datasets`): the form, the check of the
file (read once with the same reader as the pipeline, :func:`rsae.data.iter_documents`), the registration, the
lookup by owner, the deletion, and ``upload:<id>`` references in job requests.

A corpus is one file in one of three formats, sent in the multipart field of its name: ``txt`` (UTF-8 text,
documents separated by blank lines), ``jsonl`` (one JSON object per line, the text in ``text_column``, or token
ids in ``input_ids`` / ``tokens``) or ``parquet`` (the same columns). It is stored as
``<datasets_dir>/<id>/corpus.<format>`` with its sha256 and size; its size counts in the owner's storage quota
(:func:`service.storage.storage_usage`). Only its owner sees it (another user's id is a 404, like an unknown one)
and only its owner can use it in a job (``settings.data.dataset = "upload:<id>"``; else 422 naming the field).
"""

from __future__ import annotations

import codecs
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from rsae.data import UPLOAD_PREFIX, SourceOptions, dataset_spec_kind, iter_documents
from rsae.errors import DataError

from .config import Settings
from .models import Dataset, is_uuid, new_id, utcnow
from .problems import NotFound, ProblemError
from .uploads import ReceivedForm

DATASET_FILES: dict[str, str] = {"txt": "corpus.txt", "jsonl": "corpus.jsonl", "parquet": "corpus.parquet"}
"""Multipart file field (= format) -> the name the corpus is stored under."""
MAX_NAME_CHARS = 200
"""Longest accepted ``name`` (and ``text_column``) of an upload."""
PARQUET_EXPANSION = 8
"""A .parquet upload may declare at most this many times ``max_dataset_upload_bytes`` of decompressed column
data (read from its footer before any page is read): bounds what reading a small, highly compressed file costs."""


@dataclass(frozen=True)
class DatasetForm:
    """A received upload form, checked: which file field (= format), the optional label and text column."""

    format: str
    name: str | None
    text_column: str | None


def _label(form: ReceivedForm, key: str) -> str | None:
    value = form.text.get(key, "")
    if len(value) > MAX_NAME_CHARS or not value.isprintable():
        raise ProblemError(
            422, "validation_error", f"{key} must be at most {MAX_NAME_CHARS} printable characters", field=key
        )
    return value or None


def check_dataset_form(form: ReceivedForm) -> DatasetForm:
    """Exactly one file field among :data:`DATASET_FILES`; ``name`` and ``text_column`` printable and short;
    ``text_column`` only with a table (``jsonl``, ``parquet``).

    Raises:
        ProblemError: 422 naming the field (``missing_field`` when no file was sent, else ``validation_error``).
    """
    given = [f for f in DATASET_FILES if f in form.paths]
    if len(given) != 1:
        raise ProblemError(
            422,
            "missing_field" if not given else "validation_error",
            "send exactly one corpus file: 'txt' (UTF-8 text, documents separated by blank lines), 'jsonl' (one "
            "JSON object per line) or 'parquet'",
            field=(given or ["txt"])[-1],
        )
    fmt = given[0]
    column = _label(form, "text_column")
    if column is not None and fmt == "txt":
        raise ProblemError(
            422, "validation_error", "text_column applies to jsonl and parquet only", field="text_column"
        )
    return DatasetForm(fmt, _label(form, "name"), column)


def _check_utf8(path: Path, field: str) -> None:
    """Refuse a .txt upload that is not UTF-8 (decoded incrementally, 1 MiB at a time)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                raise ProblemError(
                    422, "invalid_dataset", f"{field}: not UTF-8 text (byte {offset + e.start})", field=field
                ) from None
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ProblemError(
            422, "invalid_dataset", f"{field}: not UTF-8 text (truncated at the end)", field=field
        ) from None


def _check_parquet_size(path: Path, field: str, limit: int) -> None:
    """Refuse a .parquet file that is not Parquet, or whose footer declares more than ``limit`` decompressed
    bytes (a compression bomb), before any data page is read."""
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...: not Parquet either way
        raise ProblemError(
            422, "invalid_dataset", f"{field}: not a Parquet file ({type(e).__name__})", field=field
        ) from None
    declared = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if declared > limit:
        raise ProblemError(
            413,
            "dataset_too_large",
            f"{field}: the file declares {declared:,} bytes of decompressed data; at most {limit:,} are read "
            f"({PARQUET_EXPANSION} x RSAE_MAX_DATASET_UPLOAD_BYTES)",
            field=field,
        )


def check_corpus(path: Path, form: DatasetForm, settings: Settings) -> tuple[int, str | None]:
    """Read the stored corpus once, as a job would (:func:`rsae.data.iter_documents`), and count its documents.

    Returns:
        ``(documents, text column)``: the column is the one given, or the one found (``input_ids`` / ``tokens``
        / ``text``) for a table; None for ``txt``.

    Raises:
        ProblemError: 422 ``invalid_dataset`` naming the file field (not UTF-8, not JSON Lines, not Parquet, no
            usable column, wrong value types, no non-empty document; the message says which, with the row) or
            ``text_column``; 413 ``dataset_too_large`` (a Parquet file declaring too much decompressed data).
    """
    field = form.format
    if field == "txt":
        _check_utf8(path, field)
    elif field == "parquet":
        _check_parquet_size(path, field, PARQUET_EXPANSION * settings.max_dataset_upload_bytes)
    n, column = 0, form.text_column
    try:
        for doc in iter_documents(str(path), SourceOptions(text_column=form.text_column)):
            n += 1
            if column is None and field != "txt":
                column = "input_ids" if doc.tokens is not None else "text"
    except DataError as e:
        message = e.message.replace(str(path), path.name).replace(repr(path.name), f"{field} upload")
        bad = "text_column" if e.field == "data.text_column" and form.text_column is not None else field
        raise ProblemError(422, "invalid_dataset", f"{bad}: {message}", field=bad) from None
    return n, column


def dataset_or_404(session: Session, dataset_id: str, user_id: str) -> Dataset:
    """The uploaded corpus ``dataset_id`` of user ``user_id``.

    Raises:
        NotFound: unknown or malformed id, or another user's corpus (indistinguishable on purpose).
    """
    row = session.get(Dataset, dataset_id) if is_uuid(dataset_id) else None
    if row is None or row.owner_id != user_id:
        raise NotFound("dataset", dataset_id)
    return row


def dataset_file(settings: Settings, row: Dataset) -> Path:
    """The stored corpus file of ``row``."""
    return settings.datasets_dir / row.path / DATASET_FILES[row.format]


def register_dataset(
    make_session: sessionmaker[Session],
    settings: Settings,
    src: Path,
    form: DatasetForm,
    received: ReceivedForm,
    documents: int,
    text_column: str | None,
    owner_id: str,
) -> Dataset:
    """Move the checked corpus ``src`` to ``<datasets_dir>/<id>/`` and insert its row, within the owner's storage
    quota (checked under the owner's row lock; the folder is removed again if the insert fails).

    Raises:
        ProblemError: 413 ``storage_quota_exceeded`` (:func:`service.storage.check_storage`).
    """
    from .storage import check_storage, lock_user

    row = Dataset(
        id=new_id(),
        owner_id=owner_id,
        name=form.name,
        format=form.format,
        text_column=text_column,
        documents=documents,
        sha256=received.sha256[form.format],
        size_bytes=received.sizes[form.format],
        created_at=utcnow(),
    )
    row.path = row.id
    final = settings.datasets_dir / row.path
    final.mkdir(parents=True)
    os.replace(src, final / DATASET_FILES[form.format])
    try:
        with make_session() as session, session.begin():
            lock_user(session, owner_id)
            check_storage(session, settings, owner_id, row.size_bytes, what="this corpus")
            session.add(row)
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise
    return row


def upload_id(spec: str) -> str | None:
    """The id of an ``upload:<id>`` data set reference, else None."""
    try:
        return spec.strip()[len(UPLOAD_PREFIX) :] if dataset_spec_kind(spec) == "upload" else None
    except DataError:
        return None


def resolve_upload(session: Session, settings: Settings, spec: str, owner_id: str | None) -> Dataset | None:
    """The corpus row a job's ``settings.data.dataset`` names when it is ``upload:<id>`` (None otherwise).

    Args:
        owner_id: when given (the API), the job's owner: another user's corpus is reported exactly like a
            missing one. The worker passes None (the job was checked when it was accepted).

    Raises:
        ProblemError: 422 ``invalid_dataset`` naming ``settings.data.dataset``: no such corpus of this user.
    """
    ident = upload_id(spec)
    if ident is None:
        return None
    row = session.get(Dataset, ident) if is_uuid(ident) else None
    if row is None or (owner_id is not None and row.owner_id != owner_id):
        raise ProblemError(
            422,
            "invalid_dataset",
            f"settings.data.dataset: no uploaded corpus with id {ident[:100]!r} (POST /datasets first)",
            field="settings.data.dataset",
        )
    return row


def use_upload(req: Any, settings: Settings, row: Dataset) -> None:
    """Point job request ``req`` (a :class:`service.schemas.JobCreate`) at the stored file of corpus ``row``, and
    at its text column unless the request names one (the worker runs with this)."""
    data = req.settings.data
    data.dataset = str(dataset_file(settings, row))
    if data.text_column is None and row.text_column is not None:
        data.text_column = row.text_column


def delete_dataset(session: Session, settings: Settings, row: Dataset) -> None:
    """Delete corpus ``row`` (row committed first, then its folder).

    Raises:
        ProblemError: 409 ``dataset_in_use`` (field ``id``, ``job_ids``) while an unfinished job of the owner
            reads it; finished jobs keep their results.
    """
    from .storage import _remove_under, lock_user, unfinished_jobs

    lock_user(session, row.owner_id)
    using = [
        job_id
        for job_id, req in unfinished_jobs(session, row.owner_id)
        if upload_id(str((((req or {}).get("settings") or {}).get("data") or {}).get("dataset", ""))) == row.id
    ]
    if using:
        raise ProblemError(
            409,
            "dataset_in_use",
            f"dataset {row.id} is read by unfinished job(s) {', '.join(using)}; wait until they end or cancel them",
            field="id",
            job_ids=using,
        )
    session.execute(delete(Dataset).where(Dataset.id == row.id), execution_options={"synchronize_session": False})
    session.commit()
    _remove_under(settings.datasets_dir, row.path)
