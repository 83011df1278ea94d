"""The self-contained HTML report (:mod:`rsae.report_html`), checked statically and in headless Chromium.

``tests/data/report_example.json`` is a hand-made synthetic report (all numbers made up, no corpus text); its
``latent_identity`` section was computed by :mod:`rsae.identity` on made-up ReLU SAEs (d_sae 2,304) over Gaussian
inputs. Chromium (Debian package ``chromium``) is required: if it is missing, the tests try
``scripts/install_debian.sh`` once and FAIL (not skip) when it still is not available. (The screenshot in
``docs/img/report_example.png`` is of a real job's report: ``scripts/report_screenshot.py``.)
"""

from __future__ import annotations

import base64
import copy
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from rsae.report_html import render_report_html, write_report_html
from support.browser import run_chromium

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "tests" / "data" / "report_example.json"
WINDOW = (1280, 2400)
PLOTS = ["gate", "curves", "bars", "identity-scatter", "identity-cosine", "identity-density"]
EXPECTED_ROWS = [
    "mse",
    "fvu",
    "fvu_about_zero",
    "l0",
    "alive_fraction",
    "ce_clean",
    "ce_spliced",
    "ce_zero",
    "delta_ce",
    "delta_ce_se",
    "loss_recovered",
    "kl",
    "probe_accuracy_1",
    "probe_accuracy_5",
]


# -- helpers ----------------------------------------------------------------------------------------------


class _Collect(HTMLParser):
    """Collects the metrics table (columns, rows, best cells) and the plot images of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.in_metrics = False
        self.columns: list[str] = []
        self.rows: list[str] = []
        self.best: dict[str, list[str]] = {}
        self.lead: dict[str, list[str]] = {}
        self.l0_flags: list[str] = []
        self.imgs: list[dict[str, str]] = []
        self.resource_urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = {k: (v or "") for k, v in attrs}
        for k in ("src", "href", "action", "poster", "data"):
            if k in a:
                self.resource_urls.append(a[k])
        if tag == "table" and a.get("id") == "metrics":
            self.in_metrics = True
        elif tag == "img" and "plot" in a.get("class", "").split():
            self.imgs.append(a)
        elif self.in_metrics and tag == "th" and "data-sae" in a:
            self.columns.append(a["data-sae"])
            if a.get("data-l0-flag") == "higher":
                self.l0_flags.append(a["data-sae"])
        elif self.in_metrics and tag == "tr" and "data-metric" in a:
            self.rows.append(a["data-metric"])
        elif self.in_metrics and tag == "td" and "best" in a.get("class", "").split():
            self.best.setdefault(self.rows[-1], []).append(a["data-sae"])
        elif self.in_metrics and tag == "td" and "lead" in a.get("class", "").split():
            self.lead.setdefault(self.rows[-1], []).append(a["data-sae"])

    def handle_endtag(self, tag):
        if tag == "table":
            self.in_metrics = False


def _parse(page: str) -> _Collect:
    c = _Collect()
    c.feed(page)
    return c


def _example() -> dict:
    return json.loads(EXAMPLE.read_text())


@pytest.fixture(scope="module")
def example_page(tmp_path_factory) -> Path:
    """The example report rendered to ``<tmp>/report.html``."""
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert write_report_html(_example(), out) == out
    return out


# -- static checks ------------------------------------------------------------------------------------------


def test_example_is_self_contained_with_full_table(example_page: Path) -> None:
    page = example_page.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    # no network resource anywhere: attributes, CSS url(), @import
    assert not re.search(r"""(?:src|href|action|poster)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert not re.search(r"url\(\s*['\"]?\s*(?:https?:)?//|@import", page, re.I)
    c = _parse(page)
    for u in c.resource_urls:
        assert u.startswith("data:") or u.startswith("#"), u
    assert "Content-Security-Policy" in page

    assert c.columns == ["teacher", "rsae_init", "rsae", "control"]
    assert c.rows == EXPECTED_ROWS
    assert "FVU (about the mean)" in page
    # best per row: fine-tuned RSAE wins every ranked row of the example; L0 / alive / CE clean not ranked
    for row in ("mse", "fvu", "ce_spliced", "delta_ce", "loss_recovered", "kl", "probe_accuracy_1", "probe_accuracy_5"):
        assert c.best.get(row) == ["rsae"], (row, c.best.get(row))
    for row in ("l0", "alive_fraction", "ce_clean", "ce_zero", "delta_ce_se"):
        assert row not in c.best

    assert c.lead == {} and c.l0_flags == []  # every L0 at or below the teacher's

    # six plots, all valid PNG data URIs with alt text
    assert [i["data-plot"] for i in c.imgs] == PLOTS
    for img in c.imgs:
        assert img["alt"]
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"

    # strings are escaped; the config is in a collapsed <details>
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert re.search(r'<details id="config"><summary>[^<]*</summary><pre>', page)
    assert "&quot;l1_coefficient&quot;" in page
    assert "not available" not in page


