"""Headless Chromium for the tests that look at ``report.html`` in a browser (Debian package ``chromium``).

If ``chromium`` is not on the PATH, :func:`chromium` runs ``scripts/install_debian.sh`` once and FAILS the test
(not skip) when it still is not there.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = ROOT / "scripts" / "install_debian.sh"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=10000",
]
"""Flags of every run: headless, no network side traffic, a virtual-time budget for the page's load."""


def chromium() -> str:
    """Path of the chromium binary; installs it with scripts/install_debian.sh or FAILS the test."""
    exe = shutil.which("chromium")
    if exe:
        return exe
    proc = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900)
    exe = shutil.which("chromium")
    if not exe:
        pytest.fail(
            "headless Chromium is required for the HTML report tests but `chromium` is not on PATH "
            f"and {INSTALL_SCRIPT.relative_to(ROOT)} could not install it (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-800:]}",
            pytrace=False,
        )
    return exe


def run_chromium(args: list[str], tmp: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run chromium with :data:`CHROMIUM_FLAGS` and a fresh profile under ``tmp``; assert it exits 0."""
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp))
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-1500:]}"
    return proc
