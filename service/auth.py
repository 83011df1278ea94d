"""Bearer API tokens: creation (CLI), hashed storage, and the FastAPI dependency that authenticates a request.

A token is ``rsae_`` + 43 URL-safe base64 characters (32 random bytes from :mod:`secrets`). Only its SHA-256
is stored (``api_tokens.token_hash``): a token has 256 bits of entropy, so a fast hash is enough (a slow
password hash such as bcrypt defends low-entropy secrets, which these are not), and lookup by hash is one
indexed query. The first characters (``prefix``) identify a token in listings and revocation. The scheme
follows RFC 6750 (``Authorization: Bearer <token>``; a missing or bad token answers 401 with
``WWW-Authenticate: Bearer``).

Each API process remembers the tokens it has found valid for ``RSAE_AUTH_CACHE_SECONDS`` (default 5 s;
:class:`TokenCache`, keyed by the token's SHA-256, never the token), so a client polling a job costs one token
lookup per 5 s instead of one per request. The price is a bound on revocation: a token revoked (or whose user
is deleted) keeps working for at most that long in a process that saw it just before; unknown, malformed and
revoked tokens are never remembered (each failure is looked up and counted by the rate limiter).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

from cachetools import TTLCache
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .db import SessionDep, run_in_session
from .models import ApiToken, User, utcnow
from .problems import ProblemError
from .ratelimit import client_address, token_key

TOKEN_PREFIX = "rsae_"
"""Every token starts with this (lets secret scanners recognise leaked tokens)."""
PREFIX_CHARS = 12
"""Characters of a token kept in clear (``prefix``) to name it in listings: ``rsae_`` + 7."""
USER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")
"""Allowed user names: 1-100 characters, letters, digits and ``._@-``, not starting with punctuation."""
_TOKEN_RE = re.compile(rf"^{TOKEN_PREFIX}[A-Za-z0-9_-]{{43}}$")
LAST_USED_RESOLUTION = timedelta(minutes=1)
"""``last_used_at`` is rewritten at most this often per token (saves a write per request)."""


class AuthError(ProblemError):
    """401 problem with ``WWW-Authenticate: Bearer`` (RFC 6750 section 3)."""

    def __init__(self, detail: str, error: str = "invalid_token") -> None:
        super().__init__(
            401,
            "unauthorized",
            detail,
            field="Authorization",
            headers={"WWW-Authenticate": f'Bearer realm="rsae", error="{error}"'},
        )


def hash_token(token: str) -> str:
    """SHA-256 hex digest (64 characters) of ``token``: the only form in which tokens are stored."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def generate_token() -> str:
    """A new random token: ``rsae_`` + 43 URL-safe base64 characters (32 bytes from :func:`secrets.token_urlsafe`)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class IssuedToken:
    """A token just created: the secret (shown once, never stored) and its row's id, prefix and user."""

    token: str
    token_id: str
    prefix: str
    user_id: str
    user_name: str


def get_or_create_user(session: Session, name: str) -> User:
    """The user called ``name``, created if missing (flushes, does not commit).

    Raises:
        ValueError: ``name`` does not match :data:`USER_NAME_RE`.
    """
    if not USER_NAME_RE.match(name):
        raise ValueError(
            f"invalid user name {name!r}: 1-100 letters, digits or '._@-', starting with a letter or digit"
        )
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        user = User(name=name, created_at=utcnow())
        session.add(user)
        session.flush()
    return user


def issue_token(session: Session, user_name: str, label: str | None = None) -> IssuedToken:
    """Create a token for ``user_name`` (creating the user if needed). Flushes; the caller commits.

    Raises:
        ValueError: invalid user name, or a label longer than 100 characters.
    """
    if label is not None and len(label) > 100:
        raise ValueError("token label must be at most 100 characters")
    user = get_or_create_user(session, user_name)
    token = generate_token()
    row = ApiToken(
        user_id=user.id, name=label, prefix=token[:PREFIX_CHARS], token_hash=hash_token(token), created_at=utcnow()
    )
    session.add(row)
    session.flush()
    return IssuedToken(token=token, token_id=row.id, prefix=row.prefix, user_id=user.id, user_name=user.name)


def revoke_tokens(session: Session, *, prefix: str | None = None, user_name: str | None = None) -> int:
    """Revoke the live tokens matching ``prefix`` (a token's first characters) and/or ``user_name``.

    Returns:
        How many tokens were revoked (0 if none matched). Flushes; the caller commits.

    Raises:
        ValueError: neither filter given.
    """
    if prefix is None and user_name is None:
        raise ValueError("give a token prefix or a user name")
    q = update(ApiToken).where(ApiToken.revoked_at.is_(None)).values(revoked_at=utcnow())
    if prefix is not None:
        q = q.where(ApiToken.prefix == prefix[:PREFIX_CHARS])
    if user_name is not None:
        q = q.where(ApiToken.user_id.in_(select(User.id).where(User.name == user_name)))
    return session.execute(q, execution_options={"synchronize_session": False}).rowcount


