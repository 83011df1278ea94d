"""The layer rules hold: ``lint-imports`` (import-linter) keeps every contract of ``[tool.importlinter]`` in
pyproject.toml (rsae imports neither service nor worker; service does not import worker)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    assert lint.is_file(), f"{lint} missing: pip install -e '.[test]' (import-linter)"
    r = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"lint-imports exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    assert "0 broken" in r.stdout, r.stdout
