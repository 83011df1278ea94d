"""Streaming ``multipart/form-data`` reception straight into a folder, with size limits.

Starlette's form parser spools every file to the system temp dir without a size limit before the route
runs; this module instead writes each file part directly to its final name in a caller-owned folder,
hashing it on the way, and stops with 413 as soon as a limit is crossed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from .problems import ProblemError

MAX_TEXT_FIELD_BYTES = 4096
"""Largest accepted text (non-file) part."""


@dataclass
class ReceivedForm:
    """What :func:`receive_multipart` stored: text fields, and per file field its path, size and sha256."""

    text: dict[str, str] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)


class _Sink:
    """python-multipart callbacks that route each part to a file or a text buffer."""

    def __init__(self, dest: Path, files: dict[str, str], text_fields: set[str], part_limits: dict[str, int]) -> None:
        self.dest, self.files, self.text_fields, self.part_limits = dest, files, text_fields, part_limits
        self.form = ReceivedForm()
        self.ended = False
        self.current: str | None = None
        self._headers: dict[bytes, bytes] = {}
        self._hname = self._hvalue = b""
        self._file: IO[bytes] | None = None
        self._hash: Any = None
        self._buf = bytearray()
        self._size = 0

    def callbacks(self) -> dict[str, Any]:
        """The callback table for :class:`MultipartParser`."""
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers, self._hname, self._hvalue, self._size = {}, b"", b"", 0
        self._buf = bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._hname.strip().lower()] = self._hvalue.strip()
        self._hname = self._hvalue = b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if not name:
            raise ProblemError(400, "malformed_multipart", "a part has no Content-Disposition name", field="body")
        if name not in self.files and name not in self.text_fields:
            known = ", ".join(sorted([*self.files, *self.text_fields]))
            raise ProblemError(422, "unknown_field", f"unexpected form field {name!r}; expected: {known}", field=name)
        if name in self.form.paths or name in self.form.text:
            raise ProblemError(422, "duplicate_field", f"form field {name!r} given more than once", field=name)
        self.current = name
        if name in self.files:
            path = self.dest / self.files[name]
            self.form.paths[name] = path
            self._file = open(path, "wb")
            self._hash = hashlib.sha256()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        self._size += len(chunk)
        limit = self.part_limits.get(self.current or "", MAX_TEXT_FIELD_BYTES if self._file is None else None)
        if limit is not None and self._size > limit:
            raise ProblemError(
                413, "payload_too_large", f"form field {self.current!r} exceeds {limit} bytes", field=self.current
            )
        if self._file is None:
            self._buf += chunk
        else:
            self._file.write(chunk)
            self._hash.update(chunk)

    def _part_end(self) -> None:
        name = self.current
        assert name is not None
        if self._file is not None:
            self._file.close()
            self._file = None
            self.form.sizes[name] = self._size
            self.form.sha256[name] = self._hash.hexdigest()
        else:
            try:
                self.form.text[name] = self._buf.decode("utf-8")
            except UnicodeDecodeError:
                raise ProblemError(422, "invalid_encoding", f"form field {name!r} is not UTF-8", field=name) from None
        self.current = None

    def _end(self) -> None:
        self.ended = True

    def close(self) -> None:
        """Close a file left open by an interrupted part."""
        if self._file is not None:
            self._file.close()
            self._file = None


async def receive_multipart(
    request: Request,
    dest: Path,
    *,
    files: dict[str, str],
    text_fields: set[str],
    required: set[str],
    max_bytes: int,
    part_limits: dict[str, int] | None = None,
) -> ReceivedForm:
    """Stream a ``multipart/form-data`` request body into folder ``dest``.

    Args:
        request: the incoming request (its body is consumed).
        dest: existing folder; the caller removes it if this raises.
        files: file field name -> file name to write under ``dest``.
        text_fields: accepted text field names (each at most :data:`MAX_TEXT_FIELD_BYTES`).
        required: field names that must be present.
        max_bytes: limit on the whole body, counted as it streams (a declared ``Content-Length`` above it
            is refused earlier, by :class:`service.limits.BodyLimitMiddleware`).
        part_limits: per-field byte limits.

    Raises:
        ProblemError: 415 not multipart; 400 malformed; 413 too large (naming the field being read);
            422 unknown, duplicate or missing field.
    """
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise ProblemError(
            415,
            "unsupported_media_type",
            "send multipart/form-data (e.g. curl -F cfg=@cfg.json -F weights=@...)",
            field="body",
        )
    sink = _Sink(dest, files, text_fields, part_limits or {})
    try:
        parser = MultipartParser(params[b"boundary"], sink.callbacks())
        room = max_bytes
        async for chunk in request.stream():
            if chunk:
                # Parse up to the limit only, so that the 413 names the part being read when it is hit.
                await anyio.to_thread.run_sync(parser.write, chunk[:room])
            room -= len(chunk)
            if room < 0:
                raise ProblemError(
                    413,
                    "payload_too_large",
                    f"request body exceeds the limit of {max_bytes} bytes",
                    field=sink.current or "body",
                )
    except FormParserError as e:
        raise ProblemError(400, "malformed_multipart", f"malformed multipart body: {e}", field="body") from None
    finally:
        sink.close()
    if not sink.ended:
        raise ProblemError(400, "malformed_multipart", "multipart body ended before its closing boundary", field="body")
    missing = sorted(required - set(sink.form.paths) - set(sink.form.text))
    if missing:
        raise ProblemError(422, "missing_field", f"form field {missing[0]!r} is required", field=missing[0])
    return sink.form