class TokenCache:
    """Valid tokens one process has just looked up: SHA-256 digest of the token -> its user's id and name.

    A :class:`cachetools.TTLCache` under a lock (requests are served by several threads): an entry expires
    ``seconds`` after the database lookup that found the token valid (reading it does not extend it), so a
    revocation is honoured within ``seconds``; beyond ``size`` entries the least recently used go first.

    Args:
        seconds: life of an entry (s); 0 turns the cache off (every :meth:`get` misses).
        size: most entries.
        timer: the clock (monotonic seconds; tests pass a fake one).
    """

    def __init__(self, seconds: float, size: int = 10_000, timer: Callable[[], float] = time.monotonic) -> None:
        self.seconds = float(seconds)
        self._entries: TTLCache[str, tuple[str, str]] | None = (
            TTLCache(maxsize=size, ttl=self.seconds, timer=timer) if self.seconds > 0 else None
        )
        self._lock = threading.Lock()

    def get(self, digest: str) -> User | None:
        """A new detached :class:`User` (id and name) for the token hashed to ``digest``; None if not remembered."""
        if self._entries is None:
            return None
        with self._lock:
            hit = self._entries.get(digest)
        return None if hit is None else User(id=hit[0], name=hit[1])

    def put(self, digest: str, user: User) -> None:
        """Remember that the token hashed to ``digest`` belongs to ``user`` (for :attr:`seconds` from now)."""
        if self._entries is not None:
            with self._lock:
                self._entries[digest] = (user.id, user.name)

    def clear(self) -> None:
        """Forget every token."""
        if self._entries is not None:
            with self._lock:
                self._entries.clear()


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header value, checked for form only (no lookup).

    Raises:
        AuthError: header missing, not ``Bearer <token>``, or a token not of the form ``rsae_`` + 43 characters.
    """
    if not authorization:
        raise AuthError(
            "missing 'Authorization: Bearer <token>' header (create a token with "
            "'rsae-service token create --user NAME')",
            error="invalid_request",
        )
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("the Authorization header must be 'Bearer <token>'", error="invalid_request")
    if not _TOKEN_RE.match(token):
        raise AuthError("malformed API token")
    return token


def authenticate(session: Session, authorization: str | None, cache: TokenCache | None = None) -> User:
    """The user owning the bearer token in the ``Authorization`` header value.

    With ``cache``, a token found there is not looked up (the user returned is then a detached object with
    ``id`` and ``name`` only); a token found valid in the database is put there. ``last_used_at`` is written
    only when it is older than :data:`LAST_USED_RESOLUTION`.

    Raises:
        AuthError: header missing, not ``Bearer <token>``, malformed token, unknown or revoked token.
    """
    digest = hash_token(bearer_token(authorization))
    if cache is not None and (user := cache.get(digest)) is not None:
        return user
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == digest))
    # compare_digest: the lookup is by hash already; this keeps the final check constant-time.
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        raise AuthError("unknown API token")
    if row.revoked_at is not None:
        raise AuthError("this API token was revoked")
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
        session.execute(update(ApiToken).where(ApiToken.id == row.id).values(last_used_at=now))
        session.commit()
    user = session.get(User, row.user_id)
    assert user is not None  # FK with ON DELETE CASCADE: a token never outlives its user
    if cache is not None:
        cache.put(digest, user)
    return user


async def current_user(request: Request, session: SessionDep) -> User:
    """FastAPI dependency: the authenticated user of the request.

    Failed authentications are rate-limited per client address and per presented token
    (:class:`service.ratelimit.RateLimits`, ``rate_limit_auth_failures``): once either has used up its
    failures, the request is refused before the token is looked up (also when the token is valid and
    remembered by the app's :class:`TokenCache`, ``app.state.token_cache``, which spares the lookup).

    ``async`` on purpose: a request whose token is remembered is authenticated on the event loop, without the
    worker-thread hop FastAPI gives a sync dependency, and, when the same address presented the same valid token
    within ``auth_cache_seconds`` (:class:`service.ratelimit.AuthCheckMemo`), without the rate limit's Redis
    round trip either (otherwise one non-blocking round trip,
    :meth:`~service.ratelimit.RateLimits.check_auth_async`). Only a lookup in the database (a token not
    remembered) and the counting of a failure run in a worker thread. The lookup ends its transaction before
    returning (:func:`service.db.run_in_session`): a connection held while the request waits for its next
    worker thread can deadlock a full thread pool against a full connection pool (100 event streams opened at
    once on SQLite did: 40 requests answered 500 after the 30 s pool timeout).

    Raises:
        AuthError: 401 (see :func:`authenticate`); the failure is counted.
        service.ratelimit.RateLimited: 429 with Retry-After while the address or token is over its limit.
    """
    authorization = request.headers.get("authorization")
    limits = request.app.state.rate_limits
    cache: TokenCache | None = getattr(request.app.state, "token_cache", None)
    address, token = client_address(request), token_key(authorization)
    digest: str | None = None
    with contextlib.suppress(AuthError):  # a bad header is refused below, after the limit's check
        digest = hash_token(bearer_token(authorization))
    user = cache.get(digest) if cache is not None and digest is not None else None
    if user is not None and limits.auth_memo.passed(address, token):
        return user
    await limits.check_auth_async(address, token)
    try:
        if digest is None:
            bearer_token(authorization)  # raises its AuthError
        if user is None:  # look it up, and end the transaction in the same hop: no connection held meanwhile
            user = await run_in_session(session, authenticate, session, authorization, cache)
    except AuthError:
        await run_in_threadpool(limits.auth_failed, address, token)
        raise
    limits.auth_memo.remember(address, token)
    return user


UserDep = Annotated[User, Depends(current_user)]
"""The authenticated :class:`~service.models.User` of a request."""
