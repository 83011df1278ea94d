"""Server-sent events (SSE) for a job's event log: the live view of ``GET /jobs/{id}/events``.

Wire format: the WHATWG HTML "Server-sent events" event stream (``text/event-stream``). Each job event
becomes one SSE event with ``id`` = the event's id, ``event`` = its type (``status``, ``progress``,
``metrics``, ``log``) and ``data`` = the JSON of :class:`rsae_client.models.Event`. A client resumes after
a dropped connection with the standard ``Last-Event-ID`` header (or ``?after=``). The stream ends after
the event that puts the job in a terminal status; while nothing happens, a comment line is sent every
:data:`KEEPALIVE_SECONDS` so proxies keep the connection open.

New events are found by polling SQL (the job row is the source of truth; no second channel can disagree with
it), but not per stream: one :class:`EventHub` per process polls every :data:`POLL_SECONDS`, in one statement,
the status and the newest event id of every job that has an open stream, reads the new events of a job once,
and hands them to all of that job's streams from memory. A stream reads the database itself only for its
backlog (events older than what the hub holds). So 100 open streams cost one small query per poll instead of
100 (which, started together, also polled together: 100 worker-thread hops at once, queued ahead of every
other request's; issue 14 measured a p99 of 540 ms for ``GET /v1/jobs/{id}`` at 200 requests/s that way), and
an idle stream holds no connection and no thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import anyio
import anyio.to_thread
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from fastapi.sse import format_sse_event
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from .models import TERMINAL_STATUSES, Job, JobEvent
from .schemas import EventModel, event_out

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
"""Time between two polls of the :class:`EventHub` (one query for all open streams): an event reaches its
streams at most this long (plus the query) after it is committed."""
KEEPALIVE_SECONDS = 15.0
"""Longest silence before a ``: keepalive`` comment."""
RETRY_MS = 2000
"""Reconnection delay suggested to clients (SSE ``retry`` field), milliseconds."""
BATCH = 500
"""Most events read per query."""
BUFFER = 1000
"""Most recent events the :class:`EventHub` keeps per watched job; a stream further behind reads the database."""


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


@dataclass
class JobWatch:
    """What the :class:`EventHub` knows of one watched job.

    Attributes:
        known: polled at least once (before that, streams read the database themselves).
        status: the job's status at the last poll; None once the job is gone.
        start: every event of the job with ``start < id <= cursor`` is in ``events`` (ascending ids).
        cursor: the newest event id seen (0: none).
        events: the buffered events (at most :data:`BUFFER`).
        watchers: open streams of the job in this process.
        changed: set (and replaced) whenever ``cursor`` or ``status`` moves.
    """

    known: bool = False
    status: str | None = None
    start: int = 0
    cursor: int = 0
    events: list[EventModel] = field(default_factory=list)
    watchers: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def covers(self, after: int) -> bool:
        """Whether the buffer holds every event after ``after`` (so no database read is needed)."""
        return self.known and after >= self.start

    def since(self, after: int) -> list[EventModel]:
        """The buffered events with id > ``after`` (ascending)."""
        return [e for e in self.events if e.id > after]

    def moved_past(self, after: int) -> bool:
        """Whether a stream that has seen events up to ``after`` has something new: a newer event, or the end."""
        return self.known and (self.cursor > after or self.status is None or self.status in TERMINAL_STATUSES)


class EventHub:
    """The one poller of a process's event streams (``app.state.event_hub``; see the module docstring).

    A stream :meth:`watch`-es its job while open; a background task of the event loop then polls every
    ``poll_seconds`` while any job is watched (and stops when none is): one worker-thread hop and one query for
    all watched jobs (status and newest event id), plus one read of the new events of each job that has some.
    Streams take those from :meth:`state` and sleep in :meth:`wait`. A failed poll (database unreachable) is
    logged and retried at the next tick; the streams meanwhile keep sending keepalives.

    Args:
        make_session: the app's session factory.
        poll_seconds: time between two polls (s).
        buffer: most recent events kept per job.
    """

    def __init__(
        self, make_session: sessionmaker[Session], poll_seconds: float = POLL_SECONDS, buffer: int = BUFFER
    ) -> None:
        self.make_session = make_session
        self.poll_seconds = float(poll_seconds)
        self.buffer = int(buffer)
        self.polls = 0
        """Polls done so far (tests and benchmarks read it)."""
        self._jobs: dict[str, JobWatch] = {}
        self._task: asyncio.Task[None] | None = None
        self._warned_at = -float("inf")

    def state(self, job_id: str) -> JobWatch | None:
        """What the hub knows of ``job_id`` (None while it is not watched)."""
        return self._jobs.get(job_id)

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[JobWatch]:
        """Watch ``job_id`` while the block runs (call it on the event loop); starts the poller if it is idle.

        Yields:
            The job's :class:`JobWatch` (shared by every stream of the job).
        """
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            if self._task is not None and not self._task.done() and self._task.get_loop() is not loop:
                self._jobs.clear()  # a previous event loop's streams (tests start several loops)
            self._task = loop.create_task(self._run(), name="rsae-event-hub")
        w = self._jobs.setdefault(job_id, JobWatch())
        w.watchers += 1
        try:
            yield w
        finally:
            w.watchers -= 1
            if w.watchers <= 0 and self._jobs.get(job_id) is w:
                del self._jobs[job_id]

    async def wait(self, job_id: str, after: int, timeout: float) -> None:
        """Return once the hub has something for a stream that has seen ``after`` (see
        :meth:`JobWatch.moved_past`), or after ``timeout`` seconds."""
        w = self._jobs.get(job_id)
        if w is None or w.moved_past(after):
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(w.changed.wait(), max(0.0, timeout))

    async def aclose(self) -> None:
        """Stop the poller (at application shutdown)."""
        task, self._task = self._task, None
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while self._jobs:
            cursors = {j: (w.cursor if w.known else None) for j, w in self._jobs.items()}
            try:
                found = await anyio.to_thread.run_sync(_poll, self.make_session, cursors)
            except Exception as e:  # noqa: BLE001 - e.g. the database is down: try again at the next tick
                if time.monotonic() - self._warned_at > 60.0:  # at most one line a minute while it lasts
                    self._warned_at = time.monotonic()
                    log.warning(
                        "event hub: poll failed (%s: %s); retrying every %.1f s", type(e).__name__, e, self.poll_seconds
                    )
            else:
                self.polls += 1
                for job_id, (status, events, newest) in found.items():
                    if (w := self._jobs.get(job_id)) is not None:
                        self._apply(w, cursors[job_id] is None, status, events, newest)
            await asyncio.sleep(self.poll_seconds)

    def _apply(self, w: JobWatch, first: bool, status: str | None, events: list[EventModel], newest: int) -> None:
        moved = first or status != w.status or newest > w.cursor
        if first:
            w.start = w.cursor = newest
        if events:
            w.events.extend(events)
            w.cursor = max(w.cursor, events[-1].id)
            if len(w.events) > self.buffer:
                w.start = w.events[-self.buffer - 1].id
                del w.events[: -self.buffer]
        w.status, w.known = status, True  # after the events: a terminal status never shows without its event
        if moved:
            w.changed.set()
            w.changed = asyncio.Event()


def _poll(
    make_session: sessionmaker[Session], cursors: dict[str, int | None]
) -> dict[str, tuple[str | None, list[EventModel], int]]:
    """One poll of the :class:`EventHub`: for each watched job, ``(status, events after its cursor, newest event
    id)``; a job polled for the first time (cursor None) gets no events (its streams read their backlog), a job
    that is gone gets status None.

    Status and newest id come from one statement, the events after it (a later statement, READ COMMITTED): a
    terminal status and its event are committed together, so the events read include it.
    """
    newest = select(func.max(JobEvent.id)).where(JobEvent.job_id == Job.id).scalar_subquery()
    out: dict[str, tuple[str | None, list[EventModel], int]] = {j: (None, [], cursors[j] or 0) for j in cursors}
    with make_session() as s:
        rows = s.execute(select(Job.id, Job.status, newest).where(Job.id.in_(list(cursors)))).all()
        s.commit()  # end the snapshot: the event reads below see commits up to now
        for job_id, status, top in rows:
            top, cursor, events = top or 0, cursors[job_id], []
            while cursor is not None and top > cursor:
                q = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > cursor)
                batch = [event_out(e) for e in s.scalars(q.order_by(JobEvent.id).limit(BATCH))]
                if not batch:
                    break
                events += batch
                cursor = batch[-1].id
            out[job_id] = (status, events, max(top, cursor or 0))
    return out


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

    New events come from the app's :class:`EventHub` (``request.app.state.event_hub``); events older than what
    it holds (the backlog of a new or resumed stream) are read from the database in a worker thread. Stops after
    ``max_seconds`` (the client resumes with ``Last-Event-ID``); a client that disconnects cancels the stream
    (Starlette's :class:`~starlette.responses.StreamingResponse` listens for it). The caller has checked that
    the job exists and is the requesting user's.
    """
    hub: EventHub = request.app.state.event_hub
    yield format_sse_event(comment="rsae job events", retry=RETRY_MS)
    started = last_sent = time.monotonic()
    with hub.watch(job_id) as w:
        while True:
            full = False
            if w.covers(after):
                events, status = w.since(after), w.status
            else:
                events, status = await run_in_threadpool(_read, make_session, job_id, after)
                full = len(events) == BATCH
            for e in events:
                after = e.id
                yield format_sse_event(data_str=e.model_dump_json(), event=e.type, id=str(e.id))
                last_sent = time.monotonic()
            if full:
                continue
            if status is None or status in TERMINAL_STATUSES:
                return  # the terminal status event was among the events just taken (see _read, _poll)
            now = time.monotonic()
            if now - started >= max_seconds:
                return
            if now - last_sent >= KEEPALIVE_SECONDS:
                yield format_sse_event(comment="keepalive")
                last_sent = now
            await hub.wait(job_id, after, min(KEEPALIVE_SECONDS - (now - last_sent), max_seconds - (now - started)))
