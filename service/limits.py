"""Request body size limit as a pure ASGI middleware.

Every request body is capped: ``POST /v1/saes`` (teacher uploads, streamed to disk by :mod:`service.uploads`,
which enforces its own per-field limits) at ``max_upload_bytes``, everything else at ``max_body_bytes``. A
declared ``Content-Length`` over the cap is refused before any byte is read; a chunked body is counted as it
streams and refused as soon as it crosses the cap. Both answer 413 problem+json naming ``body``.
"""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .problems import problem_response


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body crosses the cap: a 413 problem (an ``HTTPException``, so
    FastAPI's body parser re-raises it instead of reporting a parse error)."""

    code = "payload_too_large"
    field = "body"

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


class BodyLimitMiddleware:
    """Cap request bodies (see the module docstring).

    Args:
        app: the wrapped ASGI app.
        max_body_bytes: cap for every route but the upload route.
        max_upload_bytes: cap for ``POST`` on ``upload_path`` (checked here against ``Content-Length``
            only; the streamed count is :func:`service.uploads.receive_multipart`'s, naming the part).
        upload_path: path of the upload route (default ``/v1/saes``).
        other_uploads: further streamed upload routes (``POST``), path -> cap (``/v1/datasets``: corpora).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        max_upload_bytes: int,
        upload_path: str = "/v1/saes",
        other_uploads: dict[str, int] | None = None,
    ) -> None:
        self.app, self.max_body = app, max_body_bytes
        self.uploads = {upload_path: max_upload_bytes, **(other_uploads or {})}

    def _upload_limit(self, scope: Scope) -> int | None:
        """The cap of a streamed upload route, None for any other request."""
        return self.uploads.get(scope["path"].rstrip("/")) if scope["method"] == "POST" else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload_limit = self._upload_limit(scope)
        is_upload = upload_limit is not None
        limit = upload_limit if is_upload else self.max_body
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _reply(scope, send, 400, "bad_request", "Content-Length is not a number")
                return
            if size > limit:
                await _reply(
                    scope,
                    send,
                    413,
                    "payload_too_large",
                    f"request body of {size} bytes exceeds the limit of {limit} bytes",
                )
                return
        if is_upload:  # streamed by service.uploads, which counts bytes itself and names the part
            await self.app(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await _reply(scope, send, 413, "payload_too_large", f"request body exceeds the limit of {limit} bytes")


async def _reply(scope: Scope, send: Send, status: int, code: str, detail: str) -> None:
    response = problem_response(status, code, detail, field="body", instance=scope.get("path"))
    await response(scope, _no_receive, send)


async def _no_receive() -> Any:  # pragma: no cover - JSONResponse never reads the request
    return {"type": "http.disconnect"}