def test_paired_comparisons_table_says_which_differences_are_resolved(example_page: Path) -> None:
    """Report schema 3: every pair of ``comparisons`` gets a row; a delta CE difference beyond 2 standard
    errors is called lower/higher with its size in s.e., one within 2 s.e. 'not resolved'."""
    page = example_page.read_text(encoding="utf-8")
    rows = dict(re.findall(r'<tr data-pair="([^"]+)">(.*?)</tr>', page))
    assert set(rows) == {"rsae_init-teacher", "rsae-teacher", "rsae-control", "control-teacher"}
    assert "lower by 9.7 s.e." in rows["rsae-teacher"] and "-12.31%" in rows["rsae-teacher"]
    assert "higher by 5.2 s.e." in rows["rsae_init-teacher"]
    report = _example()
    report["comparisons"]["rsae-control"]["delta_ce_diff_se"] = 0.03
    from rsae.report_html import render_report_html

    page = render_report_html(report)
    assert (
        "within 2 s.e. (not resolved)" in dict(re.findall(r'<tr data-pair="([^"]+)">(.*?)</tr>', page))["rsae-control"]
    )
    del report["comparisons"]
    assert 'id="comparisons"' not in render_report_html(report)


def test_best_cell_respects_the_standard_errors_and_l0_above_the_teacher_is_flagged() -> None:
    """Δ CE, CE spliced and loss recovered: the lowest Δ CE is 'best' only when it beats every other column by
    2 s.e. (paired s.e. from ``comparisons``; for a pair not there, the two SAEs' s.e. combined); otherwise it
    is a 'lead' cell saying why. A column with L0 above the teacher's gets a visible flag."""
    report = _example()
    report["comparisons"]["rsae-control"]["delta_ce_diff_se"] = 0.03  # -0.048 is 1.6 s.e.: not resolved
    report["metrics"]["control"]["l0"] = 45.0
    c = _parse(page := render_report_html(report))
    for row in ("delta_ce", "ce_spliced", "loss_recovered"):
        assert row not in c.best and c.lead[row] == ["rsae"], row
    for row in ("mse", "fvu", "kl", "probe_accuracy_1"):  # no s.e.: ranked by value
        assert c.best[row] == ["rsae"], row
    lead = re.search(r'<td data-sae="rsae" class="lead" title="([^"]*)"', page).group(1)
    assert "within 2 s.e." in lead and "Control (teacher fine-tuned) (paired" in lead and "Teacher" not in lead
    assert c.l0_flags == ["control"] and "▲ L0 +9.0% vs teacher" in page
    assert re.search(r'<td data-sae="control" class="l0-high">45</td>', page)

    # without the paired rows, rsae vs control falls back to sqrt(0.017^2 + 0.019^2) = 0.0255: 1.9 s.e.
    del report["comparisons"]
    c = _parse(page := render_report_html(report))
    assert c.lead["delta_ce"] == ["rsae"] and "(unpaired" in page
    report["metrics"]["control"]["delta_ce"] = 0.40  # now 4.6 s.e. behind: resolved against every column
    report["metrics"]["control"]["l0"] = 41.3  # equal to the teacher's: no flag
    c = _parse(render_report_html(report))
    assert c.best["delta_ce"] == ["rsae"] and "delta_ce" not in c.lead and c.l0_flags == []


def test_latent_identity_table_and_malformed_parts() -> None:
    report = _example()
    page = render_report_html(report)
    rows = dict(re.findall(r'<tr data-identity="([^"]+)">(.*?)</tr>', page))
    ident = report["latent_identity"]["vs_teacher"]
    assert set(rows) == {"decoder_cos", "cos_share", "corr", "corr_share", "ratio", "ratio_share", "died", "born"}
    assert f"{ident['rsae']['died']}: {ident['rsae']['died_latents'][0]}, " in rows["died"]
    assert f"{ident['rsae']['decoder_cos']['median']:.3f} [" in rows["decoder_cos"]
    assert "8128 held-out tokens (2304 latents)" in page and "latent_identity.safetensors" in page
    broken = copy.deepcopy(report)
    broken["latent_identity"]["scatter"]["rsae"].pop()
    del broken["latent_identity"]["decoder_cos_hist"]["rsae"]
    c = _parse(page := render_report_html(broken))
    assert 'data-na="firing-rate scatter"' in page and 'data-na="decoder cosine histogram"' in page
    assert [i["data-plot"] for i in c.imgs] == ["gate", "curves", "bars", "identity-density"]


