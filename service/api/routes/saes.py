"""Teacher SAE uploads: ``POST /saes``, ``GET /saes``, ``GET /saes/{id}``."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from rsae.errors import TeacherError
from rsae.formats import FORMATS, DetectedFormat, import_teacher
from rsae.sae import CFG_NAME, load_sae
from service.api.deps import LimitDep, SessionDep, SettingsDep
from service.auth import UserDep
from service.config import Settings
from service.models import Sae, is_uuid, new_id, utcnow
from service.problems import NotFound, ProblemError, problem_responses
from service.schemas import SaeOut
from service.uploads import ReceivedForm, receive_multipart

router = APIRouter(prefix="/saes", tags=["saes"], responses=problem_responses(400, 401, 413, 422))

MAX_NAME_CHARS = 200
UPLOAD_FILES: dict[str, str] = {
    "cfg": "cfg.json",                    # SAELens, sparsify
    "weights": "sae_weights.safetensors",  # SAELens
    "sae": "sae.safetensors",             # EleutherAI sparsify
    "params": "params.npz",               # Gemma Scope
    "ae": "ae.pt",                        # dictionary_learning (read with torch.load(weights_only=True))
    "config": "config.json",              # dictionary_learning
}
"""Multipart file field -> the file name it is stored under (the formats' own names; see docs/formats.md)."""
WEIGHT_FIELDS = ("weights", "sae", "params", "ae")
"""Fields of which exactly one must be present: the teacher's tensors."""
_FORM_FIELDS = {fname: form for form, fname in UPLOAD_FILES.items()}

_UPLOAD_BODY = {
    "required": True,
    "content": {"multipart/form-data": {
        "schema": {
            "type": "object",
            "properties": {
                "cfg": {"type": "string", "format": "binary",
                        "description": "cfg.json (SAELens: architecture, d_in, d_sae, ...; sparsify: its "
                        "SparseCoder config)."},
                "weights": {"type": "string", "format": "binary",
                            "description": "SAELens sae_weights.safetensors (W_enc, b_enc, W_dec, b_dec, ...)."},
                "sae": {"type": "string", "format": "binary",
                        "description": "EleutherAI sparsify sae.safetensors (with cfg)."},
                "params": {"type": "string", "format": "binary",
                           "description": "Gemma Scope params.npz (W_enc, W_dec, b_enc, b_dec, threshold); "
                           "read without pickle."},
                "ae": {"type": "string", "format": "binary",
                       "description": "dictionary_learning ae.pt (with config); read with "
                       "torch.load(weights_only=True), so pickled objects are refused."},
                "config": {"type": "string", "format": "binary",
                           "description": "dictionary_learning config.json."},
                "format": {"type": "string", "enum": ["saelens", "gemma_scope", "sparsify",
                                                      "dictionary_learning"],
                           "description": "Force the format instead of detecting it from the fields."},
                "name": {"type": "string", "maxLength": MAX_NAME_CHARS, "description": "Optional label."},
            },
        },
        "examples": {
            "saelens": {"summary": "SAELens layout", "value": {"cfg": "<cfg.json>",
                                                                "weights": "<sae_weights.safetensors>",
                                                                "name": "layer-3-relu"}},
            "gemma_scope": {"summary": "Gemma Scope", "value": {"params": "<params.npz>"}},
        },
    }},
}


def _form_field(field: str | None) -> str | None:
    """``cfg.json.d_in`` -> ``cfg.d_in``; ``sae_weights.safetensors.W_enc`` -> ``weights.W_enc``; ..."""
    for fname, form in _FORM_FIELDS.items():
        if field is not None and (field == fname or field.startswith(fname + ".")):
            return form + field[len(fname):]
    return field


def _import_teacher(src: Path, out: Path, fmt: str | None) -> DetectedFormat:
    """Read the uploaded files in whichever format they are (:func:`rsae.formats.import_teacher`), write the
    teacher in the project's SAELens layout at ``out`` and validate that folder with the pipeline's own
    loader. Errors name the upload's form fields."""
    try:
        detected = import_teacher(src, out, format=fmt)
        load_sae(out)
        return detected
    except TeacherError as e:
        message = e.message.replace(str(src), "the upload").replace(str(out), "the upload")
        raise TeacherError(message, field=_form_field(e.field)) from None


def _register(make_session: sessionmaker[Session], settings: Settings, folder: Path, form: ReceivedForm,
              detected: DetectedFormat, owner_id: str) -> Sae:
    """Move the imported teacher to ``<uploads>/<id>/`` and insert its row (folder removed on failure)."""
    weights_field = next(f for f in WEIGHT_FIELDS if f in form.sha256)
    cfg = json.loads((folder / CFG_NAME).read_text(encoding="utf-8"))
    row = Sae(id=new_id(), owner_id=owner_id, name=form.text.get("name") or None, family=detected.family,
              architecture=cfg.get("architecture", "standard"), d_in=detected.d_in, d_sae=detected.d_sae,
              sha256=form.sha256[weights_field], cfg=cfg, created_at=utcnow())
    row.path = row.id
    final = settings.uploads_dir / row.path
    os.replace(folder, final)
    try:
        with make_session() as session, session.begin():
            session.add(row)
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise
    return row


@router.post("", status_code=201, openapi_extra={"requestBody": _UPLOAD_BODY},
             responses=problem_responses(415, 422, s422="invalid teacher: 'field' names the form field "
                                         "and key, e.g. cfg.d_in or weights.W_enc (problem+json)"))
async def upload_sae(request: Request, response: Response, settings: SettingsDep, user: UserDep) -> SaeOut:
    """Upload a teacher SAE in any of four formats (multipart; see docs/formats.md):

    - SAELens: ``cfg`` + ``weights`` (sae_weights.safetensors);
    - EleutherAI sparsify: ``cfg`` + ``sae`` (sae.safetensors);
    - Gemma Scope: ``params`` (params.npz);
    - dictionary_learning: ``ae`` (ae.pt) + ``config``.

    The body is streamed to a temporary folder under the uploads dir (413 past ``max_upload_bytes``), read
    with :func:`rsae.formats.import_teacher` (format and conventions detected, reported back in
    ``source``), checked (shapes, dtypes, finite values, config keys: 422 naming the offending field such
    as ``cfg.d_in`` or ``weights.W_enc``), stored in the SAELens layout and moved to ``<uploads>/<id>/``.
    """
    settings.uploads_dir.mkdir(parents=True, exist_ok=True)
    tmp = settings.uploads_dir / f".upload-{uuid.uuid4().hex}"
    (tmp / "src").mkdir(parents=True)
    try:
        form = await receive_multipart(
            request, tmp / "src", files=UPLOAD_FILES, text_fields={"name", "format"}, required=set(),
            max_bytes=settings.max_upload_bytes,
            part_limits={"cfg": settings.max_cfg_bytes, "config": settings.max_cfg_bytes})
        given = [f for f in WEIGHT_FIELDS if f in form.paths]
        if len(given) != 1:
            raise ProblemError(422, "missing_field" if not given else "validation_error",
                               "send exactly one weights file: 'weights' (SAELens), 'sae' (sparsify), 'params' "
                               "(Gemma Scope) or 'ae' (dictionary_learning)", field=(given or ["weights"])[-1])
        name = form.text.get("name", "")
        if len(name) > MAX_NAME_CHARS or not name.isprintable():
            raise ProblemError(422, "validation_error", f"name must be at most {MAX_NAME_CHARS} printable "
                               "characters", field="name")
        fmt = form.text.get("format") or None
        if fmt is not None and fmt not in FORMATS:
            raise ProblemError(422, "validation_error", f"format must be one of {list(FORMATS)}", field="format")
        detected = await run_in_threadpool(_import_teacher, tmp / "src", tmp / "sae", fmt)
        row = await run_in_threadpool(_register, request.app.state.sessionmaker, settings, tmp / "sae", form,
                                      detected, user.id)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the imported folder was moved out already
    response.headers["Location"] = f"/saes/{row.id}"
    return SaeOut.from_row(row)


@router.get("")
def list_saes(session: SessionDep, limit: LimitDep, user: UserDep) -> list[SaeOut]:
    """Your ``limit`` most recently uploaded teacher SAEs, newest first."""
    rows = session.scalars(select(Sae).where(Sae.owner_id == user.id).order_by(Sae.created_at.desc(), Sae.id.desc()).limit(limit))
    return [SaeOut.from_row(r) for r in rows]


@router.get("/{sae_id}", responses=problem_responses(404))
def get_sae(sae_id: str, session: SessionDep, user: UserDep) -> SaeOut:
    """One of your uploaded teacher SAEs (another user's id is a 404, like an unknown one)."""
    row = session.get(Sae, sae_id) if is_uuid(sae_id) else None
    if row is None or row.owner_id != user.id:
        raise NotFound("sae", sae_id)
    return SaeOut.from_row(row)
