"""Rate limits on failed authentications, on submissions and on encode requests, by the ``limits`` library.

Three kinds of limits, all configured in ``limits``' string notation (``"30/minute"``, ``"5/second;100/hour"``;
an empty string turns one off) and counted with its moving-window strategy
(:class:`limits.strategies.MovingWindowRateLimiter`, exact: at most N hits in any window of the period):

- **authentication failures** (``rate_limit_auth_failures``), per client address and per presented token:
  every 401 counts; once either counter is full, requests from that address or with that token answer 429
  *before* the token is looked up (no database work for a guesser) until the window frees. A valid token from
  another address is not affected. A valid token that a process has just checked from an address is not
  checked again there for ``auth_cache_seconds`` (:class:`AuthCheckMemo`, sparing a Redis round trip per
  request): failures counted in the same process take effect at once, failures counted by another API process
  within that bound (the bound of a revocation, :class:`service.auth.TokenCache`).
- **submissions** (``POST /jobs``, ``POST /saes``), per API token (``rate_limit_submissions_per_token``) and per
  client address (``rate_limit_submissions_per_address``), counted before the request body is read.
- **encode requests** (``POST /jobs/{id}/encode``, ``POST /saes/{id}/encode``), per user
  (``rate_limit_encode_per_user``), counted once the token is authenticated.

Refusals are 429 problem+json (code ``rate_limited``) with ``Retry-After``: whole seconds until the oldest
counted hit leaves the window. Counters live in Redis at the broker URL when the service has one (shared by
all API processes; keys under ``rsae:ratelimit``), else in process memory. If Redis cannot be reached the
limits fail open (logged): an unreachable limiter must not take the API down with it.

The client address is the ASGI ``client`` host (behind a reverse proxy run uvicorn with ``--proxy-headers``
and ``--forwarded-allow-ips`` so that it is the original client's); IPv6 addresses are bucketed by /64, the
block one host usually holds.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Sequence

import anyio
import anyio.to_thread
import redis.asyncio as aioredis
from cachetools import TTLCache
from fastapi import Request
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage, RedisStorage, Storage, storage_from_string
from limits.strategies import MovingWindowRateLimiter
from redis.exceptions import NoScriptError

from .config import Settings
from .problems import ProblemError

log = logging.getLogger(__name__)

KEY_PREFIX = "rsae:ratelimit"
"""Prefix of the limiter's Redis keys."""
REDIS_TIMEOUT_SECONDS = 1.0
"""Connect and read timeout of the limiter's Redis connection (fail open after it)."""
_WARN_EVERY_SECONDS = 60.0


class RateLimited(ProblemError):
    """429 ``rate_limited`` problem with ``Retry-After`` (RFC 6585 section 4, RFC 9110 section 10.2.3).

    Args:
        detail: what was limited and how to proceed.
        retry_after: seconds until the next attempt may pass (rounded up, at least 1).
        field: the input the limit is keyed on, if any (``Authorization``).
    """

    def __init__(self, detail: str, retry_after: float, *, field: str | None = None) -> None:
        seconds = max(1, math.ceil(retry_after))
        super().__init__(
            429, "rate_limited", detail, field=field, headers={"Retry-After": str(seconds)}, retry_after=seconds
        )


def client_address(request: Request) -> str:
    """The rate-limit key of the request's client: its IPv4 address, its IPv6 /64 network, or the ASGI
    client host as given when it is not an IP address (``"unknown"`` without one)."""
    host = request.client.host if request.client else "unknown"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def token_key(authorization: str | None) -> str | None:
    """The rate-limit key of a presented bearer token: the first 32 hex digits of the SHA-256 of the
    ``Authorization`` header's credentials (never the token itself); None without credentials."""
    if not authorization:
        return None
    credentials = authorization.strip().partition(" ")[2].strip()
    return hashlib.sha256(credentials.encode("utf-8", "replace")).hexdigest()[:32] if credentials else None


