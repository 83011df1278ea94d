"""Alembic migration scripts of the service's SQL schema (run with ``rsae-service migrate``)."""
