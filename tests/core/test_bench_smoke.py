"""Smoke test of the benchmark suite: ``bench/run_all.py --quick`` runs every benchmark at tiny sizes and writes its
markdown and JSON where it is told. No timed assertions: the figures exist, are numbers and are positive.

Loads the real host model (extraction, the tiny upgrade), hence ``slow``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
OURS = ("finetune_step", "extraction", "upgrade", "evaluation", "scaling")
"""The benchmarks this test answers for; others (sparse_step, api_load) must only not fail."""


def test_run_all_quick_writes_positive_figures(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "passive", "RSAE_BENCH_DEVICE": "cpu"}
    r = subprocess.run(
        [sys.executable, "bench/run_all.py", "--quick", "--doc", str(tmp_path / "b.md"), "--json-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    (report_file,) = tmp_path.glob("quick-*.json")
    report = json.loads(report_file.read_text())
    assert report["quick"] is True and report["machine"]["cpu"] and report["machine"]["torch"]
    for name, res in report["results"].items():
        assert res["status"] in ("ok", "skipped"), (name, res.get("reason"))
    for name in OURS:
        res = report["results"][name]
        assert res["status"] == "ok", (name, res.get("reason"))
        figs = res["figures"]
        assert figs, name
        for f in figs:
            assert f["bench"] and f["name"] and f["unit"], f
            if f.get("skipped"):  # a peer that cannot run here says why (e.g. SAELens's store)
                continue
            v = f["value"]
            assert isinstance(v, (int, float)) and math.isfinite(v), f
            # stage times come from the report, rounded to 10 ms by the pipeline: a tiny stage may read 0
            assert v > 0 or (f["name"] == "stage_s" and v == 0), f
    names = {(f["bench"], f["name"]) for n in OURS for f in report["results"][n]["figures"]}
    for want in [
        ("finetune_step", "tokens_per_s"),
        ("finetune_step", "speedup_vs_saelens"),
        ("finetune_step", "roofline_tokens_per_s"),
        ("extraction", "speedup_truncated_vs_full"),
        ("extraction", "extract_peak_rss_bytes"),
        ("upgrade", "upgrade_over_saelens"),
        ("upgrade", "stage_s"),
        ("evaluation", "evaluate_s_per_column"),
        ("evaluation", "downstream_cached_over_recompute"),
        ("scaling", "overhead_over_gemm"),
    ]:
        assert want in names, want
    peers = {f.get("peer") for f in report["results"]["finetune_step"]["figures"] if f["name"] == "tokens_per_s"}
    assert "saelens" in peers and any(p and p.startswith("rsae") for p in peers), peers
    md = (tmp_path / "b.md").read_text()
    assert "Quick, preliminary" in md and report["machine"]["cpu"] in md and "run_all.py --quick" in md
