"""Test support code shared by ``tests/service`` and ``tests/e2e`` (never imported by ``tests/core``)."""
