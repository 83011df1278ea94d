"""Test support code: ``servers`` (Postgres, Redis, the app: only ``tests/service`` and ``tests/e2e`` import
it), ``hub`` and ``webhooks`` (light helpers any test may use)."""