class AuthCheckMemo:
    """(client address, token key) pairs whose authentication-failure check passed and whose token proved valid
    in this process within the last ``seconds``: the next requests of the pair skip the check (one Redis round
    trip, about a fifth of an authenticated GET's cost on the API process; issue 14).

    A failure counted by this process (:meth:`failed`) voids at once every remembered pair with its address or
    its token (for ``seconds``, longer than any pair remembered before it lives), so the limit of
    ``test_a_remembered_token_from_a_blocked_address_is_still_429`` holds exactly; failures counted by another
    process take effect here within ``seconds`` (the same bound as a revocation, ``auth_cache_seconds``).

    Args:
        seconds: life of a remembered pair (s); 0 turns the memo off (every request is checked).
        size: most pairs (and most recently failed keys) remembered; when the failed keys overflow, every pair
            is forgotten (never a pair whose failure was dropped).
        timer: the clock (monotonic seconds; tests pass a fake one).
    """

    def __init__(self, seconds: float, size: int = 10_000, timer: Callable[[], float] = time.monotonic) -> None:
        self.seconds = float(seconds)
        on = self.seconds > 0
        self._passed: TTLCache | None = TTLCache(size, self.seconds, timer=timer) if on else None
        self._failed: TTLCache | None = TTLCache(size, self.seconds, timer=timer) if on else None
        self._lock = threading.Lock()

    def passed(self, address: str, token: str | None) -> bool:
        """Whether the pair passed its check within ``seconds`` and no failure of its address or token followed."""
        if self._passed is None or self._failed is None:
            return False
        with self._lock:
            return (
                (address, token) in self._passed
                and ("addr", address) not in self._failed
                and ("token", token) not in self._failed
            )

    def remember(self, address: str, token: str | None) -> None:
        """The pair's check passed and its token is valid (unless a failure of either was counted since)."""
        if self._passed is None or self._failed is None:
            return
        with self._lock:
            if ("addr", address) not in self._failed and ("token", token) not in self._failed:
                self._passed[(address, token)] = True

    def failed(self, address: str, token: str | None) -> None:
        """A failure of ``address`` / ``token`` was counted: check their next requests again."""
        if self._passed is None or self._failed is None:
            return
        with self._lock:
            if len(self._failed) + 2 > self._failed.maxsize:
                self._passed.clear()  # the oldest failures are about to be dropped: forget every pair
            self._failed[("addr", address)] = True
            self._failed[("token", token)] = True


