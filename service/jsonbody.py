"""Strict JSON request bodies (RFC 8259): what FastAPI's ``json.loads`` lets through or answers with a bare 400.

FastAPI parses a JSON body with :func:`json.loads` and turns every failure but a syntax error into
``400 There was an error parsing the body`` with no field. This module parses it instead (through the route
class :class:`StrictJSONRoute`, set on every router) and answers 422 problem+json naming the field, or
``body`` when no field can be named, for:

- invalid UTF-8 (RFC 8259 §8.1: JSON exchanged between systems MUST be UTF-8) -> ``body``, ``invalid_utf8``;
- an integer with more digits than Python converts (``sys.get_int_max_str_digits()``, 4300; CVE-2020-10735
  limit) -> the field, ``int_too_long`` (was a 400);
- the same key twice in one object (RFC 8259 §4: names SHOULD be unique; the last one silently won)
  -> the field, ``duplicate_key``;
- a string with a lone surrogate escape (``"\\ud800"``: not Unicode, cannot be stored) -> the field,
  ``invalid_unicode``;
- nesting past the recursion limit -> ``body``, ``json_too_deep``.

Syntax errors still raise :class:`json.JSONDecodeError`, which FastAPI reports as 422 ``json_invalid``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from .problems import validation_error

MAX_REPORTED = 20
"""At most this many problems of one body are listed."""


class InvalidBody(HTTPException):
    """A JSON body that parses but breaks the rules above; carries the 422 :class:`ProblemError` to answer.

    An ``HTTPException``, so FastAPI's body reader re-raises it instead of answering 400; the problem
    handler (:func:`service.problems.install_problem_handlers`) answers ``problem``.
    """

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        """``[{field, code, detail}]``; ``field`` is ``body`` or a dotted path inside the body."""
        self.problem = validation_error(errors)
        super().__init__(422, self.problem.detail)


class _Object(dict):
    """A parsed JSON object that remembers the keys it saw twice."""

    __slots__ = ("duplicates",)


class _LongInt:
    """Placeholder for an integer literal too long to convert."""

    __slots__ = ("digits",)

    def __init__(self, digits: int) -> None:
        self.digits = digits


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object()
    obj.duplicates = []
    for key, value in pairs:
        if key in obj and key not in obj.duplicates:
            obj.duplicates.append(key)
        obj[key] = value
    return obj


def _int(text: str) -> int | _LongInt:
    digits = len(text.lstrip("-"))
    limit = sys.get_int_max_str_digits()
    return _LongInt(digits) if limit and digits > limit else int(text)


def _path(parts: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in parts) or "body"


def _clean(root: Any) -> tuple[Any, list[dict[str, Any]]]:
    """Plain dicts in place of :class:`_Object` and the problems found, walking ``root`` iteratively."""
    errors: list[dict[str, Any]] = []
    limit = sys.get_int_max_str_digits()

    def check(value: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(value, _LongInt):
            errors.append(
                {
                    "field": _path(path),
                    "code": "int_too_long",
                    "detail": f"integer of {value.digits} digits; at most {limit} digits are accepted",
                }
            )
            return None
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                errors.append(
                    {"field": _path(path), "code": "invalid_unicode", "detail": "string with a lone surrogate escape"}
                )
        return value

    out: list[Any] = [None]
    stack: list[tuple[Any, tuple[Any, ...], Any, Any]] = [(root, (), out, 0)]
    while stack:
        value, path, parent, slot = stack.pop()
        if isinstance(value, dict):
            for key in getattr(value, "duplicates", ()):
                errors.append(
                    {
                        "field": _path((*path, key)),
                        "code": "duplicate_key",
                        "detail": f"key {key[:100]!r} appears more than once in this object",
                    }
                )
            plain: dict[str, Any] = {}
            parent[slot] = plain
            for key, item in value.items():
                check(key, (*path, key))
                plain[key] = None
                stack.append((item, (*path, key), plain, key))
        elif isinstance(value, list):
            items: list[Any] = [None] * len(value)
            parent[slot] = items
            stack.extend((item, (*path, i), items, i) for i, item in enumerate(value))
        else:
            parent[slot] = check(value, path)
        if len(errors) >= MAX_REPORTED:
            break
    return out[0], errors


def parse_json_body(body: bytes) -> Any:
    """Parse a request body as strict JSON (see the module docstring).

    Returns:
        The value, with plain ``dict`` / ``list`` / ``str`` / ``int`` / ``float`` / ``bool`` / None.

    Raises:
        json.JSONDecodeError: not JSON (FastAPI answers 422 ``json_invalid``, field ``body``).
        InvalidBody: invalid UTF-8, an over-long integer, a duplicate key, a lone surrogate, too deep.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidBody(
            [{"field": "body", "code": "invalid_utf8", "detail": f"the body is not UTF-8 (byte {e.start})"}]
        ) from None
    try:
        value = json.loads(text, object_pairs_hook=_object, parse_int=_int)
    except RecursionError:
        raise InvalidBody([{"field": "body", "code": "json_too_deep", "detail": "JSON nested too deeply"}]) from None
    value, errors = _clean(value)
    if errors:
        raise InvalidBody(errors)
    return value


class StrictJSONRequest(Request):
    """A request whose :meth:`json` is :func:`parse_json_body`."""

    async def json(self) -> Any:
        """The body parsed by :func:`parse_json_body` (cached).

        Raises:
            json.JSONDecodeError, InvalidBody: see :func:`parse_json_body`.
        """
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """FastAPI route class reading JSON bodies with :class:`StrictJSONRequest` (set ``route_class`` on each
    ``APIRouter``; FastAPI's documented way to customise the request: "Custom Request and APIRoute class")."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """The default handler, called with a :class:`StrictJSONRequest`."""
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler
