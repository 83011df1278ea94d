"""Locust user of benchmark 5 (``bench/api_load.py`` runs it; not meant to be imported elsewhere: importing
locust monkey-patches the standard library with gevent).

Every simulated user sends one kind of request, configured by environment variables that ``api_load.py`` sets:

- ``BENCH_METHOD`` (``GET``/``POST``), ``BENCH_PATH``, ``BENCH_BODY`` (JSON body for POST, optional),
  ``BENCH_TOKEN`` (bearer token, optional), ``BENCH_EXPECT`` (the expected status code);
- ``BENCH_USER_RATE``: requests per second per user (locust's ``constant_throughput``: a user waits what is
  left of 1/rate after each response); ``0`` sends back to back (a saturation run);
- ``BENCH_OUT``: where to write the raw samples as JSON when locust quits: ``[[start, latency_ms, status,
  error], ...]`` (``start`` is the Unix time the request was sent, ``error`` null or the exception's text).

Locust's own statistics round response times above 100 ms; the raw samples let ``api_load.py`` compute exact
percentiles and drop the ramp-up.
"""

from __future__ import annotations

import json
import os

from locust import constant, constant_throughput, events, task
from locust.contrib.fasthttp import FastHttpUser

METHOD = os.environ.get("BENCH_METHOD", "GET")
PATH = os.environ.get("BENCH_PATH", "/healthz")
BODY = os.environ.get("BENCH_BODY") or None
TOKEN = os.environ.get("BENCH_TOKEN") or None
EXPECT = int(os.environ.get("BENCH_EXPECT", "200"))
USER_RATE = float(os.environ.get("BENCH_USER_RATE", "0"))
OUT = os.environ.get("BENCH_OUT")

HEADERS = {"Authorization": f"Bearer {TOKEN}"} if TOKEN else {}
if BODY is not None:
    HEADERS["Content-Type"] = "application/json"
SAMPLES: list[list] = []


@events.request.add_listener
def _record(start_time: float, response_time: float, response, exception, **_kw) -> None:  # noqa: ANN001
    status = getattr(response, "status_code", None) if response is not None else None
    SAMPLES.append([start_time, response_time, status, None if exception is None else str(exception)[:200]])


@events.quitting.add_listener
def _write(**_kw) -> None:  # noqa: ANN003
    if OUT:
        with open(OUT, "w") as f:
            json.dump(SAMPLES, f)


class ApiUser(FastHttpUser):
    """One client connection (kept alive) sending ``METHOD PATH`` at ``USER_RATE`` per second."""

    wait_time = constant_throughput(USER_RATE) if USER_RATE > 0 else constant(0)

    @task
    def request(self) -> None:
        """Send the configured request; a status other than ``BENCH_EXPECT`` counts as an error."""
        with self.client.request(METHOD, PATH, data=BODY, headers=HEADERS, catch_response=True) as r:
            if r.status_code != EXPECT:
                r.failure(f"status {r.status_code}")
