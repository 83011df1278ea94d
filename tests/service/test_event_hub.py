"""The shared poller of event streams (:class:`service.events.EventHub`, issue 14): one query per poll for every
open stream, events read once and handed to each stream, the terminal status never ahead of its event, streams
behind the buffer served from the database; and, over HTTP, many streams of one job all get every event and end.

Real Postgres and SQLite (the ``backend`` fixture), real uvicorn for the HTTP case; nothing is timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db import get_sessionmaker
from service.events import EventHub
from service.jobs import add_event, transition
from service.models import Job
from support.servers import bearer, make_token, queued_job, served


def progress(make: sessionmaker[Session], job_id: str, n: int) -> None:
    """Append ``n`` progress events to the job (one commit)."""
    with make.begin() as s:
        for i in range(n):
            add_event(s, job_id, "progress", {"stage": "finetune", "progress": i / max(n, 1)})


class Statements:
    """Counts the SQL statements an engine executes while in the ``with`` block."""

    def __init__(self, make: sessionmaker[Session]) -> None:
        self.engine = make.kw["bind"]
        self.n = 0

    def _count(self, *_a: object, **_kw: object) -> None:
        self.n += 1

    def __enter__(self) -> "Statements":
        event.listen(self.engine, "before_cursor_execute", self._count)
        return self

    def __exit__(self, *_exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._count)


async def _poll_until(hub: EventHub, done: int) -> None:
    while hub.polls < done:
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("watchers", [1, 100])
def test_one_poll_serves_every_stream_with_statements_independent_of_their_number(
    backend: Settings, watchers: int
) -> None:
    """With 1 or 100 streams watching two jobs: each poll is one statement (plus one read per job that has new
    events), so 100 streams cost what 1 costs; every watcher sees the new events in order and the terminal
    status only with its event."""
    url = backend.database_url
    make = get_sessionmaker(url)
    jobs = [queued_job(url), queued_job(url)]
    hub = EventHub(make, poll_seconds=0.0)

    async def main() -> tuple[tuple[int, int], tuple[int, int], list[list[int]], list[str | None]]:
        with contextlib.ExitStack() as stack:
            states = [stack.enter_context(hub.watch(jobs[i % 2])) for i in range(watchers)]
            await _poll_until(hub, 1)  # first poll: the jobs become known (cursor = newest event)
            start = [w.cursor for w in states]
            with Statements(make) as quiet:
                polls = hub.polls
                await _poll_until(hub, polls + 5)
                quiet_polls = hub.polls - polls
            progress(make, jobs[0], 3)
            with make.begin() as s:
                transition(s, jobs[0], {"queued"}, "cancelled")
            with Statements(make) as busy:
                polls = hub.polls
                while hub.state(jobs[0]).status != "cancelled":
                    await asyncio.sleep(0.005)
                busy_polls = hub.polls - polls
            seen = [[e.id for e in w.since(start[i])] for i, w in enumerate(states)]
            statuses = [w.status for w in states]
            return (quiet.n, quiet_polls), (busy.n, busy_polls), seen, statuses

    (quiet, quiet_polls), (busy, busy_polls), seen, statuses = asyncio.run(main())
    # one statement per poll whatever the number of watchers (+-1: a poll in flight when counting began or ended)
    assert quiet_polls - 1 <= quiet <= quiet_polls + 1
    # plus one read of jobs[0]'s new events (two if the status change came a poll after its first events)
    assert busy <= busy_polls + 1 + 2 and quiet_polls >= 5
    first = seen[0]
    assert len(first) == 4 and first == sorted(first)  # 3 progress events + the status event
    assert all(s == first for s in seen[::2]) and all(s == [] for s in seen[1::2])
    assert statuses[::2] == ["cancelled"] * len(statuses[::2]) and set(statuses[1::2]) <= {"queued"}


def test_the_buffer_keeps_the_newest_events_and_a_deleted_job_ends(backend: Settings) -> None:
    """Beyond ``buffer`` events the oldest leave and ``start`` moves (a stream behind it reads the database);
    a job deleted while watched gets status None (its streams end)."""
    url = backend.database_url
    make = get_sessionmaker(url)
    job = queued_job(url)
    hub = EventHub(make, poll_seconds=0.0, buffer=5)

    async def main() -> tuple[int, int, list[int], bool, str | None]:
        with hub.watch(job) as w:
            await _poll_until(hub, 1)
            first = w.cursor
            progress(make, job, 12)
            while w.cursor < first + 12:
                await asyncio.sleep(0.005)
            ids = [e.id for e in w.since(0)]
            covers_old = w.covers(first)
            with make.begin() as s:
                s.delete(s.get(Job, job))
            while w.status is not None:
                await asyncio.sleep(0.005)
            return first, w.start, ids, covers_old, w.status

    first, start, ids, covers_old, status = asyncio.run(main())
    assert ids == list(range(first + 8, first + 13)) and start == first + 7
    assert not covers_old  # a stream at ``first`` must read the database
    assert status is None


def test_many_streams_over_http_get_every_event_and_end(backend: Settings) -> None:
    """20 streams of one job (and 1 resuming with Last-Event-ID) under uvicorn: events committed while they are
    open reach each of them, in order, once; the terminal status event ends every stream."""
    url = backend.database_url
    token = make_token(url)
    job = queued_job(url)
    make = get_sessionmaker(url)
    progress(make, job, 2)
    with make() as s:
        backlog = [e["id"] for e in _events(s, job)]
    got: dict[int, list[int]] = {}
    opened = threading.Semaphore(0)

    def hold(i: int, base: str, last: int | None) -> None:
        headers = {**bearer(token), "Accept": "text/event-stream"}
        if last is not None:
            headers["Last-Event-ID"] = str(last)
        ids: list[int] = []
        try:
            with httpx.stream("GET", f"{base}/v1/jobs/{job}/events", headers=headers, timeout=60) as r:
                lines = r.iter_lines()
                ids.append(r.status_code)
                opened.release()
                for line in lines:
                    if line.startswith("id: "):
                        ids.append(int(line[4:]))
        finally:
            opened.release()
            got[i] = ids

    with served(backend.model_copy(update={"max_streams_per_user": 32})) as base:
        threads = [threading.Thread(target=hold, args=(i, base, None)) for i in range(20)]
        threads.append(threading.Thread(target=hold, args=(20, base, backlog[0])))
        for t in threads:
            t.start()
        for _ in threads:
            assert opened.acquire(timeout=60)
        progress(make, job, 3)
        with make.begin() as s:
            transition(s, job, {"queued"}, "cancelled")
        for t in threads:
            t.join(timeout=60)
            assert not t.is_alive(), "a stream did not end after the terminal status"
    with make() as s:
        every = [e["id"] for e in _events(s, job)]
    assert len(every) == 2 + 3 + 1
    assert all(got[i] == [200, *every] for i in range(20))
    assert got[20] == [200, *every[1:]]


def _events(s: Session, job: str) -> Iterator[dict]:
    from service.models import JobEvent

    for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job).order_by(JobEvent.id)):
        yield json.loads(json.dumps({"id": e.id, "type": e.type}))
