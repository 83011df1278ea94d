"""RFC 9457 problem details: every error response is ``application/problem+json``.

Body: ``{type, title, status, detail, code, field, instance}`` plus, for validation errors, ``errors``: a
list of ``{field, code, detail}`` with dotted field paths (``settings.finetune.steps``).

Bounded: a problem never echoes a large input back. ``detail`` is cut to :data:`MAX_DETAIL_CHARS` and passes
:func:`service.redact.redact` (no server path, host, port or pid); ``field`` is cut to
:data:`MAX_FIELD_CHARS`; ``errors`` lists at most :data:`MAX_ERRORS` items (each detail cut to
:data:`MAX_ITEM_CHARS`), with ``errors_omitted`` counting the rest. A 1 MB body of 60,000 unknown keys
used to give a 9.7 MB answer; now a few kB.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from rsae.errors import RSAEError

from .redact import clip, redact

log = logging.getLogger(__name__)

MAX_ERRORS = 20
"""Most items listed in a problem's ``errors`` (the rest are counted in ``errors_omitted``)."""
MAX_DETAIL_CHARS = 1000
"""Longest ``detail`` of a problem."""
MAX_ITEM_CHARS = 200
"""Longest ``detail`` of one ``errors`` item."""
MAX_FIELD_CHARS = 200
"""Longest ``field`` (of the problem or of an item): a field path built from a long key is cut."""

PROBLEM_JSON = "application/problem+json"
_LOCATIONS = {"body", "query", "path", "header", "cookie"}


class ProblemItem(BaseModel):
    """One invalid input of a ``validation_error`` problem."""

    field: str
    code: str
    detail: str


class Problem(BaseModel):
    """RFC 9457 problem details, the body of every error response (``application/problem+json``)."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    code: str
    field: str | None = None
    instance: str | None = None
    errors: list[ProblemItem] | None = None
    errors_omitted: int | None = None


_STATUS_DESCRIPTIONS = {
    400: "malformed request (problem+json)",
    401: "missing, malformed, unknown or revoked bearer token (problem+json; WWW-Authenticate: Bearer)",
    404: "unknown id, or another user's (problem+json)",
    409: "conflict with the resource's current state, e.g. an SAE still used by a job, or an Idempotency-Key in use "
    "by a request still running (problem+json; Retry-After for the latter)",
    410: "gone: deleted by the retention rule (problem+json)",
    413: "request body too large (problem+json)",
    415: "unsupported media type (problem+json)",
    422: "invalid input; 'field' names it (problem+json)",
    429: "too many requests: failed authentications or submissions over the rate limit (code rate_limited), "
    "or too many unfinished jobs (problem+json; Retry-After)",
    503: "a dependency is unavailable (problem+json; Retry-After)",
    504: "a worker did not answer in time (problem+json)",
}


def problem_responses(*statuses: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting problem+json answers with the given status codes.

    ``descriptions`` overrides a status's default description, keyed ``s404="..."``.
    """
    ref = {"schema": {"$ref": "#/components/schemas/Problem"}}
    return {
        s: {
            "model": Problem,
            "content": {PROBLEM_JSON: ref},
            "description": descriptions.get(f"s{s}", _STATUS_DESCRIPTIONS[s]),
        }
        for s in statuses
    }


class ProblemError(Exception):
    """Raise anywhere in a request to answer with a problem+json response.

    Args:
        status: HTTP status code.
        code: machine-readable error code (snake_case), also the tail of ``type``.
        detail: human explanation of this occurrence.
        field: dotted path of the offending input, if any.
        headers: extra response headers (e.g. ``Retry-After``).
        extra: extra members of the problem object.
    """

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.field = status, code, detail, field
        self.headers = headers
        self.extra = extra


class NotFound(ProblemError):
    """404 for a resource that does not exist (``code`` = ``<what>_not_found``)."""

    def __init__(self, what: str, ident: str, *, field: str = "id") -> None:
        super().__init__(404, f"{what}_not_found", f"no {what.replace('_', ' ')} with id {ident!r}", field=field)