def test_render_does_not_touch_pyplot() -> None:
    code = (
        "import json, sys; from rsae.report_html import render_report_html; "
        f"render_report_html(json.load(open({str(EXAMPLE)!r}))); "
        "print('matplotlib.pyplot' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_missing_optional_parts_say_not_available(tmp_path: Path) -> None:
    full = _example()
    minimal = {"metrics": {k: dict(full["metrics"][k]) for k in ("teacher", "rsae")}}
    for m in minimal["metrics"].values():  # CE evaluation disabled, no probes
        for k in ("ce_clean", "ce_spliced", "ce_zero", "delta_ce", "delta_ce_se", "loss_recovered", "kl", "ce_tokens"):
            m[k] = None
        m.pop("probe_accuracy")
    out = write_report_html(minimal, tmp_path / "sub" / "minimal.html")
    page = out.read_text(encoding="utf-8")
    assert list(tmp_path.joinpath("sub").iterdir()) == [out]  # atomic write leaves no temp file behind
    c = _parse(page)
    assert c.columns == ["teacher", "rsae"]
    assert c.rows == EXPECTED_ROWS[:12]
    assert c.best.get("mse") == ["rsae"] and "delta_ce" not in c.best
    for what in (
        "gate plot",
        "pre-activation histogram",
        "training curves",
        "notes",
        "teacher",
        "host model",
        "remez",
        "calibration",
        "finetune",
        "control",
        "probing",
        "timings",
        "job configuration",
        "paired comparisons",
        "latent identity",
    ):
        assert f'data-na="{what}"' in page, what
    assert page.count("not available") >= 12
    assert [i["data-plot"] for i in c.imgs] == ["bars"]  # MSE bars still drawn, Δ CE marked missing
    assert 'data-na="Δ CE (CE evaluation disabled?)"' in page

    # a malformed optional part degrades to a marker with the reason instead of failing
    broken = copy.deepcopy(full)
    broken["plots"]["gate"]["rsae"] = broken["plots"]["gate"]["rsae"][:-3]
    del broken["control"]
    c2 = _parse(page2 := render_report_html(broken))
    assert 'data-na="gate curves"' in page2 and "values for" in page2
    assert 'data-na="RSAE (fine-tuning) curve"' not in page2
    assert 'data-na="control (teacher fine-tuned) curve"' in page2
    assert [i["data-plot"] for i in c2.imgs] == PLOTS


def test_jump_gate_with_nested_histogram() -> None:
    """The pipeline's layout: histogram under plots.gate.hist, a JumpReLU threshold theta, a named latent."""
    r = _example()
    hist = r["plots"].pop("preact_hist")
    r["plots"]["gate"].update(
        latent=123, theta=0.75, note="latent 123 (median threshold)", hist={**hist, "of": "latent 123"}
    )
    page = render_report_html(r)
    c = _parse(page)
    assert [i["data-plot"] for i in c.imgs] == PLOTS
    assert "histogram of real pre-activations" in c.imgs[0]["alt"]
    assert "(latent 123)" in c.imgs[0]["alt"] and "latent 123 (median threshold)" in page
    assert "not available" not in page


def test_bad_input_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="metrics"):
        render_report_html({"notes": ["x"]})
    with pytest.raises(ValueError, match="metrics"):
        render_report_html({"metrics": {"teacher": 3}})
    with pytest.raises(TypeError):
        render_report_html(["metrics"])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        write_report_html({}, tmp_path / "r.html")
    assert not list(tmp_path.iterdir())


# -- headless Chromium ------------------------------------------------------------------------------------------


def test_chromium_decodes_plots_and_renders(example_page: Path, tmp_path: Path) -> None:
    url = example_page.resolve().as_uri()
    dom = run_chromium(["--dump-dom", url], tmp_path).stdout
    assert 'data-plots-ok="true"' in dom, dom[:500]
    assert f'data-plots-count="{len(PLOTS)}"' in dom
    for plot in PLOTS:
        assert f'data-plot="{plot}"' in dom, plot
    assert '<table id="identity"' in dom and int(re.search(r'data-page-height="(\d+)"', dom).group(1)) > 3000
    assert '<table id="metrics"' in dom
    assert 'data-metric="loss_recovered"' in dom

    shot = tmp_path / "report.png"
    run_chromium([f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}", url], tmp_path)
    assert shot.is_file() and shot.stat().st_size > 10_000
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)
    assert img.shape[:2] == (WINDOW[1], WINDOW[0]), img.shape
    gray = np.asarray(img[..., :3], dtype=float).mean(-1)
    assert gray.std() > 0.05, "screenshot looks blank"
    assert (gray < 0.3).mean() > 0.005, "screenshot has almost no dark (text/line) pixels"
    # the plots are drawn: the blue of the fine-tuned RSAE curve appears
    rgb = np.asarray(img[..., :3], dtype=float)
    blue = (
        (abs(rgb[..., 0] - 0x1F / 255) < 0.08)
        & (abs(rgb[..., 1] - 0x5F / 255) < 0.08)
        & (abs(rgb[..., 2] - 0xBF / 255) < 0.08)
    )
    assert blue.sum() > 500
