"""The core tests run on a machine without the service stack: ``pytest tests/core`` imports no database,
broker or web framework client (the fixtures that need them live in ``tests/support/servers.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("psycopg", "redis", "fastapi", "sqlalchemy", "celery", "service", "worker")

SITECUSTOMIZE = f"""
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is blocked: tests/core must not need it")
        return None
sys.meta_path.insert(0, _Block())
"""


def test_core_tests_import_no_server_client(tmp_path: Path):
    """A core test file runs with psycopg, redis, FastAPI, SQLAlchemy, Celery, ``service`` and ``worker``
    made unimportable."""
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/core/test_metrics.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