def problem_response(
    status: int,
    code: str,
    detail: str,
    *,
    field: str | None = None,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """Build a problem+json response (``detail`` redacted and cut, ``field`` cut: see the module docstring)."""
    body: dict[str, Any] = {
        "type": f"urn:rsae:problem:{code}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": redact(detail, MAX_DETAIL_CHARS),
        "code": code,
        "field": None if field is None else clip(field, MAX_FIELD_CHARS),
    }
    if instance is not None:
        body["instance"] = instance
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def field_path(loc: Sequence[str | int]) -> str:
    """Dotted field path of a pydantic error location, without FastAPI's leading ``body``/``query``/...

    ``("body", "settings", "finetune", "steps")`` -> ``settings.finetune.steps``; list indexes are kept as
    path segments; an empty remainder is the location itself (``body``).
    """
    parts = list(loc)
    head = parts.pop(0) if parts and parts[0] in _LOCATIONS else None
    return ".".join(str(p) for p in parts) or (head or "")


def validation_errors(errors: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``[{field, code, detail}]`` of pydantic errors (``field`` a dotted path, see :func:`field_path`; pydantic's
    ``input`` is never copied, and ``field`` and ``detail`` are cut to :data:`MAX_FIELD_CHARS` and
    :data:`MAX_ITEM_CHARS`)."""
    return [
        {
            "field": clip("body" if e.get("type") == "json_invalid" else field_path(e.get("loc", ())), MAX_FIELD_CHARS),
            "code": e.get("type", "invalid"),
            "detail": clip(str(e.get("msg", "invalid value")), MAX_ITEM_CHARS),
        }
        for e in errors
    ]


def validation_error(errors: list[dict[str, Any]]) -> ProblemError:
    """A 422 :class:`ProblemError` listing ``errors`` (from :func:`validation_errors`); ``field`` is the first.

    At most :data:`MAX_ERRORS` items are listed (``errors_omitted``: how many more there were); ``detail``
    joins the first five.
    """
    shown = [
        {**e, "field": clip(e["field"], MAX_FIELD_CHARS), "detail": clip(e["detail"], MAX_ITEM_CHARS)}
        for e in errors[:MAX_ERRORS]
    ]
    detail = "; ".join(f"{e['field']}: {e['detail']}" for e in shown[:5]) or "invalid request"
    extra: dict[str, Any] = {}
    if len(errors) > 5:
        detail += f" (and {len(errors) - 5} more)"
    if len(errors) > MAX_ERRORS:
        extra["errors_omitted"] = len(errors) - MAX_ERRORS
    return ProblemError(
        422, "validation_error", detail, field=shown[0]["field"] if shown else None, errors=shown, **extra
    )


async def _problem_error(request: Request, exc: ProblemError) -> JSONResponse:
    return problem_response(
        exc.status, exc.code, exc.detail, field=exc.field, instance=request.url.path, headers=exc.headers, **exc.extra
    )


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    problem = getattr(exc, "problem", None)  # e.g. service.jsonbody.InvalidBody: carries its own problem
    if isinstance(problem, ProblemError):
        return await _problem_error(request, problem)
    if exc.status_code == 400 and isinstance(exc.__cause__, (RecursionError, ValueError)):
        # FastAPI's body parser turns any parse failure into a bare 400 (routes with service.jsonbody's
        # StrictJSONRoute name the field instead); JSON nested past Python's recursion limit, invalid UTF-8
        # or an integer too long to convert is the client's malformed body, reported like invalid JSON.
        deep = isinstance(exc.__cause__, RecursionError)
        error = {
            "field": "body",
            "code": "json_too_deep" if deep else "json_invalid",
            "detail": "JSON nested too deeply" if deep else "the body is not valid JSON in UTF-8",
        }
        return await _problem_error(request, validation_error([error]))
    phrase = HTTPStatus(exc.status_code).phrase
    detail = exc.detail if isinstance(exc.detail, str) else phrase
    code = getattr(exc, "code", None) or phrase.lower().replace(" ", "_").replace("-", "_")
    return problem_response(
        exc.status_code,
        code,
        detail,
        field=getattr(exc, "field", None),
        instance=request.url.path,
        headers=getattr(exc, "headers", None),
    )


async def _request_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return await _problem_error(request, validation_error(validation_errors(exc.errors())))


async def _rsae_error(request: Request, exc: RSAEError) -> JSONResponse:
    return problem_response(422, exc.code, exc.message, field=exc.field, instance=request.url.path)


async def _data_error(request: Request, exc: DataError) -> JSONResponse:
    log.warning("database refused a value on %s %s: %s", request.method, request.url.path, exc.orig)
    return problem_response(
        422,
        "invalid_value",
        "a value cannot be stored (e.g. a NUL character or a number out of range)",
        instance=request.url.path,
    )


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """A transient database failure (connection lost or refused, a timeout, SQLite's lock held past the busy
    timeout) is a 503 the client may retry, not a 500; the cause goes to the log only (it names hosts)."""
    log.error("database unavailable on %s %s: %s", request.method, request.url.path, exc)
    return problem_response(
        503,
        "database_unavailable",
        "the database is busy or unreachable; retry shortly",
        instance=request.url.path,
        headers={"Retry-After": "2"},
    )


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(
        500, "internal_error", "internal server error; see the server log", instance=request.url.path
    )


def install_problem_handlers(app: FastAPI) -> None:
    """Register the problem+json exception handlers on ``app``."""
    app.add_exception_handler(ProblemError, _problem_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(RSAEError, _rsae_error)
    app.add_exception_handler(DataError, _data_error)
    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_exception_handler(InterfaceError, _database_unavailable)
    app.add_exception_handler(Exception, _unhandled)
