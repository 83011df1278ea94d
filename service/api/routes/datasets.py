"""Text corpus uploads: ``POST /v1/datasets``, ``GET``, ``GET /{id}``, ``DELETE /{id}``.

Routes only: the form, the check of the file, the registration and the deletion are :mod:`service.datasets`; the
storage quota is :mod:`service.storage`.
"""

from __future__ import annotations

import shutil
import uuid

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from rsae_client.models import API_PREFIX
from service import storage
from service.api.deps import LimitDep, SessionDep, SettingsDep, SubmitterDep
from service.auth import UserDep
from service.config import Settings
from service.datasets import (
    DATASET_FILES,
    MAX_NAME_CHARS,
    check_corpus,
    check_dataset_form,
    dataset_or_404,
    delete_dataset,
    register_dataset,
)
from service.jsonbody import StrictJSONRoute
from service.models import Dataset
from service.policies import keyset_page
from service.problems import problem_responses
from service.schemas import DatasetList, DatasetOut
from service.uploads import receive_multipart

router = APIRouter(
    prefix="/datasets",
    tags=["datasets"],
    responses=problem_responses(400, 401, 413, 422, 429),
    route_class=StrictJSONRoute,
)

_FILE = {"type": "string", "format": "binary"}
_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "txt": {**_FILE, "description": "UTF-8 text; documents separated by blank lines."},
                    "jsonl": {
                        **_FILE,
                        "description": "JSON Lines: one object per line with the text in text_column ('text' by "
                        "default), or token ids in 'input_ids' / 'tokens' (pre-tokenized).",
                    },
                    "parquet": {**_FILE, "description": "Parquet table with the same columns as jsonl."},
                    "text_column": {
                        "type": "string",
                        "maxLength": MAX_NAME_CHARS,
                        "description": "Column of a jsonl or parquet file to read (default: 'input_ids' or 'tokens' "
                        "if present, else 'text').",
                    },
                    "name": {"type": "string", "maxLength": MAX_NAME_CHARS, "description": "Optional label."},
                },
            },
            "examples": {"jsonl": {"summary": "JSON Lines", "value": {"jsonl": "<corpus.jsonl>", "name": "docs"}}},
        }
    },
}


@router.post(
    "",
    status_code=201,
    openapi_extra={"requestBody": _UPLOAD_BODY},
    responses=problem_responses(
        413,
        415,
        422,
        s413="body past RSAE_MAX_DATASET_UPLOAD_BYTES (naming the file field), a Parquet file declaring too much "
        "decompressed data (dataset_too_large), or storage quota exceeded (storage_quota_exceeded; problem+json)",
        s422="invalid corpus: 'field' names the file field (txt, jsonl, parquet) or text_column, and the detail the "
        "row (problem+json)",
    ),
)
async def upload_dataset(request: Request, response: Response, settings: SettingsDep, user: SubmitterDep) -> DatasetOut:
    """Upload a text corpus (multipart; exactly one of the file fields ``txt``, ``jsonl``, ``parquet``; optional
    ``name`` and ``text_column``). Use it in a job as ``settings.data.dataset = "upload:<id>"`` (``use_as``).

    The body streams to a temporary folder under the datasets dir (413 past ``max_dataset_upload_bytes``,
    naming the file field), with its sha256. The file is then read once as a job reads it
    (:func:`rsae.data.iter_documents`): not UTF-8, not JSON Lines, not Parquet, no usable column, values of the
    wrong type or no document at all are 422 naming the field. A user already at the storage quota is refused
    before the body is read; a corpus that does not fit after it is refused too (413 ``storage_quota_exceeded``).
    Uploads count against the submission rate limits (429 with Retry-After, before the body is read).
    """
    await run_in_threadpool(_room_left, request.app.state.sessionmaker, settings, user.id)
    settings.datasets_dir.mkdir(parents=True, exist_ok=True)
    tmp = settings.datasets_dir / f".upload-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    try:
        received = await receive_multipart(
            request,
            tmp,
            files=DATASET_FILES,
            text_fields={"name", "text_column"},
            required=set(),
            max_bytes=settings.max_dataset_upload_bytes,
        )
        form = check_dataset_form(received)
        src = received.paths[form.format]
        documents, column = await run_in_threadpool(check_corpus, src, form, settings)
        row = await run_in_threadpool(
            register_dataset,
            request.app.state.sessionmaker,
            settings,
            src,
            form,
            received,
            documents,
            column,
            user.id,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the checked file was moved out already
    response.headers["Location"] = f"{API_PREFIX}/datasets/{row.id}"
    return DatasetOut.from_row(row)


def _room_left(make_session: sessionmaker[Session], settings: Settings, user_id: str) -> None:
    """Refuse an upload before reading it when the user's storage is already full (413)."""
    with make_session() as session:
        storage.check_storage(session, settings, user_id, 0, what="this corpus")
        session.commit()


@router.get("")
def list_datasets(
    session: SessionDep,
    limit: LimitDep,
    user: UserDep,
    after: str | None = Query(None, description="next_cursor of the previous page."),
) -> DatasetList:
    """Your uploaded corpora, newest first, ``limit`` per page; follow ``next_cursor`` (null on the last page)."""
    q = select(Dataset).where(Dataset.owner_id == user.id)
    rows, cursor = keyset_page(session, q, Dataset, limit, after)
    return DatasetList(data=[DatasetOut.from_row(r) for r in rows], has_more=cursor is not None, next_cursor=cursor)


@router.get("/{dataset_id}", responses=problem_responses(404))
def get_dataset(dataset_id: str, session: SessionDep, user: UserDep) -> DatasetOut:
    """One of your uploaded corpora (another user's id is a 404, like an unknown one)."""
    return DatasetOut.from_row(dataset_or_404(session, dataset_id, user.id))


@router.delete(
    "/{dataset_id}",
    operation_id="delete_dataset",
    status_code=204,
    response_class=Response,
    responses={
        204: {"description": "deleted: the row and the stored file are gone"},
        **problem_responses(
            404,
            409,
            s409="an unfinished job of yours reads it (code dataset_in_use; job_ids lists them; problem+json)",
        ),
    },
)
def delete_dataset_route(dataset_id: str, session: SessionDep, settings: SettingsDep, user: UserDep) -> Response:
    """Delete one of your uploaded corpora: its row, then its file (freeing storage quota). Refused with 409
    ``dataset_in_use`` while one of your unfinished jobs reads it. Repeating the call answers 404."""
    delete_dataset(session, settings, dataset_or_404(session, dataset_id, user.id))
    return Response(status_code=204)
