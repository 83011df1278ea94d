"""Root of the test tree: ``tests/core`` (the ``rsae`` library; needs neither Postgres, Redis nor the app),
``tests/service`` (the API against a real Postgres and Redis) and ``tests/e2e`` (uvicorn, a Celery worker, Redis,
Postgres). Deliberately empty, so that ``pytest tests/core`` imports no server client: the fixtures that need
servers live in ``tests/support/servers.py`` and are loaded by ``tests/service`` and ``tests/e2e`` only.
"""
