"""Teacher SAE uploads: ``POST /saes``, ``GET /saes``, ``GET /saes/{id}``, ``DELETE /saes/{id}`` (mounted under
``/v1``).

Routes only: the form fields, their checks, the import and the registration are :mod:`service.teachers`; deletion and
the storage quota are :mod:`service.storage`.
"""

from __future__ import annotations

import shutil
import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service import encode as encoding
from service import storage
from service.api.deps import LimitDep, SessionDep, SettingsDep, SubmitterDep
from service.auth import UserDep
from service.config import Settings
from service.jsonbody import StrictJSONRoute
from service.models import Sae
from service.policies import keyset_page
from service.problems import problem_responses
from service.schemas import API_PREFIX, EncodeResult, SaeList, SaeModel, sae_out
from service.teachers import (
    MAX_NAME_CHARS,
    UPLOAD_FILES,
    check_json_parts,
    check_upload_form,
    check_upload_size,
    import_upload_bounded,
    register_upload,
    sae_or_404,
    weights_field,
)
from service.uploads import receive_multipart

router = APIRouter(
    prefix="/saes", tags=["saes"], responses=problem_responses(400, 401, 413, 422, 429), route_class=StrictJSONRoute
)

_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "cfg": {
                        "type": "string",
                        "format": "binary",
                        "description": "cfg.json (SAELens: architecture, d_in, d_sae, ...; sparsify: its "
                        "SparseCoder config).",
                    },
                    "weights": {
                        "type": "string",
                        "format": "binary",
                        "description": "SAELens sae_weights.safetensors (W_enc, b_enc, W_dec, b_dec, ...).",
                    },
                    "sae": {
                        "type": "string",
                        "format": "binary",
                        "description": "EleutherAI sparsify sae.safetensors (with cfg).",
                    },
                    "params": {
                        "type": "string",
                        "format": "binary",
                        "description": "Gemma Scope params.npz (W_enc, W_dec, b_enc, b_dec, threshold); "
                        "read without pickle.",
                    },
                    "ae": {
                        "type": "string",
                        "format": "binary",
                        "description": "dictionary_learning ae.pt (with config); read with "
                        "torch.load(weights_only=True), so pickled objects are refused.",
                    },
                    "config": {"type": "string", "format": "binary", "description": "dictionary_learning config.json."},
                    "format": {
                        "type": "string",
                        "enum": ["saelens", "gemma_scope", "sparsify", "dictionary_learning"],
                        "description": "Force the format instead of detecting it from the fields.",
                    },
                    "name": {"type": "string", "maxLength": MAX_NAME_CHARS, "description": "Optional label."},
                },
            },
            "examples": {
                "saelens": {
                    "summary": "SAELens layout",
                    "value": {"cfg": "<cfg.json>", "weights": "<sae_weights.safetensors>", "name": "layer-3-relu"},
                },
                "gemma_scope": {"summary": "Gemma Scope", "value": {"params": "<params.npz>"}},
            },
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
        s413="request body too large, or storage quota exceeded (code storage_quota_exceeded, with used_bytes, "
        "limit_bytes, requested_bytes; problem+json)",
        s422="invalid teacher: 'field' names the form field and key, e.g. cfg.d_in or weights.W_enc (problem+json)",
    ),
)
async def upload_sae(request: Request, response: Response, settings: SettingsDep, user: SubmitterDep) -> SaeModel:
    """Upload a teacher SAE in any of four formats (multipart; see docs/formats.md):

    - SAELens: ``cfg`` + ``weights`` (sae_weights.safetensors);
    - EleutherAI sparsify: ``cfg`` + ``sae`` (sae.safetensors);
    - Gemma Scope: ``params`` (params.npz);
    - dictionary_learning: ``ae`` (ae.pt) + ``config``.

    The body is streamed to a temporary folder under the uploads dir (413 past ``max_upload_bytes``); its
    JSON parts are parsed with the depth limit of request bodies (422 ``cfg`` / ``config``); the size the
    weights file declares once read is checked from its headers alone (413 past
    ``max_teacher_expanded_bytes``: decompression bombs); then, in a child process bounded by
    ``teacher_import_memory_bytes`` (413) and ``teacher_import_seconds``, it is read with
    :func:`rsae.formats.load_teacher` (format and conventions detected, reported back in ``source``), checked
    (shapes, dtypes, finite values, config keys: 422 naming the offending field such as ``cfg.d_in`` or
    ``weights.W_enc``; thresholds, a finite forward and a live latent: 422 ``invalid_thresholds``,
    ``non_finite_teacher``, ``dead_teacher``), stored in the SAELens layout and moved to ``<uploads>/<id>/``.

    Storage quota (``RSAE_MAX_STORAGE_BYTES_PER_USER``; uploads + job artifacts + the estimated artifacts
    of unfinished jobs): a user already at it is refused before the body is read, and an upload whose stored
    folder does not fit is refused after the import; both are 413 ``storage_quota_exceeded`` carrying
    ``used_bytes``, ``limit_bytes`` and ``requested_bytes``.

    Uploads count against the submission rate limits (429 with Retry-After, before the body is read).
    """
    await run_in_threadpool(_room_left, request.app.state.sessionmaker, settings, user.id)
    settings.uploads_dir.mkdir(parents=True, exist_ok=True)
    tmp = settings.uploads_dir / f".upload-{uuid.uuid4().hex}"
    (tmp / "src").mkdir(parents=True)
    try:
        form = await receive_multipart(
            request,
            tmp / "src",
            files=UPLOAD_FILES,
            text_fields={"name", "format"},
            required=set(),
            max_bytes=settings.max_upload_bytes,
            part_limits={"cfg": settings.max_cfg_bytes, "config": settings.max_cfg_bytes},
        )
        options = check_upload_form(form)
        check_json_parts(form)
        src, field = tmp / "src", weights_field(form)
        await run_in_threadpool(check_upload_size, src, options.format, settings.teacher_expanded_limit)
        teacher = await run_in_threadpool(import_upload_bounded, src, tmp / "sae", options.format, field, settings)
        row = await run_in_threadpool(
            register_upload, request.app.state.sessionmaker, settings, tmp / "sae", form, options, teacher, user.id
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the imported folder was moved out already
    response.headers["Location"] = f"{API_PREFIX}/saes/{row.id}"
    return sae_out(row)


def _room_left(make_session: sessionmaker[Session], settings: Settings, user_id: str) -> None:
    """Refuse an upload before reading it when the user's storage is already full (413)."""
    with make_session() as session:
        storage.check_storage(session, settings, user_id, 0, what="this upload")
        session.commit()  # sizes measured for older rows


@router.get("")
def list_saes(
    session: SessionDep,
    limit: LimitDep,
    user: UserDep,
    after: str | None = Query(None, description="next_cursor of the previous page."),
) -> SaeList:
    """Your uploaded teacher SAEs, newest first, ``limit`` per page; follow ``next_cursor`` (null on the last
    page)."""
    rows, cursor = keyset_page(session, select(Sae).where(Sae.owner_id == user.id), Sae, limit, after)
    return SaeList(data=[sae_out(r) for r in rows], has_more=cursor is not None, next_cursor=cursor)


@router.get("/{sae_id}", responses=problem_responses(404))
def get_sae(sae_id: str, session: SessionDep, user: UserDep) -> SaeModel:
    """One of your uploaded teacher SAEs (another user's id is a 404, like an unknown one)."""
    return sae_out(sae_or_404(session, sae_id, user.id))


@router.delete(
    "/{sae_id}",
    status_code=204,
    response_class=Response,
    responses={
        204: {"description": "deleted: the row and the stored files are gone"},
        **problem_responses(
            404,
            409,
            s409="an unfinished job of yours uses it as its teacher (code sae_in_use; job_ids lists them; "
            "problem+json)",
        ),
    },
)
def delete_sae(sae_id: str, session: SessionDep, settings: SettingsDep, user: UserDep) -> Response:
    """Delete one of your uploaded teacher SAEs: its row, then its stored files (freeing storage quota).

    Refused with 409 ``sae_in_use`` while one of your unfinished jobs (queued, running, cancelling) uses it
    as its teacher; finished jobs that used it keep their results. Repeating the call answers 404 (like
    another user's or an unknown id).
    """
    storage.delete_sae(session, settings, sae_or_404(session, sae_id, user.id))
    return Response(status_code=204)


@router.post(
    "/{sae_id}/encode",
    responses=problem_responses(
        404,
        503,
        504,
        s503="no encode worker took the request in time (code encode_unavailable; problem+json; Retry-After)",
        s504="the encode worker did not answer in time (code encode_timeout; problem+json)",
    ),
)
async def encode_sae(
    sae_id: str, request: Request, user: UserDep, body: Annotated[encoding.SaeEncodeRequest | None, Body()] = None
) -> EncodeResult:
    """Top-k latents per token of an uploaded teacher SAE alone (as ``POST /v1/jobs/{id}/encode`` with
    ``which: "teacher"``): text runs through the host model and hook its ``cfg.json`` records (or ``model`` /
    ``hook``), with the conventions it records (SAELens metadata; none: 128 tokens, no BOS, position 0 dropped).
    """
    return await encoding.encode(request, user, body, encoding.sae_payload, sae_id)
