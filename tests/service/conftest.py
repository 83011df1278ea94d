"""Fixtures of the API tests: a fresh Postgres database migrated by Alembic, Redis db 15, the API under
TestClient (``tests/support/servers.py``)."""

from support.servers import *  # noqa: F403 - pytest finds fixtures among a conftest's names
