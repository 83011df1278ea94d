"""Prestart: wait for the database, then ``alembic upgrade head``. The only way the schema is created."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from tenacity import before_sleep_log, retry, retry_if_exception_type, stop_after_delay, wait_fixed

import migrations

from .db import make_engine

log = logging.getLogger(__name__)

SCRIPT_LOCATION = Path(migrations.__file__).resolve().parent
"""Folder of the installed ``migrations`` package (works from any working directory)."""


def alembic_config(url: str) -> Config:
    """An Alembic config for ``url`` pointing at the installed migration scripts (no alembic.ini needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    cfg.attributes["url"] = url  # not a main option: those interpolate '%' (URL-encoded passwords)
    return cfg


def wait_for_database(url: str, timeout: float = 60.0) -> None:
    """Block until ``SELECT 1`` succeeds on ``url`` (a database container may still be starting).

    Raises:
        sqlalchemy.exc.OperationalError: still unreachable after ``timeout`` seconds.
    """
    engine = make_engine(url)

    @retry(
        retry=retry_if_exception_type(OperationalError),
        stop=stop_after_delay(timeout),
        wait=wait_fixed(1.0),
        reraise=True,
        before_sleep=before_sleep_log(log, logging.WARNING),
    )
    def ping() -> None:
        """One ``SELECT 1``."""
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    try:
        ping()
    finally:
        engine.dispose()


def upgrade(url: str, *, wait_seconds: float = 60.0) -> None:
    """Wait up to ``wait_seconds`` for the database, then migrate it to the newest revision."""
    wait_for_database(url, wait_seconds)
    command.upgrade(alembic_config(url), "head")
    log.info("database schema is at head")
