"""The per-request cost of authentication (issue 14): the token cache and its revocation bound, the one-round-trip
rate-limit check, and no connection held between the worker-thread hops of a request.

Real Postgres and Redis (db 15); the SQLite cases use a migrated SQLite file. The clock of the token cache is a
fake one where a test needs time to pass, so nothing sleeps.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from pathlib import Path

import anyio
import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import delete

from service.app import create_app
from service.auth import TokenCache, hash_token, revoke_tokens
from service.config import Settings
from service.db import get_sessionmaker
from service.migrate import upgrade
from service.models import ApiToken, User
from service.ratelimit import AuthCheckMemo, RateLimited, RateLimits, token_key
from support.servers import assert_problem, bearer, make_token, queued_job, served


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the cache on its own ---------------------------------------------------------------------------
def test_token_cache_expires_evicts_and_can_be_off() -> None:
    clock = FakeClock()
    cache = TokenCache(5.0, size=2, timer=clock)
    cache.put("a" * 64, User(id="u1", name="alice"))
    hit = cache.get("a" * 64)
    assert hit is not None and (hit.id, hit.name) == ("u1", "alice")
    assert cache.get("b" * 64) is None
    clock.now += 4.9
    assert cache.get("a" * 64) is not None  # reading does not extend the entry's life ...
    clock.now += 0.2
    assert cache.get("a" * 64) is None  # ... which ends 5 s after the lookup that found the token valid
    for key in ("c", "d", "e"):
        cache.put(key * 64, User(id=key, name=key))
    assert cache.get("c" * 64) is None and cache.get("e" * 64) is not None  # size 2: the oldest went
    off = TokenCache(0.0)
    off.put("a" * 64, User(id="u1", name="alice"))
    assert off.get("a" * 64) is None


def test_auth_check_memo_expires_is_voided_by_a_failure_and_can_be_off() -> None:
    """A passed pair is remembered for ``seconds``; a failure of its address or of its token voids it (and a pair
    remembered after that failure is not kept until the failure has aged out); overflowing failures forget all."""
    clock = FakeClock()
    memo = AuthCheckMemo(2.0, size=4, timer=clock)
    memo.remember("192.0.2.1", "t1")
    memo.remember("192.0.2.2", "t2")
    assert memo.passed("192.0.2.1", "t1") and not memo.passed("192.0.2.1", "t2")
    clock.now += 2.1
    assert not memo.passed("192.0.2.1", "t1")  # 2 s after the check that passed
    memo.remember("192.0.2.1", "t1")
    memo.failed("192.0.2.1", "bad")  # same address, another token
    assert not memo.passed("192.0.2.1", "t1")
    memo.remember("192.0.2.1", "t1")  # a check that passed before the failure was counted: not kept
    assert not memo.passed("192.0.2.1", "t1")
    clock.now += 2.1
    memo.remember("192.0.2.1", "t1")  # the failure aged out: checks from here on are fresh
    assert memo.passed("192.0.2.1", "t1")
    memo.failed("198.51.100.9", "t1")  # the token failed elsewhere: void for every address
    assert not memo.passed("192.0.2.1", "t1")
    memo.remember("192.0.2.3", "t3")
    for i in range(3):  # 6 failed keys in a memo of 4: the oldest would be dropped, so every pair goes
        memo.failed(f"203.0.113.{i}", f"x{i}")
    assert not memo.passed("192.0.2.3", "t3")
    off = AuthCheckMemo(0.0)
    off.remember("192.0.2.1", "t1")
    assert not off.passed("192.0.2.1", "t1")


def _evalsha_calls(broker: redis.Redis) -> int:
    return int(broker.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def test_a_remembered_pair_skips_redis_and_another_process_failures_block_it_within_the_bound(
    backend: Settings, broker: redis.Redis
) -> None:
    """The second request of a valid token from one address sends no rate-limit check to Redis; 30 failures of
    that address counted by another API process (another :class:`RateLimits`) block it once the memo's bound
    has passed (``auth_cache_seconds``: 2 s here, on a fake clock), not before; another address is unaffected."""
    url = backend.database_url
    app = create_app(backend)
    clock = FakeClock()
    app.state.token_cache = TokenCache(2.0, timer=clock)
    app.state.rate_limits.auth_memo = AuthCheckMemo(2.0, timer=clock)
    good = make_token(url, "alice")
    job_id = queued_job(url, "alice")
    address = "203.0.113.20"
    client = TestClient(app, client=(address, 1), headers=bearer(good))
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200  # checked, looked up, remembered
    before = _evalsha_calls(broker)
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200
    assert _evalsha_calls(broker) == before  # no round trip to the limiter
    other_process = RateLimits(backend)
    for _ in range(30):
        other_process.auth_failed(address, token_key("Bearer rsae_" + secrets.token_urlsafe(32)))
    clock.now += 1.9
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200  # within the bound: not yet seen here
    clock.now += 0.2
    assert_problem(client.get(f"/v1/jobs/{job_id}"), 429, code="rate_limited", field="Authorization")
    other = TestClient(app, client=("203.0.113.21", 1), headers=bearer(good))
    assert other.get(f"/v1/jobs/{job_id}").status_code == 200


# -- revocation through the API ---------------------------------------------------------------------
def test_a_revoked_token_is_refused_within_the_cache_bound(backend: Settings) -> None:
    """Revoked while remembered: still served until ``auth_cache_seconds`` after its lookup, then 401; a token
    whose row is gone behaves alike. With the cache off, revocation is immediate."""
    url = backend.database_url
    token = make_token(url, "alice")
    job_id = queued_job(url, "alice")
    app = create_app(backend.model_copy(update={"auth_cache_seconds": 2.0}))
    clock = FakeClock()
    app.state.token_cache = TokenCache(2.0, timer=clock)
    with TestClient(app, headers=bearer(token)) as client:
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200  # looked up, remembered
        with get_sessionmaker(url).begin() as s:
            assert revoke_tokens(s, prefix=token[:12]) == 1
        clock.now += 1.9
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200  # within the bound: remembered
        clock.now += 0.2
        body = assert_problem(client.get(f"/v1/jobs/{job_id}"), 401, field="Authorization", code="unauthorized")
        assert "revoked" in body["detail"]
        assert client.get(f"/v1/jobs/{job_id}").status_code == 401  # a refused token is never remembered

        other = make_token(url, "alice")
        assert client.get(f"/v1/jobs/{job_id}", headers=bearer(other)).status_code == 200
        with get_sessionmaker(url).begin() as s:
            s.execute(delete(ApiToken).where(ApiToken.token_hash == hash_token(other)))
        clock.now += 2.1
        assert_problem(client.get(f"/v1/jobs/{job_id}", headers=bearer(other)), 401, code="unauthorized")

    fresh = make_token(url, "alice")
    uncached = create_app(backend.model_copy(update={"auth_cache_seconds": 0.0}))
    with TestClient(uncached, headers=bearer(fresh)) as client:
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200
        with get_sessionmaker(url).begin() as s:
            revoke_tokens(s, prefix=fresh[:12])
        assert_problem(client.get(f"/v1/jobs/{job_id}"), 401, code="unauthorized")


def test_a_remembered_token_from_a_blocked_address_is_still_429(backend: Settings) -> None:
    """The cache spares the lookup, not the auth-failure limit: it is checked before the cache is read."""
    url = backend.database_url
    app = create_app(backend)
    good = make_token(url, "alice")
    attacker = TestClient(app, client=("203.0.113.9", 1))
    assert attacker.get("/v1/jobs", headers=bearer(good)).status_code == 200  # remembered now
    bad = "rsae_" + secrets.token_urlsafe(32)
    assert Counter(attacker.get("/v1/jobs", headers=bearer(bad)).status_code for _ in range(31)) == {401: 30, 429: 1}
    assert_problem(attacker.get("/v1/jobs", headers=bearer(good)), 429, code="rate_limited", field="Authorization")
    assert TestClient(app, client=("203.0.113.10", 1)).get("/v1/jobs", headers=bearer(good)).status_code == 200


# -- the rate-limit check in one round trip ---------------------------------------------------------
def test_pipelined_and_async_checks_agree_and_survive_a_script_flush(settings: Settings, broker: redis.Redis) -> None:
    """``check_auth`` (one pipeline) and ``check_auth_async`` (redis.asyncio) refuse exactly when limits' own
    ``MovingWindowRateLimiter.test`` does, with its Retry-After; both reload the script after SCRIPT FLUSH;
    on an unreachable Redis the async check fails open as the sync one does."""
    limits = RateLimits(settings.model_copy(update={"rate_limit_auth_failures": "3/minute;5/hour"}))
    for _ in range(3):
        limits.check_auth("192.0.2.7", "t1")
        anyio.run(limits.check_auth_async, "192.0.2.7", "t1")
        limits.auth_failed("192.0.2.7", "t1")
    rate = limits.auth_failures[0]
    assert not limits.limiter.test(rate, "auth", "addr", "192.0.2.7")  # the library's own verdict: used up
    expected = limits.limiter.get_window_stats(rate, "auth", "addr", "192.0.2.7").reset_time
    for check in (limits.check_auth, lambda *a: anyio.run(limits.check_auth_async, *a)):
        with pytest.raises(RateLimited) as refused:
            check("192.0.2.7", None)  # the address is used up (3 a minute), whatever the token
        assert abs(int(refused.value.headers["Retry-After"]) - (expected - time.time())) <= 1.5
        with pytest.raises(RateLimited):
            check("192.0.2.99", "t1")  # the token is used up, from anywhere
        check("192.0.2.8", "t2")  # others pass
    broker.script_flush()
    with pytest.raises(RateLimited):
        anyio.run(limits.check_auth_async, "192.0.2.7", "t1")
    broker.script_flush()
    with pytest.raises(RateLimited):
        limits.check_auth("192.0.2.7", "t1")
    down = RateLimits(settings, storage_uri="redis://127.0.0.1:1/0")
    anyio.run(down.check_auth_async, "192.0.2.7", "t1")
    memory = RateLimits(settings.model_copy(update={"broker_url": None}))
    for _ in range(30):
        memory.auth_failed("192.0.2.5", None)
    with pytest.raises(RateLimited):
        anyio.run(memory.check_auth_async, "192.0.2.5", None)


# -- no connection held between hops ----------------------------------------------------------------
async def open_streams(base: str, token: str, job_id: str, n: int, stop: anyio.Event) -> Counter:
    """Send ``n`` event-stream requests at once from one event loop; return the statuses once all have
    answered (the open streams are held until ``stop``)."""
    statuses: Counter = Counter()
    answered = anyio.Semaphore(0, max_value=n)  # type: ignore[call-arg]
    limits = httpx.Limits(max_connections=n + 10)
    async with httpx.AsyncClient(base_url=base, headers=bearer(token), timeout=60, limits=limits) as http:

        async def hold() -> None:
            async with http.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}) as r:
                statuses[r.status_code] += 1
                answered.release()
                await stop.wait()

        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(hold)
            with anyio.fail_after(25):
                for _ in range(n):
                    await answered.acquire()
            result = Counter(statuses)
            stop.set()
    return result


@pytest.mark.parametrize("cache_seconds", [0.0, 5.0])
def test_100_requests_at_once_with_a_new_token_on_sqlite_all_answer(
    settings: Settings, clean_db: None, broker: redis.Redis, tmp_path: Path, cache_seconds: float
) -> None:
    """100 event streams opened at once with a token not yet remembered, on SQLite (30 pooled connections, 40
    worker threads), with the token cache on and off: each authentication used to keep its connection while
    its request waited for its next worker thread, all threads ended up waiting for a connection, and 40
    requests answered 500 after the 30 s pool timeout. Now every stream opens within seconds."""
    url = f"sqlite:///{tmp_path / 'rsae.db'}"
    upgrade(url)
    s = settings.model_copy(
        update={"database_url": url, "max_streams_per_user": 200, "auth_cache_seconds": cache_seconds}
    )
    token = make_token(url, "alice")
    job_id = queued_job(url, "alice")

    async def main(base: str) -> Counter:
        return await open_streams(base, token, job_id, 100, anyio.Event())

    with served(s) as base:
        assert anyio.run(main, base) == {200: 100}
