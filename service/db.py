"""Engine and session factory (SQLAlchemy 2, sync sessions) and the FastAPI ``SessionDep`` dependency."""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the API read while the worker writes; busy_timeout waits for a writer instead of failing.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str, *, pool_size: int = 5, max_overflow: int = 10) -> Engine:
    """A new engine for ``url`` with ``pool_pre_ping`` and a pool of ``pool_size`` connections plus up to
    ``max_overflow`` more (SQLAlchemy's defaults are 5 and 10). SQLite files also get WAL, a busy timeout and
    foreign keys; an in-memory SQLite keeps SQLAlchemy's single-connection pool."""
    u = make_url(url)
    pool = {"pool_size": pool_size, "max_overflow": max_overflow}
    if u.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, **pool)
    if not u.database or u.database == ":memory:":
        pool = {}
    else:
        Path(u.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_pre_ping=True, connect_args={"check_same_thread": False}, **pool)
    event.listen(engine, "connect", _sqlite_pragmas)
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
def get_engine(url: str) -> Engine:
    """The process-wide engine for ``url`` (created on first use, i.e. after any fork)."""
    return make_engine(url)


@lru_cache
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    """The process-wide session factory for ``url``; objects stay readable after commit."""
    return sessionmaker(get_engine(url), expire_on_commit=False)


def get_session(request: Request) -> Iterator[Session]:
    """FastAPI dependency: one session per request from the app's factory, closed afterwards."""
    with request.app.state.sessionmaker() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
"""A request-scoped SQL session."""
