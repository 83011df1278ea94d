"""Engine and session factory (SQLAlchemy 2, sync sessions), the database clock (:class:`db_now`) and the
FastAPI ``SessionDep`` dependency.

Every connection is bounded in time (:class:`DbTimeouts`, from the ``RSAE_DB_*`` settings): on Postgres a
connect timeout, a server-side ``statement_timeout`` and TCP keepalives plus ``tcp_user_timeout`` (libpq
parameters, https://www.postgresql.org/docs/current/libpq-connect.html), so a query on a dead socket fails
within about a minute instead of hanging (a lease heartbeat must never hang); on SQLite a busy timeout.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import Depends, Request
from sqlalchemy import Engine, Float, create_engine, event, func, literal
from sqlalchemy.engine import make_url
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.functions import FunctionElement

from .models import UTCDateTime

if TYPE_CHECKING:
    from .config import Settings

T = TypeVar("T")


@dataclass(frozen=True)
class DbTimeouts:
    """Time bounds of every database connection (defaults: those of :class:`service.config.Settings`).

    Attributes:
        connect_s: Postgres ``connect_timeout`` (s; libpq rounds to whole seconds, at least 2).
        statement_s: Postgres ``statement_timeout`` (s) set per connection via ``options``; 0 turns it off
            (migrations, which may rewrite large tables).
        keepalives_idle_s, keepalives_interval_s, keepalives_count: TCP keepalive probes (libpq
            ``keepalives_*``): a silent peer is declared dead after idle + interval * count seconds; the
            same bound is the ``tcp_user_timeout`` for unacknowledged writes.
        busy_s: SQLite ``busy_timeout`` (s): how long a writer waits for the lock before "database is locked".
    """

    connect_s: float = 10.0
    statement_s: float = 60.0
    keepalives_idle_s: int = 30
    keepalives_interval_s: int = 10
    keepalives_count: int = 3
    busy_s: float = 10.0

    @classmethod
    def from_settings(cls, settings: "Settings") -> "DbTimeouts":
        """The bounds named by ``settings`` (``RSAE_DB_CONNECT_TIMEOUT_SECONDS`` ...)."""
        return cls(
            connect_s=settings.db_connect_timeout_seconds,
            statement_s=settings.db_statement_timeout_seconds,
            keepalives_idle_s=settings.db_keepalives_idle_seconds,
            keepalives_interval_s=settings.db_keepalives_interval_seconds,
            keepalives_count=settings.db_keepalives_count,
            busy_s=settings.db_busy_timeout_seconds,
        )

    def postgres_connect_args(self) -> dict[str, Any]:
        """libpq connection parameters (psycopg ``connect()`` keywords) for these bounds."""
        dead_after_ms = 1000 * (self.keepalives_idle_s + self.keepalives_interval_s * self.keepalives_count)
        return {
            "connect_timeout": max(2, math.ceil(self.connect_s)),
            "keepalives": 1,
            "keepalives_idle": self.keepalives_idle_s,
            "keepalives_interval": self.keepalives_interval_s,
            "keepalives_count": self.keepalives_count,
            "tcp_user_timeout": dead_after_ms,
            "options": f"-c statement_timeout={round(self.statement_s * 1000)}",
        }


def _sqlite_pragmas(busy_ms: int) -> Any:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        # WAL lets the API read while the worker writes; busy_timeout waits for a writer instead of failing.
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return on_connect


def make_engine(url: str, *, pool_size: int = 5, max_overflow: int = 10, timeouts: DbTimeouts | None = None) -> Engine:
    """A new engine for ``url`` with ``pool_pre_ping`` and a pool of ``pool_size`` connections plus up to
    ``max_overflow`` more (SQLAlchemy's defaults are 5 and 10), every connection bounded by ``timeouts``
    (default :class:`DbTimeouts`). SQLite files also get WAL, the busy timeout and foreign keys; an in-memory
    SQLite keeps SQLAlchemy's single-connection pool."""
    timeouts = timeouts or DbTimeouts()
    u = make_url(url)
    pool = {"pool_size": pool_size, "max_overflow": max_overflow}
    if u.get_backend_name() != "sqlite":
        args = timeouts.postgres_connect_args() if u.get_backend_name() == "postgresql" else {}
        return create_engine(url, pool_pre_ping=True, connect_args=args, **pool)
    if not u.database or u.database == ":memory:":
        pool = {}
    else:
        Path(u.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url, pool_pre_ping=True, connect_args={"check_same_thread": False, "timeout": timeouts.busy_s}, **pool
    )
    event.listen(engine, "connect", _sqlite_pragmas(round(timeouts.busy_s * 1000)))
    return engine


def lock_for_write(session: Session) -> None:
    """Begin ``session``'s next transaction holding the database's write lock on SQLite, so that what it
    reads (e.g. a count checked against a quota) cannot change before it commits.

    SQLite ignores ``SELECT ... FOR UPDATE`` and pysqlite begins a transaction only at the first write, so
    two transactions may both count and both insert. ``BEGIN IMMEDIATE`` takes the write lock at once
    (waiting up to the busy timeout for other writers), as in SQLAlchemy's documented pysqlite transaction
    recipe ("Serializable isolation / Savepoints / Transactional DDL") and SQLite's ``BEGIN`` documentation.
    On other databases nothing is done here: lock the rows (``with_for_update()``) instead.

    Call it right after ``session.commit()`` or ``rollback()`` (no write pending); the lock is released by
    the next commit or rollback.

    Raises:
        RuntimeError: the SQLite connection is already inside a transaction.
        sqlalchemy.exc.OperationalError: "database is locked" after the busy timeout.
    """
    conn = session.connection()
    if conn.dialect.name != "sqlite":
        return
    if conn.connection.dbapi_connection.in_transaction:
        raise RuntimeError("lock_for_write: the session has a transaction with writes in progress; commit first")
    conn.exec_driver_sql("BEGIN IMMEDIATE")


@lru_cache
def get_engine(url: str, timeouts: DbTimeouts | None = None) -> Engine:
    """The process-wide engine for ``url`` and ``timeouts`` (created on first use, i.e. after any fork)."""
    return make_engine(url, timeouts=timeouts)


@lru_cache
def get_sessionmaker(url: str, timeouts: DbTimeouts | None = None) -> sessionmaker[Session]:
    """The process-wide session factory for ``url`` (connections bounded by ``timeouts``, default
    :class:`DbTimeouts`); objects stay readable after commit."""
    return sessionmaker(get_engine(url, timeouts), expire_on_commit=False)


class db_now(FunctionElement):  # noqa: N801 - reads as a SQL function, like sqlalchemy.func.now
    """The database server's current time plus ``seconds``, as a SQL expression of type
    :class:`service.models.UTCDateTime`: leases and deadlines are computed by one clock (the database's),
    never by the workers' own clocks.

    Postgres: ``now() + make_interval(secs => seconds)`` (``now()`` is the transaction's start time; our
    transactions are short). SQLite: ``strftime('%Y-%m-%d %H:%M:%f', julianday('now') + seconds / 86400.0)
    || '000'``, exactly the text layout (milliseconds, then ``000``) SQLAlchemy stores datetimes in there, so
    comparisons with stored values hold.

    Args:
        seconds: offset in seconds (may be negative or fractional).
    """

    type = UTCDateTime()
    inherit_cache = True
    name = "db_now"

    def __init__(self, seconds: float = 0.0) -> None:
        super().__init__(literal(float(seconds), Float()))  # a bound parameter: one cached statement


def _seconds(element: db_now) -> Any:
    return element.clauses.clauses[0]


@compiles(db_now)
def _db_now_default(element: db_now, compiler: Any, **kw: Any) -> str:
    return compiler.process(func.now() + func.make_interval(0, 0, 0, 0, 0, 0, _seconds(element)), **kw)


@compiles(db_now, "sqlite")
def _db_now_sqlite(element: db_now, compiler: Any, **kw: Any) -> str:
    day = func.julianday("now") + _seconds(element) / 86400.0
    return compiler.process(func.strftime("%Y-%m-%d %H:%M:%f", day).concat("000"), **kw)


async def get_session(request: Request) -> AsyncIterator[Session]:
    """FastAPI dependency: one session per request from the app's factory, closed after the response.

    An ``async`` generator on purpose: FastAPI runs a sync dependency in a worker thread, twice for a generator
    (enter, exit), and each hop costs a thread handoff. Making a :class:`Session` does no I/O (it connects at
    its first statement), so it is made on the event loop; closing it ends a transaction still open (a rollback:
    I/O), so that runs in a worker thread, shielded from cancellation so that a client leaving early never
    leaks the connection; a session without a transaction (none begun, or committed) is closed on the loop.
    """
    session: Session = request.app.state.sessionmaker()
    try:
        yield session
    finally:
        if session.in_transaction():
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(session.close)
        else:
            session.close()


async def run_in_session(session: Session, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread, then ``session.close()`` in the same thread; returns what ``fn`` returned
    (or raises what it raised, after closing).

    For ``async`` read routes: a sync route costs FastAPI three worker-thread hops (the route, the validation of
    its return value, closing the session); this does the database work and ends the transaction in one.
    ``fn`` must return plain data (a schema model), not rows to be loaded later: the session is closed after it.
    """

    def call() -> T:
        try:
            return fn(*args)
        finally:
            session.close()

    return await anyio.to_thread.run_sync(call)


SessionDep = Annotated[Session, Depends(get_session)]
"""A request-scoped SQL session."""
