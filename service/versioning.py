"""API versioning: every resource route lives under ``/v1``; the old unversioned paths answer 308.

``/v1/jobs``, ``/v1/saes``, ... (:data:`rsae_client.models.API_PREFIX`). A request to an old path such as
``POST /jobs`` or ``GET /saes/{id}?x=1`` answers ``308 Permanent Redirect`` to the same path under ``/v1`` (query
kept). 308, unlike 301/302, obliges clients to repeat the method and the body (RFC 9110 section 15.4.9), so
old scripts that follow redirects keep working (``curl -L``; httpx with ``follow_redirects=True``). The
redirect answers before authentication and reads no body. ``/healthz``, ``/readyz``, ``/openapi.json`` and
``/docs`` are not versioned.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class LegacyPathRedirect:
    """Pure ASGI middleware: 308 from ``/<root>...`` to ``<prefix>/<root>...`` for each root in ``roots``.

    Args:
        app: the wrapped ASGI app.
        prefix: the version prefix, e.g. ``/v1``.
        roots: first path segments that moved under the prefix, e.g. ``{"jobs", "saes"}``.
    """

    def __init__(self, app: ASGIApp, *, prefix: str, roots: set[str]) -> None:
        self.app, self.prefix, self.roots = app, prefix, frozenset(roots)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] == "http":
            path: str = scope["path"]
            if path.split("/", 2)[1] in self.roots:
                raw = scope.get("raw_path") or path.encode()
                query = scope.get("query_string") or b""
                location = self.prefix.encode() + raw + (b"?" + query if query else b"")
                await send(
                    {
                        "type": "http.response.start",
                        "status": 308,
                        "headers": [(b"location", location), (b"content-length", b"0")],
                    }
                )
                await send({"type": "http.response.body", "body": b""})
                return
        await self.app(scope, receive, send)
