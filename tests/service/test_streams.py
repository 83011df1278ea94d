"""Event streams are bounded: no database connection held between polls, a per-user cap, a maximum life.

A real uvicorn serves the app (TestClient cannot hold streams open concurrently) on the test Postgres, with
a deliberately small SQL pool, so that streams holding connections would starve every other route.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from support.servers import assert_problem, bearer, job_body, served

SSE = {"Accept": "text/event-stream"}


class Streams:
    """Event streams held open by threads until :meth:`close`."""

    def __init__(self, http: httpx.Client, url: str) -> None:
        self.http, self.url = http, url
        self.stop = threading.Event()
        self.statuses: list[int] = []
        self.opened = threading.Semaphore(0)
        self.threads: list[threading.Thread] = []

    def _hold(self) -> None:
        with self.http.stream("GET", self.url, headers=SSE) as r:
            self.statuses.append(r.status_code)
            chunks = r.iter_raw()  # kept referenced: a dropped iterator closes the connection
            next(chunks)  # the stream's first bytes: it is open
            self.opened.release()
            self.stop.wait()

    def open(self, n: int, timeout: float = 60) -> None:
        """Open ``n`` more streams and wait until each has sent its first bytes."""
        for _ in range(n):
            t = threading.Thread(target=self._hold, daemon=True)
            t.start()
            self.threads.append(t)
        for _ in range(n):
            assert self.opened.acquire(timeout=timeout), "a stream did not open"

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


@pytest.fixture
def queued_job(client: TestClient, sae_id: str) -> str:
    """A job that stays queued (no worker runs in these tests): its event stream never ends by itself."""
    r = client.post("/v1/jobs", json=job_body(sae_id))
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_100_open_streams_leave_the_other_routes_working(settings: Settings, api_token: str, queued_job: str):
    """100 streams on a pool of 5 + 5 connections: job reads still answer 200 at once, no 5xx; the 101st
    stream of the same user is a 429 with Retry-After; closed streams give their slots back."""
    small = settings.model_copy(update={"db_pool_size": 5, "db_max_overflow": 5, "max_streams_per_user": 100})
    with served(small) as base:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        with httpx.Client(base_url=base, headers=bearer(api_token), timeout=20, limits=limits) as http:
            streams = Streams(http, f"/v1/jobs/{queued_job}/events")
            try:
                for _ in range(10):  # 10 at a time: the point is open streams, not a burst of 100 requests
                    streams.open(10)
                assert streams.statuses == [200] * 100
                for _ in range(20):
                    t0 = time.monotonic()
                    assert http.get(f"/v1/jobs/{queued_job}").status_code == 200
                    assert http.get("/v1/jobs").status_code == 200
                    assert time.monotonic() - t0 < 5
                r = http.get(f"/v1/jobs/{queued_job}/events", headers=SSE)
                body = assert_problem(r, 429, code="too_many_streams")
                assert int(r.headers["Retry-After"]) > 0 and "100" in body["detail"]
            finally:
                streams.close()
            deadline = time.monotonic() + 20  # the server notices the closed connections at its next poll
            while True:
                with http.stream("GET", f"/v1/jobs/{queued_job}/events", headers=SSE) as r:
                    if r.status_code == 200:
                        break
                assert time.monotonic() < deadline, "slots were not given back"
                time.sleep(0.5)


def test_a_stream_ends_after_its_maximum_life(settings: Settings, api_token: str, queued_job: str):
    """With ``stream_max_seconds`` = 1 the stream of a job that never ends closes by itself; the slot is
    freed, so a user at a cap of 1 can open the next one."""
    short = settings.model_copy(update={"stream_max_seconds": 1.0, "max_streams_per_user": 1})
    with served(short) as base, httpx.Client(base_url=base, headers=bearer(api_token), timeout=20) as http:
        for _ in range(2):
            t0 = time.monotonic()
            r = http.get(f"/v1/jobs/{queued_job}/events", headers=SSE)  # reads the whole stream: it must end
            assert r.status_code == 200 and r.text.startswith(": rsae job events")
            assert time.monotonic() - t0 < 10


def test_last_event_id_must_be_ascii_digits(client: TestClient, queued_job: str):
    """A non-ASCII digit (``²``) is a 422 naming the header, not a 500."""
    r = client.get(f"/v1/jobs/{queued_job}/events", headers={**SSE, "Last-Event-ID": "²".encode("latin-1")})
    assert_problem(r, 422, field="Last-Event-ID")
