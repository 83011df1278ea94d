"""uvicorn's h11 protocol with a request-head read timeout, and the server limits ``rsae-service serve`` uses.

uvicorn times out idle kept-alive connections (``timeout_keep_alive``) but neither a fresh connection that
sends nothing nor a request head sent one byte at a time ("slowloris"): each holds a connection, and
``limit_concurrency`` slots, for as long as the client likes. :class:`HeadTimeoutH11Protocol` closes a
connection whose request head is not complete ``RSAE_HEADER_TIMEOUT_SECONDS`` after it connected (or after
the first byte of a further request on a kept-alive connection). Bodies are not timed here: a slow body is
bounded by ``RSAE_MAX_BODY_BYTES`` and, in production, by the reverse proxy (``client_body_timeout``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .config import Settings, get_settings


class HeadTimeoutH11Protocol(H11Protocol):
    """:class:`uvicorn.protocols.http.h11_impl.H11Protocol` plus the head timeout of the module docstring.

    The timeout is read from the process settings (``RSAE_HEADER_TIMEOUT_SECONDS``), so the class can be named
    in uvicorn's config as it is (uvicorn's worker processes re-import it).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout = get_settings().header_timeout_seconds
        self._head_timer: asyncio.TimerHandle | None = None

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the clock for the first request's head."""
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        """Feed h11; the clock runs while a request head is incomplete, and stops once it is parsed."""
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm_head_timer()  # (a first byte of a next request starts it; more bytes do not reset it)
        else:
            self._disarm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the clock."""
        self._disarm_head_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        """After a response the keep-alive timeout applies until the next request's first byte."""
        self._disarm_head_timer()
        super().on_response_complete()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.info("closing a connection whose request head took over %.0f s", self.head_timeout)
            self.transport.close()


def server_limits(settings: Settings) -> dict[str, Any]:
    """uvicorn keyword arguments of the API's connection limits (documented in :class:`service.config.Settings`):
    head size (``h11_max_incomplete_event_size``), keep-alive, concurrency and the head read timeout (``http``)."""
    return {
        "http": HeadTimeoutH11Protocol,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "timeout_keep_alive": settings.keep_alive_seconds,
        "limit_concurrency": settings.max_concurrency,
    }