class RateLimits:
    """The API's rate limiter (one per application, ``app.state.rate_limits``).

    Args:
        settings: rates (``rate_limit_*``) and the storage: Redis at ``broker_url`` if set, else memory;
            ``auth_cache_seconds`` is the life of :attr:`auth_memo` (:class:`AuthCheckMemo`).
        storage_uri: overrides the storage (a ``limits`` storage URI such as ``memory://``).
    """

    def __init__(self, settings: Settings, storage_uri: str | None = None) -> None:
        uri = storage_uri or settings.broker_url or "memory://"
        options: dict[str, float | str] = {}
        if uri.startswith(("redis://", "rediss://", "unix://")):
            options = {
                "key_prefix": KEY_PREFIX,
                "socket_connect_timeout": REDIS_TIMEOUT_SECONDS,
                "socket_timeout": REDIS_TIMEOUT_SECONDS,
            }
        self.storage: Storage = storage_from_string(uri, **options)
        self._uri, self._options = uri, options
        self._async_client_of: tuple[weakref.ref[asyncio.AbstractEventLoop], aioredis.Redis] | None = None
        self.limiter = MovingWindowRateLimiter(self.storage)
        self.auth_failures = _rates(settings.rate_limit_auth_failures)
        self.per_token = _rates(settings.rate_limit_submissions_per_token)
        self.per_address = _rates(settings.rate_limit_submissions_per_address)
        self.per_user_encode = _rates(settings.rate_limit_encode_per_user)
        self._warned_at = -math.inf
        self.auth_memo = AuthCheckMemo(settings.auth_cache_seconds, settings.auth_cache_size)

    # -- authentication failures ------------------------------------------------------------------
    def check_auth(self, address: str, token: str | None) -> None:
        """Refuse a request whose address or presented token used up its authentication failures.

        Raises:
            RateLimited: 429 naming ``Authorization``, Retry-After until the oldest failure expires.
        """
        _refuse_auth(self._full(self.auth_failures, "auth", _keys(address, token)))

    async def check_auth_async(self, address: str, token: str | None) -> None:
        """:meth:`check_auth` for the event loop, without blocking it and without a worker thread: on Redis
        one pipelined round trip by ``redis.asyncio`` (a client per event loop, the limiter's URI and
        timeouts); the in-memory storage is read directly (no I/O); other storages in a worker thread.

        Raises:
            RateLimited: as :meth:`check_auth`.
        """
        _refuse_auth(await self._full_async(self.auth_failures, "auth", _keys(address, token)))

    def auth_failed(self, address: str, token: str | None) -> None:
        """Count one failed authentication against ``address`` and ``token`` (and void their
        :attr:`auth_memo` pairs)."""
        self.auth_memo.failed(address, token)
        self._hit(self.auth_failures, "auth", _keys(address, token))

    # -- submissions -------------------------------------------------------------------------------
    def submission(self, address: str, token: str | None) -> None:
        """Count one submission of ``token`` from ``address``; refuse it when a limit is used up.

        Raises:
            RateLimited: 429 with Retry-After until the oldest counted submission leaves the window.
        """
        # Test both before counting either: a request refused by one limit does not use up the other's budget.
        # (The hits themselves are atomic: two racing requests cannot both take the last slot.)
        checks = (
            (self.per_token, [("token", token)] if token else [], "with this token"),
            (self.per_address, [("addr", address)], "from this address"),
        )
        for count in (self._full, self._hit):
            for rates, keys, whose in checks:
                wait = count(rates, "submit", keys)
                if wait is not None:
                    raise RateLimited(
                        f"too many submissions (POST /jobs, POST /saes) {whose}; retry after the time in Retry-After",
                        wait,
                    )

    # -- encoding ------------------------------------------------------------------------------------
    def encode(self, user_id: str) -> None:
        """Count one encode request (``POST .../encode``) of user ``user_id``; refuse it beyond
        ``rate_limit_encode_per_user``.

        Raises:
            RateLimited: 429 with Retry-After until the oldest counted request leaves the window.
        """
        wait = self._hit(self.per_user_encode, "encode", [("user", user_id)])
        if wait is not None:
            raise RateLimited("too many encode requests of yours; retry after the time in Retry-After", wait)

    # -- counting ----------------------------------------------------------------------------------
    def _full(self, rates: Sequence[RateLimitItem], scope: str, keys: Sequence[tuple[str, str]]) -> float | None:
        """Seconds until a used-up (rate, key) frees, without counting a hit; None if none is used up.

        All windows are read in one round trip (:meth:`_windows`), then judged as ``MovingWindowRateLimiter``
        judges them (:func:`_longest_wait`)."""
        pairs = _pairs(rates, scope, keys)
        try:
            windows = self._windows(pairs)
        except Exception as e:  # noqa: BLE001 - storage unreachable: fail open
            self._storage_down(e)
            return None
        return _longest_wait(pairs, windows)

    async def _full_async(
        self, rates: Sequence[RateLimitItem], scope: str, keys: Sequence[tuple[str, str]]
    ) -> float | None:
        """:meth:`_full` for the event loop (see :meth:`check_auth_async`)."""
        pairs = _pairs(rates, scope, keys)
        if not pairs:
            return None
        if isinstance(self.storage, MemoryStorage):
            return self._full(rates, scope, keys)
        if type(self.storage) is not RedisStorage:
            return await anyio.to_thread.run_sync(self._full, rates, scope, keys)
        try:
            client = self._async_client()
            sha, now = self.storage.lua_moving_window.sha, time.time()
            async with client.pipeline(transaction=False) as pipe:
                for rate, key in pairs:
                    pipe.evalsha(sha, 1, self.storage.prefixed_key(key), now - rate.get_expiry(), rate.amount)
                raw = await pipe.execute()
        except NoScriptError:  # Redis lost its scripts: the sync path reloads it
            return await anyio.to_thread.run_sync(self._full, rates, scope, keys)
        except Exception as e:  # noqa: BLE001 - storage unreachable: fail open
            self._storage_down(e)
            return None
        return _longest_wait(pairs, [(float(w[0]), int(w[1])) if w else (now, 0) for w in raw])

    def _async_client(self) -> aioredis.Redis:
        """The ``redis.asyncio`` client of the running event loop: its connections belong to that loop, so a
        new one is made when the loop changes (uvicorn runs one loop; test clients may start several)."""
        loop = asyncio.get_running_loop()
        if self._async_client_of is None or self._async_client_of[0]() is not loop:
            timeouts = {k: v for k, v in self._options.items() if k.startswith("socket_")}
            self._async_client_of = (weakref.ref(loop), aioredis.Redis.from_url(self._uri, **timeouts))
        return self._async_client_of[1]

    def _windows(self, pairs: Sequence[tuple[RateLimitItem, str]]) -> list[tuple[float, int]]:
        """``(start, entries)`` of the moving window of each ``(rate, key)``, as the storage's
        ``get_moving_window`` gives it. On Redis, one pipeline of limits' own moving-window script (its
        ``lua_moving_window``, the script ``get_moving_window`` runs) for all pairs: one round trip, not one each.
        """
        storage = self.storage
        if type(storage) is RedisStorage and len(pairs) > 1:
            now = time.time()
            pipe = storage.get_connection().pipeline(transaction=False)
            sha = storage.lua_moving_window.sha
            for rate, key in pairs:  # EVALSHA itself: a Script run in a pipeline asks SCRIPT EXISTS first
                pipe.evalsha(sha, 1, storage.prefixed_key(key), now - rate.get_expiry(), rate.amount)
            try:
                return [(float(w[0]), int(w[1])) if w else (now, 0) for w in pipe.execute()]
            except NoScriptError:  # Redis lost its scripts (restart, SCRIPT FLUSH): the calls below reload it
                pass
        return [storage.get_moving_window(key, rate.amount, rate.get_expiry()) for rate, key in pairs]

    def _hit(self, rates: Sequence[RateLimitItem], scope: str, keys: Sequence[tuple[str, str]]) -> float | None:
        """Count a hit on every (rate, key); seconds until the longest refused one frees, None if all passed."""
        waits = []
        try:
            for kind, key in keys:
                for rate in rates:
                    if not self.limiter.hit(rate, scope, kind, key):
                        waits.append(self.limiter.get_window_stats(rate, scope, kind, key).reset_time - time.time())
        except Exception as e:  # noqa: BLE001 - storage unreachable: fail open
            self._storage_down(e)
            return None
        return max(waits) if waits else None

    def _storage_down(self, e: Exception) -> None:
        now = time.monotonic()
        if now - self._warned_at > _WARN_EVERY_SECONDS:
            self._warned_at = now
            log.warning("rate limiter storage unreachable (%s: %s); limits are not enforced", type(e).__name__, e)


