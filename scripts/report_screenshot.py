"""Full-page screenshot of a job's ``report.html`` with headless Chromium (what ``docs/img/report_example.png`` is).

    .venv/bin/python scripts/report_screenshot.py <artifact folder or report.html> docs/img/report_example.png

Given a folder, the page is rendered afresh from its ``report.json`` (:func:`rsae.report_html.write_report_html`)
into a temporary file; given an ``.html`` file, that file is shot as it is. The page's height comes from a first
``--dump-dom`` run (``data-page-height``, set by the page's script on load), then one screenshot of the window
``--width`` x that height, so nothing is cut off; the PNG is then reduced to a 256-colour palette (Pillow, a
matplotlib dependency; ``--full-colour`` keeps it as Chromium wrote it: about 2.5 times larger). Needs
``chromium`` on the PATH (``scripts/install_debian.sh``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=10000",
]


def _chromium(args: list[str], tmp: Path) -> str:
    exe = shutil.which("chromium")
    if exe is None:
        sys.exit("chromium is not on the PATH (scripts/install_debian.sh installs it)")
    cmd = [exe, *FLAGS, f"--user-data-dir={tmp / 'profile'}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        sys.exit(f"chromium failed ({proc.returncode}): {proc.stderr[-1500:]}")
    return proc.stdout


def main() -> None:
    """Parse the arguments, render if needed, measure the page, shoot it."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="an artifact folder (with report.json) or a report.html")
    p.add_argument("out", type=Path, help="the PNG to write")
    p.add_argument("--width", type=int, default=1280, help="window width in CSS pixels")
    p.add_argument("--full-colour", action="store_true", help="keep Chromium's RGB PNG (no palette)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="report-shot-") as t:
        tmp = Path(t)
        page = a.source
        if a.source.is_dir():
            from rsae.report_html import write_report_html

            page = write_report_html(json.loads((a.source / "report.json").read_text()), tmp / "report.html")
        url = page.resolve().as_uri()
        dom = _chromium([f"--window-size={a.width},1000", "--dump-dom", url], tmp)  # laid out at the same width
        m = re.search(r'data-page-height="(\d+)"', dom)
        if m is None or 'data-plots-ok="true"' not in dom:
            sys.exit("the page did not load with all its plots decoded")
        height = int(m.group(1))
        a.out.parent.mkdir(parents=True, exist_ok=True)
        _chromium([f"--screenshot={a.out.resolve()}", f"--window-size={a.width},{height}", url], tmp)
    if not a.full_colour:
        from PIL import Image

        img = Image.open(a.out).convert("RGB")
        img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(a.out, optimize=True)
    print(f"{a.out}: {a.width} x {height}, {a.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
