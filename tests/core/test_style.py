"""The codebase is lint- and format-clean under the ruff configuration in ``pyproject.toml``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUFF = [sys.executable, "-m", "ruff"]


def test_ruff_lint_is_clean():
    r = subprocess.run([*RUFF, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format_is_clean():
    r = subprocess.run([*RUFF, "format", "--check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_long_function_in_rsae_without_a_reason():
    """A function of rsae over 80 lines (docstring included) says why in its docstring ("on purpose")."""
    import ast

    long = []
    for f in sorted((ROOT / "rsae").rglob("*.py")):
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80:
                if "on purpose" not in (ast.get_docstring(n) or ""):
                    long.append(f"{f.relative_to(ROOT)}:{n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert not long, long
