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
from rsae.sae import CFG_NAME, WEIGHTS_NAME, SAE, load_sae
from service.api.deps import LimitDep, SessionDep, SettingsDep
from service.auth import UserDep
from service.config import Settings
from service.models import Sae, is_uuid, new_id, utcnow
from service.problems import NotFound, ProblemError, problem_responses
from service.schemas import SaeOut
from service.uploads import ReceivedForm, receive_multipart

router = APIRouter(prefix="/saes", tags=["saes"], responses=problem_responses(400, 401, 413, 422))

MAX_NAME_CHARS = 200
# Form field <- file name inside the SAE folder, to name upload fields in TeacherError messages.
_FORM_FIELDS = {CFG_NAME: "cfg", WEIGHTS_NAME: "weights"}

_UPLOAD_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object",
        "required": ["cfg", "weights"],
        "properties": {
            "cfg": {"type": "string", "format": "binary",
                    "description": "cfg.json in the SAELens layout (architecture, d_in, d_sae, ...)."},
            "weights": {"type": "string", "format": "binary",
                        "description": "sae_weights.safetensors (W_enc, b_enc, W_dec, b_dec). Only "
                        "safetensors is accepted; pickled checkpoints never are."},
            "name": {"type": "string", "maxLength": MAX_NAME_CHARS, "description": "Optional label."},
        },
    }}},
}


def _form_field(field: str | None) -> str | None:
    """``cfg.json.d_in`` -> ``cfg.d_in``; ``sae_weights.safetensors.W_enc`` -> ``weights.W_enc``."""
    for fname, form in _FORM_FIELDS.items():
        if field is not None and (field == fname or field.startswith(fname + ".")):
            return form + field[len(fname):]
    return field


def _validate_teacher(folder: Path) -> SAE:
    """Load the uploaded folder with the core's loader; its errors name the upload's form fields."""
    try:
        return load_sae(folder)
    except TeacherError as e:
        raise TeacherError(e.message.replace(str(folder), "the upload"), field=_form_field(e.field)) from None


def _register(make_session: sessionmaker[Session], settings: Settings, tmp: Path, form: ReceivedForm,
              sae: SAE, owner_id: str) -> Sae:
    """Move the validated upload to ``<uploads>/<id>/`` and insert its row (folder removed on failure)."""
    row = Sae(id=new_id(), owner_id=owner_id, name=form.text.get("name") or None, family=sae.family,
              architecture=sae.architecture, d_in=sae.d_in, d_sae=sae.d_sae, sha256=form.sha256["weights"],
              cfg=json.loads((tmp / CFG_NAME).read_text(encoding="utf-8")), created_at=utcnow())
    row.path = row.id
    final = settings.uploads_dir / row.path
    os.replace(tmp, final)
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
    """Upload a teacher SAE (multipart fields ``cfg``, ``weights``, optional ``name``).

    The body is streamed to a temporary folder under the uploads dir (413 past ``max_upload_bytes``),
    validated with :func:`rsae.sae.load_sae` (422 naming the offending field: ``cfg.d_in``,
    ``weights.W_enc``, ...), then moved to ``<uploads>/<id>/``.
    """
    settings.uploads_dir.mkdir(parents=True, exist_ok=True)
    tmp = settings.uploads_dir / f".upload-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        form = await receive_multipart(
            request, tmp, files={"cfg": CFG_NAME, "weights": WEIGHTS_NAME}, text_fields={"name"},
            required={"cfg", "weights"}, max_bytes=settings.max_upload_bytes,
            part_limits={"cfg": settings.max_cfg_bytes})
        name = form.text.get("name", "")
        if len(name) > MAX_NAME_CHARS or not name.isprintable():
            raise ProblemError(422, "validation_error", f"name must be at most {MAX_NAME_CHARS} printable "
                               "characters", field="name")
        sae = await run_in_threadpool(_validate_teacher, tmp)
        row = await run_in_threadpool(_register, request.app.state.sessionmaker, settings, tmp, form, sae,
                                     user.id)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful move
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