def _refuse_auth(wait: float | None) -> None:
    if wait is not None:
        raise RateLimited(
            "too many failed authentications from this address or with this token; wait and retry with a "
            "valid token (create one with 'rsae-service token create --user NAME')",
            wait,
            field="Authorization",
        )


def _pairs(
    rates: Sequence[RateLimitItem], scope: str, keys: Sequence[tuple[str, str]]
) -> list[tuple[RateLimitItem, str]]:
    return [(rate, rate.key_for(scope, kind, key)) for kind, key in keys for rate in rates]


def _longest_wait(pairs: Sequence[tuple[RateLimitItem, str]], windows: Sequence[tuple[float, int]]) -> float | None:
    """Seconds until the last used-up window of ``pairs`` frees (None if none is used up): a moving window
    holding ``amount`` entries is used up (``MovingWindowRateLimiter.test``) and frees ``expiry`` after its
    oldest entry (``get_window_stats``)."""
    now = time.time()
    waits = [
        start + rate.get_expiry() - now
        for (rate, _), (start, count) in zip(pairs, windows, strict=True)
        if count > rate.amount - 1
    ]
    return max(waits) if waits else None


def _rates(spec: str) -> list[RateLimitItem]:
    return parse_many(spec) if spec else []


def _keys(address: str, token: str | None) -> list[tuple[str, str]]:
    return [("addr", address)] + ([("token", token)] if token else [])
