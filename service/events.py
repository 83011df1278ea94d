"""Server-sent events (SSE) for a job's event log: the live view of ``GET /jobs/{id}/events``.

Wire format: the WHATWG HTML "Server-sent events" event stream (``text/event-stream``). Each job event
becomes one SSE event with ``id`` = the event's id, ``event`` = its type (``status``, ``progress``,
``metrics``, ``log``) and ``data`` = the JSON of :class:`rsae_client.models.Event`. A client resumes after
a dropped connection with the standard ``Last-Event-ID`` header (or ``?after=``). The stream ends after
the event that puts the job in a terminal status; while nothing happens, a comment line is sent every
:data:`KEEPALIVE_SECONDS` so proxies keep the connection open. New events are found by polling SQL (the
job row is the source of truth; no second channel can disagree with it).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable

import anyio
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from fastapi.sse import format_sse_event
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from .models import TERMINAL_STATUSES, Job, JobEvent
from .schemas import EventModel, event_out

POLL_SECONDS = 0.5
"""Time between two reads of new events while events arrive."""
MAX_POLL_SECONDS = 4.0
"""While nothing happens the poll interval doubles up to this (so idle streams cost little SQL)."""
KEEPALIVE_SECONDS = 15.0
"""Longest silence before a ``: keepalive`` comment."""
RETRY_MS = 2000
"""Reconnection delay suggested to clients (SSE ``retry`` field), milliseconds."""
BATCH = 500
"""Most events read per poll."""


class StreamSlots:
    """Per-user count of open event streams in this process, capped at ``per_user`` (thread-safe).

    Args:
        per_user: the most streams one user may hold open at once.
    """

    RETRY_AFTER_SECONDS = 5
    """``Retry-After`` of the 429 answered beyond the cap."""

    def __init__(self, per_user: int) -> None:
        self.per_user = int(per_user)
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def acquire(self, user_id: str) -> None:
        """Take a slot for ``user_id``.

        Raises:
            ProblemError: 429 ``too_many_streams`` with ``Retry-After`` when the user holds ``per_user``.
        """
        from .problems import ProblemError

        with self._lock:
            if self._open[user_id] >= self.per_user:
                raise ProblemError(
                    429,
                    "too_many_streams",
                    f"you already hold {self.per_user} open event streams; close one or poll without "
                    "'Accept: text/event-stream'",
                    headers={"Retry-After": str(self.RETRY_AFTER_SECONDS)},
                )
            self._open[user_id] += 1

    def release(self, user_id: str) -> None:
        """Give back a slot of ``user_id``."""
        with self._lock:
            self._open[user_id] -= 1
            if self._open[user_id] <= 0:
                del self._open[user_id]


def _read(make_session: sessionmaker[Session], job_id: str, after: int) -> tuple[list[EventModel], str | None]:
    """Events of ``job_id`` with id > ``after`` (at most :data:`BATCH`) and the job's status.

    The status is read first: a terminal status and its event are committed together, so when the status
    read sees it, the events read after it (a later statement, READ COMMITTED) includes the event. Read the
    other way round, a job finishing between the two reads would end the stream without its last event.
    """
    with make_session() as s:
        status = s.scalar(select(Job.status).where(Job.id == job_id))
        s.commit()  # end the snapshot (SQLite/REPEATABLE READ safe): the next read sees newer commits
        rows = s.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id).limit(BATCH)
        )
        events = [event_out(e) for e in rows]
    return events, status


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` response that calls ``on_close`` once it has been sent or abandoned (client gone,
    server shutting down), whatever happened to the body: the release of the user's :class:`StreamSlots`
    slot. Unlike code after the body generator's last ``yield``, this runs even when the body never started."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - the ASGI signature
        """Send the stream; then release."""
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def job_event_stream(
    request: Request, make_session: sessionmaker[Session], job_id: str, after: int, *, max_seconds: float = 3600.0
) -> AsyncIterator[bytes]:
    """Yield SSE-encoded events of ``job_id`` after event id ``after`` until the job is terminal.

    Stops early when the client disconnects or after ``max_seconds`` (the client resumes with
    ``Last-Event-ID``). The caller has checked that the job exists and is the requesting user's.
    """
    yield format_sse_event(comment="rsae job events", retry=RETRY_MS)
    started = last_sent = time.monotonic()
    pause = POLL_SECONDS
    while True:
        events, status = await run_in_threadpool(_read, make_session, job_id, after)
        pause = POLL_SECONDS if events else min(MAX_POLL_SECONDS, 2 * pause)
        for e in events:
            after = e.id
            yield format_sse_event(data_str=e.model_dump_json(), event=e.type, id=str(e.id))
            last_sent = time.monotonic()
        if len(events) == BATCH:
            continue
        if status is None or status in TERMINAL_STATUSES:
            return  # the terminal status event was among the events just read (see _read)
        if await request.is_disconnected() or time.monotonic() - started >= max_seconds:
            return
        if time.monotonic() - last_sent >= KEEPALIVE_SECONDS:
            yield format_sse_event(comment="keepalive")
            last_sent = time.monotonic()
        await anyio.sleep(pause)
