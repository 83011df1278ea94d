"""A self-contained HTML page for an evaluation report (``report.json``, see :mod:`rsae.report`).

:func:`render_report_html` turns a report dict into one HTML document that makes no network request:
CSS and a tiny script are inline, plots are PNG ``data:`` URIs drawn with matplotlib's Agg canvas
(``matplotlib.figure.Figure`` directly, so pyplot's global backend and state are never touched), and a
Content-Security-Policy ``<meta>`` forbids any other source. :func:`write_report_html` writes it atomically.

Only ``report["metrics"]`` is required. Every other section may be missing (older schema versions, CE
evaluation disabled, no control run, ...); the page then shows a ``not available`` marker
(``<p class="na" data-na="<what>">``) in its place. Malformed optional plot data (e.g. arrays of unequal
length) is treated the same way, with the reason in the marker, rather than failing the whole page.

The "best" cell of a ranked metrics row respects the standard errors: on the delta CE, CE spliced and loss
recovered rows it is highlighted only when it beats every other column by at least ``RESOLVED_SE`` (2) standard
errors of the delta CE difference (the paired s.e. of ``report["comparisons"]``, else the two SAEs' own s.e.
combined), and is shown as ``class="lead"`` (italic, the reason in its title) when not; rows without an s.e.
rank by value. A column whose L0 is above the teacher's is flagged (``data-l0-flag="higher"`` on its header,
a visible ▲ badge, ``class="l0-high"`` on its L0 cell): its errors were bought with more active latents.

The latent identity section (``report["latent_identity"]``, :mod:`rsae.identity`) has a summary table
(``<table id="identity">``), a log-log scatter of the teacher's and the RSAE's firing rates per latent, the
histograms of the decoder cosines and activation correlations, and the feature-density histograms (log10 firing
rate) of the teacher, the RSAE and the control.

Hooks for tests and headless browsers: ``<table id="metrics">`` (one ``<tr data-metric=...>`` per metric,
one ``<th data-sae=...>`` per SAE column, best cells ``class="best"``), each plot is
``<img class="plot" alt=... data-plot=...>`` (``gate``, ``curves``, ``bars``, ``identity-scatter``,
``identity-cosine``, ``identity-density``), and on ``window.load`` an inline script sets
``document.body.dataset.plotsOk`` to ``"true"`` iff every ``img.plot`` decoded (complete and
``naturalWidth > 0``), so ``chromium --headless --dump-dom`` shows ``data-plots-ok="true"``, plus
``data-plots-count`` and ``data-page-height`` (the document's scroll height in CSS pixels, for a full-page
screenshot).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .report import RESOLVED_SE, difference_verdict

__all__ = ["render_report_html", "write_report_html", "SAE_ORDER", "SAE_LABELS"]

SAE_ORDER: tuple[str, ...] = ("teacher", "rsae_init", "rsae", "control")
"""Column order of the metrics table; SAEs with other names follow, sorted by name."""

SAE_LABELS: dict[str, str] = {
    "teacher": "Teacher",
    "rsae_init": "RSAE (calibrated)",
    "rsae": "RSAE (fine-tuned)",
    "control": "Control (teacher fine-tuned)",
}
"""Human labels of the known SAE names."""

_COLORS = {"teacher": "#222222", "rsae_init": "#e08a00", "rsae": "#1f5fbf", "control": "#2a9d4b"}
_OTHER_COLORS = ("#8e44ad", "#c0392b", "#16a085", "#7f8c8d")

NA = "not available"
_BEST_ATTR = ' class="best"'

# (row id, label, getter(metrics of one SAE) -> value, better: "lower" | "higher" | None, help text)
_Row = tuple[str, str, Callable[[Mapping[str, Any]], Any], str | None, str]


def _get(key: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda m: m.get(key)


_BASE_ROWS: list[_Row] = [
    ("mse", "MSE", _get("mse"), "lower", "mean squared reconstruction error per token (residual units²)"),
    (
        "fvu",
        "FVU (about the mean)",
        _get("fvu"),
        "lower",
        "fraction of variance unexplained, pooled about the per-dimension mean",
    ),
    ("fvu_about_zero", "FVU (about zero)", _get("fvu_about_zero"), "lower", "squared error divided by the sum of x²"),
    ("l0", "L0", _get("l0"), None, "mean number of active latents per token (not ranked)"),
    (
        "alive_fraction",
        "Alive fraction",
        _get("alive_fraction"),
        None,
        "fraction of latents active at least once on the held-out tokens (not ranked)",
    ),
    ("ce_clean", "CE clean", _get("ce_clean"), None, "host model cross-entropy, nats/token"),
    ("ce_spliced", "CE spliced", _get("ce_spliced"), "lower", "CE with the SAE reconstruction spliced in"),
    ("ce_zero", "CE zero-ablated", _get("ce_zero"), None, "CE with the hooked activation set to zero"),
    ("delta_ce", "Δ CE", _get("delta_ce"), "lower", "CE spliced − CE clean, nats/token"),
    (
        "delta_ce_se",
        "Δ CE std. error",
        _get("delta_ce_se"),
        None,
        "standard error of Δ CE, clustered by held-out sequence (not ranked)",
    ),
    (
        "loss_recovered",
        "Loss recovered",
        _get("loss_recovered"),
        "higher",
        "(CE zero − CE spliced) / (CE zero − CE clean)",
    ),
    ("kl", "KL", _get("kl"), "lower", "KL(clean ‖ spliced) of next-token distributions, nats/token"),
]


# --------------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------------


def _e(x: Any) -> str:
    """html.escape of str(x), quotes included (safe in text and in attribute values)."""
    return html.escape(str(x), quote=True)


def _num(x: Any) -> float | None:
    """x as a finite float, or None (None, bools, strings, NaN, inf -> None)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def _fmt(x: Any) -> str:
    """Display a value: 4 significant digits for floats, ints as is, None/NaN -> an em dash."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if x == 0:
            return "0"
        if not math.isfinite(x):
            return "—" if math.isnan(x) else str(x)
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.3e}"
        return f"{x:.4g}"
    if isinstance(x, (list, tuple)) and len(x) <= 16 and all(isinstance(v, (int, float)) for v in x):
        return "[" + ", ".join(_fmt(v) for v in x) + "]"
    if isinstance(x, (dict, list, tuple)):
        return json.dumps(x, default=str)
    return str(x)


def _na(what: str, reason: str | None = None) -> str:
    text = NA if not reason else f"{NA} ({reason})"
    return f'<p class="na" data-na="{_e(what)}">{_e(what)}: {_e(text)}</p>'


def _mapping(x: Any) -> Mapping[str, Any] | None:
    return x if isinstance(x, Mapping) else None


def _floats(x: Any, what: str) -> list[float]:
    """A list of numbers (None -> NaN). Raises ValueError if x is not a list of numbers/None."""
    if not isinstance(x, Sequence) or isinstance(x, (str, bytes)):
        raise ValueError(f"{what} is not a list")
    out = []
    for v in x:
        if v is None:
            out.append(float("nan"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(float(v))
        else:
            raise ValueError(f"{what} holds a non-number")
    return out


def _sae_names(metrics: Mapping[str, Any]) -> list[str]:
    known = [n for n in SAE_ORDER if n in metrics]
    return known + sorted(n for n in metrics if n not in SAE_ORDER)


def _label(name: str) -> str:
    return SAE_LABELS.get(name, name)


def _color(name: str, names: Sequence[str]) -> str:
    if name in _COLORS:
        return _COLORS[name]
    others = [n for n in names if n not in _COLORS]
    return _OTHER_COLORS[others.index(name) % len(_OTHER_COLORS)] if name in others else "#555555"


# --------------------------------------------------------------------------------------------------------
# plots (matplotlib Figure + Agg canvas; no pyplot)
# --------------------------------------------------------------------------------------------------------


def _new_figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _style_axes(ax) -> None:
    ax.grid(True, color="#e3e3e3", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _png_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str, plot_id: str) -> str:
    return f'<img class="plot" data-plot="{_e(plot_id)}" alt="{_e(alt)}" src="{uri}">'


def _gate_plot(report: Mapping[str, Any]) -> str:
    """SVG of the gate figure (teacher and RSAE gates over the pre-activation histogram).

    Over 80 lines on purpose: one linear drawing, axis by axis, that reads best top to bottom."""
    plots = _mapping(report.get("plots")) or {}
    gate = _mapping(plots.get("gate"))
    # schema: plots.preact_hist; the pipeline may also nest it as plots.gate.hist
    hist = _mapping(plots.get("preact_hist"))
    if hist is None and gate is not None:
        hist = _mapping(gate.get("hist"))
    parts: list[str] = []
    series: dict[str, list[float]] = {}
    h: list[float] | None = None
    gate_reason = None
    if gate is not None:
        try:
            h = _floats(gate.get("h"), "plots.gate.h")
            for name in ("teacher", "rsae_init", "rsae"):
                if gate.get(name) is not None:
                    ys = _floats(gate[name], f"plots.gate.{name}")
                    if len(ys) != len(h):
                        raise ValueError(f"plots.gate.{name} has {len(ys)} values for {len(h)} h")
                    series[name] = ys
            if not series:
                raise ValueError("no gate curves")
        except ValueError as err:
            gate_reason, h, series = str(err), None, {}
    edges = counts = None
    hist_reason = None
    if hist is not None:
        try:
            edges = _floats(hist.get("edges"), "plots.preact_hist.edges")
            counts = _floats(hist.get("counts"), "plots.preact_hist.counts")
            if len(edges) != len(counts) + 1 or not counts:
                raise ValueError(f"{len(edges)} edges for {len(counts)} counts")
        except ValueError as err:
            hist_reason, edges, counts = str(err), None, None
    if h is None and edges is None:
        parts.append(_na("gate plot", gate_reason))
        parts.append(_na("pre-activation histogram", hist_reason))
        return "\n".join(parts)

    fig = _new_figure(10, 6.2)
    if edges is not None and h is not None:
        ax, axh = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    elif h is not None:
        ax, axh = fig.subplots(1, 1), None
    else:
        ax, axh = None, fig.subplots(1, 1)
    latent = gate.get("latent") if gate is not None else None
    if ax is not None and h is not None:
        styles = {
            "teacher": dict(color=_COLORS["teacher"], linestyle="--", linewidth=2.2, zorder=3),
            "rsae_init": dict(color=_COLORS["rsae_init"], linewidth=1.8, alpha=0.9),
            "rsae": dict(color=_COLORS["rsae"], linewidth=1.8),
        }
        labels = {"teacher": "teacher gate", "rsae_init": "RSAE gate (calibrated)", "rsae": "RSAE gate (fine-tuned)"}
        for name, ys in series.items():
            ax.plot(h, ys, label=labels[name], **styles[name])
        ax.axhline(0, color="#999999", linewidth=0.8)
        ax.axvline(0, color="#999999", linewidth=0.8)
        theta = _num(gate.get("theta")) if gate is not None else None
        if theta is not None:
            for a_ in (ax, axh):
                if a_ is not None:
                    a_.axvline(
                        theta,
                        color="#b03a2e",
                        linestyle=":",
                        linewidth=1.4,
                        label="teacher threshold θ" if a_ is ax else None,
                    )
        ax.set_ylabel("gate output")
        title = "Fitted rational gate vs the teacher's gate"
        if latent is not None:
            title += f" (latent {latent})"
        ax.set_title(title, loc="left", fontsize=12)
        ax.legend(loc="upper left", frameon=False)
        _style_axes(ax)
        if axh is None:
            ax.set_xlabel("pre-activation h (residual units)")
    if axh is not None and edges is not None and counts is not None:
        import numpy as np

        e = np.asarray(edges)
        c = np.nan_to_num(np.asarray(counts))
        log = bool(hist.get("log")) if hist is not None else False
        axh.bar(
            e[:-1],
            c,
            width=np.diff(e),
            align="edge",
            color="#9db4d6",
            edgecolor="#6f8fbf",
            linewidth=0.4,
            log=log and bool((c > 0).any()),
        )
        axh.set_ylabel("count (log)" if log else "count")
        axh.set_xlabel("pre-activation h (residual units)")
        if ax is None:
            axh.set_title("Teacher pre-activations (gate curves not available)", loc="left", fontsize=12)
        else:
            of = hist.get("of") if hist is not None else None
            axh.set_title(
                "Teacher pre-activations on real tokens" + (f" ({of})" if of else ""), loc="left", fontsize=10
            )
        _style_axes(axh)
        axh.set_xlim(e[0], e[-1])
    png = _png_data_uri(fig)
    alt = "Gate plot: the RSAE's rational gate against the teacher's gate over the pre-activation range"
    if latent is not None:
        alt += f" (latent {latent})"
    if edges is not None:
        alt += ", with the histogram of real pre-activations beneath"
    parts.append(_img(png, alt, "gate"))
    if h is None:
        parts.append(_na("gate curves", gate_reason))
    if edges is None:
        parts.append(_na("pre-activation histogram", hist_reason))
    note = gate.get("note") if gate is not None else None
    if h is not None and (note or latent is not None):
        cap = str(note) if note else f"Representative latent: {latent}."
        parts.append(f'<p class="caption">{_e(cap)}</p>')
    return "\n".join(parts)


def _curve_points(curve: Any, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    if not isinstance(curve, Sequence) or isinstance(curve, (str, bytes)):
        return xs, ys
    for p in curve:
        if not isinstance(p, Mapping):
            continue
        s, v = _num(p.get("step")), _num(p.get(key))
        if s is not None and v is not None:
            xs.append(s)
            ys.append(v)
    return xs, ys


def _curves_plot(report: Mapping[str, Any]) -> str:
    runs = {
        "rsae": (_mapping(report.get("finetune")) or {}).get("curve"),
        "control": (_mapping(report.get("control")) or {}).get("curve"),
    }
    metrics = _mapping(report.get("metrics")) or {}
    teacher = _mapping(metrics.get("teacher"))
    have = {k: v for k, v in runs.items() if _curve_points(v, "eval_mse")[0] or _curve_points(v, "eval_l0")[0]}
    if not have:
        return _na("training curves")
    fig = _new_figure(10, 3.8)
    axes = fig.subplots(1, 2)
    labels = {"rsae": "RSAE (fine-tuning)", "control": "control (teacher fine-tuned)"}
    for ax, key, title, tkey in (
        (axes[0], "eval_mse", "Held-out MSE", "mse"),
        (axes[1], "eval_l0", "Held-out L0", "l0"),
    ):
        for name, curve in have.items():
            xs, ys = _curve_points(curve, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3.5, linewidth=1.8, color=_COLORS[name], label=labels[name])
        tv = _num(teacher.get(tkey)) if teacher is not None else None
        if tv is not None:
            ax.axhline(tv, color=_COLORS["teacher"], linestyle="--", linewidth=1.3, label="teacher")
        ax.set_title(title, loc="left", fontsize=12)
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel(key.replace("eval_", "eval ").replace("mse", "MSE").replace("l0", "L0"))
        _style_axes(ax)
    handles: dict[str, Any] = {}
    for ax in axes:
        for hd, lb in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lb, hd)
    fig.legend(
        list(handles.values()), list(handles.keys()), loc="outside upper center", ncols=len(handles), frameon=False
    )
    parts = [
        _img(
            _png_data_uri(fig),
            "Training curves: held-out MSE and L0 against fine-tuning step, RSAE vs control, teacher as reference",
            "curves",
        )
    ]
    for name in runs:
        if name not in have:
            parts.append(_na(f"{labels[name]} curve"))
    return "\n".join(parts)


def _bars_plot(metrics: Mapping[str, Any], names: list[str]) -> str:
    panels = []
    for key, title in (("delta_ce", "Δ CE (nats/token, lower is better)"), ("mse", "MSE (lower is better)")):
        vals = [(n, _num((_mapping(metrics.get(n)) or {}).get(key))) for n in names]
        vals = [(n, v) for n, v in vals if v is not None]
        if vals:
            panels.append((key, title, vals))
    if not panels:
        return _na("Δ CE / MSE bar chart")
    rows = [n for n in names if any(n == m for _, _, vals in panels for m, _ in vals)]
    fig = _new_figure(5.0 * len(panels), max(1.9, 0.55 * len(rows) + 1.0))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    ypos = {n: len(rows) - 1 - i for i, n in enumerate(rows)}
    for i, (ax, (key, title, vals)) in enumerate(zip(axes, panels)):
        ys = [ypos[n] for n, _ in vals]
        ax.barh(ys, [v for _, v in vals], color=[_color(n, names) for n, _ in vals], height=0.6)
        ax.set_ylim(-0.6, len(rows) - 0.4)
        ax.set_yticks(list(ypos.values()), [_label(n) for n in ypos] if i == 0 else [])
        for y, (_, v) in zip(ys, vals):
            ax.annotate(_fmt(v), (v, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=9)
        lo = min(0.0, min(v for _, v in vals))
        hi = max(0.0, max(v for _, v in vals))
        ax.set_xlim(lo - 0.02 * (hi - lo or 1), hi + 0.18 * (hi - lo or 1))
        ax.set_title(title, loc="left", fontsize=11)
        _style_axes(ax)
        ax.grid(False, axis="y")
    parts = [
        _img(
            _png_data_uri(fig),
            "Bar chart of " + " and ".join(t.split(" (")[0] for _, t, _ in panels) + " per SAE",
            "bars",
        )
    ]
    if not any(k == "delta_ce" for k, _, _ in panels):
        parts.append(_na("Δ CE (CE evaluation disabled?)"))
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------------
# latent identity (report["latent_identity"], rsae.identity)
# --------------------------------------------------------------------------------------------------------

_IDENTITY_NAMES = ("teacher", "rsae", "control")


def _hist_data(h: Any, what: str) -> tuple[list[float], list[float], bool]:
    """(edges, counts, log) of a Histogram dict. Raises ValueError when malformed."""
    h = _mapping(h)
    if h is None:
        raise ValueError(f"{what} is missing")
    edges, counts = _floats(h.get("edges"), f"{what}.edges"), _floats(h.get("counts"), f"{what}.counts")
    if len(edges) != len(counts) + 1 or not counts:
        raise ValueError(f"{what}: {len(edges)} edges for {len(counts)} counts")
    return edges, counts, bool(h.get("log"))


def _identity_scatter(ident: Mapping[str, Any]) -> str:
    """Log-log scatter of the firing rates (teacher vs RSAE) of the latents in ``scatter``; latents that died
    sit on the bottom edge, those born on the left edge."""
    sc = _mapping(ident.get("scatter")) or {}
    n = _num(ident.get("n_tokens"))
    try:
        t, r = _floats(sc.get("teacher"), "scatter.teacher"), _floats(sc.get("rsae"), "scatter.rsae")
        if len(t) != len(r) or not t or not n:
            raise ValueError(f"{len(t)} teacher and {len(r)} RSAE counts over {n} tokens")
    except ValueError as err:
        return _na("firing-rate scatter", str(err))
    import numpy as np

    t, r = np.asarray(t) / n, np.asarray(r) / n
    floor = 0.5 / n
    both, died, born = (t > 0) & (r > 0), (t > 0) & (r == 0), (t == 0) & (r > 0)
    fig = _new_figure(6.4, 5.6)
    ax = fig.subplots(1, 1)
    ax.scatter(t[both], r[both], s=7, alpha=0.45, color=_COLORS["rsae"], linewidths=0, label="latent")
    if died.any():
        ax.scatter(t[died], np.full(died.sum(), floor), s=22, marker="v", color="#c0392b", label="died (RSAE never)")
    if born.any():
        ax.scatter(np.full(born.sum(), floor), r[born], s=22, marker="<", color="#8e44ad", label="born (teacher never)")
    pos = np.concatenate([t[t > 0], r[r > 0]])
    lo = floor if (died.any() or born.any() or not pos.size) else pos.min() / 1.5
    hi = min(1.0, pos.max() * 1.5) if pos.size else 1.0
    grid = np.array([lo, hi])
    ax.plot(grid, grid, color=_COLORS["teacher"], linestyle="--", linewidth=1.2, label="equal rate")
    for f in (2.0, 0.5):
        ax.plot(grid, grid * f, color="#999999", linestyle=":", linewidth=1.0, label="×2 / ÷2" if f == 2 else None)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo * 0.8, hi * 1.2)
    ax.set_ylim(lo * 0.8, hi * 1.2)
    ax.set_xlabel("teacher firing rate (fraction of held-out tokens)")
    ax.set_ylabel("RSAE firing rate")
    sub = f"{len(t)} sampled latents" if sc.get("sampled") else f"all {len(t)} latents"
    ax.set_title(f"Firing rate per latent, teacher vs RSAE ({sub})", loc="left", fontsize=11)
    ax.legend(loc="upper left", frameon=False, fontsize=9)
    _style_axes(ax)
    alt = "Scatter plot, log-log: each latent's firing rate in the teacher against the fine-tuned RSAE"
    return _img(_png_data_uri(fig), alt, "identity-scatter")


def _identity_similarity(ident: Mapping[str, Any]) -> str:
    """Two panels: histograms of the decoder cosines and of the activation correlations, RSAE and control."""
    panels = []
    for key, title in (
        ("decoder_cos_hist", "Decoder cosine cos(W_dec teacher[j], W_dec[j])"),
        ("activation_corr_hist", "Activation correlation with the teacher's latent j"),
    ):
        hists = _mapping(ident.get(key)) or {}
        try:
            data = {k: _hist_data(hists[k], f"{key}.{k}") for k in _IDENTITY_NAMES if k in hists}
            if "rsae" not in data:
                raise ValueError(f"{key}.rsae is missing")
        except ValueError as err:
            return _na("decoder cosine histogram", str(err))
        panels.append((title, data))
    fig = _new_figure(10, 3.6)
    for ax, (title, data) in zip(fig.subplots(1, 2), panels):
        log = False
        for k, (edges, counts, lg) in data.items():
            ax.stairs(counts, edges, color=_COLORS[k], linewidth=1.8, label=_label(k))
            log = log or (lg and any(c > 0 for c in counts))
        if log:
            ax.set_yscale("log")
        ax.set_title(title, loc="left", fontsize=11)
        ax.set_xlabel("cosine" if "cosine" in title else "Pearson r over held-out tokens")
        ax.set_ylabel("latents" + (" (log)" if log else ""))
        ax.legend(loc="upper left", frameon=False, fontsize=9)
        _style_axes(ax)
    alt = "Histograms of the per-latent decoder cosine and activation correlation with the teacher, RSAE and control"
    return _img(_png_data_uri(fig), alt, "identity-cosine")


def _identity_density(ident: Mapping[str, Any]) -> str:
    """Feature-density histograms: log10 firing rate of the latents that fired, teacher / RSAE / control."""
    hists = _mapping(ident.get("density_hist")) or {}
    dead = _mapping(ident.get("dead")) or {}
    try:
        data = {k: _hist_data(hists[k], f"density_hist.{k}") for k in _IDENTITY_NAMES if k in hists}
        if not data:
            raise ValueError("no histogram")
    except ValueError as err:
        return _na("feature density histogram", str(err))
    fig = _new_figure(10, 3.4)
    ax = fig.subplots(1, 1)
    styles = {
        "teacher": dict(linestyle="--", linewidth=2.0),
        "rsae": dict(linewidth=1.8),
        "control": dict(linewidth=1.5),
    }
    used = [i for _, counts, _ in data.values() for i, c in enumerate(counts) if c > 0]
    for k, (edges, counts, _) in data.items():
        d = _num(dead.get(k))
        label = _label(k) + (f" ({int(d)} dead)" if d is not None else "")
        ax.stairs(counts, edges, color=_COLORS[k], label=label, **styles[k])
    if used:  # the occupied range, one bin either side
        edges = next(iter(data.values()))[0]
        ax.set_xlim(edges[max(min(used) - 1, 0)], edges[min(max(used) + 2, len(edges) - 1)])
    ax.set_title("Feature density: log10 firing rate of each latent on held-out tokens", loc="left", fontsize=11)
    ax.set_xlabel("log10(firing rate)  (dead latents, rate 0, counted in the legend)")
    ax.set_ylabel("latents")
    fig.legend(loc="outside upper center", ncols=len(data), frameon=False, fontsize=9)
    _style_axes(ax)
    alt = "Feature-density histograms (log10 firing rate per latent) of the teacher, the RSAE and the control"
    return _img(_png_data_uri(fig), alt, "identity-density")


def _dist_cell(d: Any, fmt: str = "{:.3f}") -> str:
    """'median [q05, q95]' of a Distribution dict, or an em dash."""
    d = _mapping(d) or {}
    med, lo, hi = _num(d.get("median")), _num(d.get("q05")), _num(d.get("q95"))
    if med is None:
        return "—"
    return fmt.format(med) + (f" [{fmt.format(lo)}, {fmt.format(hi)}]" if lo is not None and hi is not None else "")


def _share_cell(x: Any) -> str:
    v = _num(x)
    return "—" if v is None else f"{v:.1%}"


def _latents_cell(count: Any, listed: Any, limit: int = 20) -> str:
    c = _num(count)
    if c is None:
        return "—"
    ids = [int(i) for i in listed if _num(i) is not None] if isinstance(listed, Sequence) else []
    more = " …" if c > min(len(ids), limit) else ""
    return f"{int(c)}" + (f": {', '.join(str(i) for i in ids[:limit])}{more}" if ids else "")


def _identity_table(ident: Mapping[str, Any]) -> str:
    """One row per statistic, one column per SAE compared with the teacher (``vs_teacher``)."""
    vs = _mapping(ident.get("vs_teacher")) or {}
    names = [k for k in ("rsae", "control") if _mapping(vs.get(k)) is not None]
    if not names:
        return _na("latent identity table", "no SAE compared with the teacher")
    rows = (
        ("decoder_cos", "Decoder cosine, median [5%, 95%]", lambda c: _dist_cell(c.get("decoder_cos"))),
        ("cos_share", "Decoder cosine ≥ 0.9", lambda c: _share_cell(c.get("share_decoder_cos_at_least_0_9"))),
        ("corr", "Activation correlation, median [5%, 95%]", lambda c: _dist_cell(c.get("activation_corr"))),
        ("corr_share", "Activation correlation ≥ 0.9", lambda c: _share_cell(c.get("share_corr_at_least_0_9"))),
        ("ratio", "Firing-rate ratio to teacher, median [5%, 95%]", lambda c: _dist_cell(c.get("firing_rate_ratio"))),
        ("ratio_share", "Firing rate within ×2 of teacher", lambda c: _share_cell(c.get("share_rate_within_2x"))),
        ("died", "Died (teacher's most frequent first)", lambda c: _latents_cell(c.get("died"), c.get("died_latents"))),
        ("born", "Born (most frequent first)", lambda c: _latents_cell(c.get("born"), c.get("born_latents"))),
    )
    head = "".join(f'<th data-sae="{_e(n)}" scope="col">{_e(_label(n))}</th>' for n in names)
    body = "".join(
        f'<tr data-identity="{rid}"><th scope="row">{_e(label)}</th>'
        + "".join(f'<td data-sae="{_e(n)}">{_e(get(_mapping(vs[n]) or {}))}</td>' for n in names)
        + "</tr>"
        for rid, label, get in rows
    )
    cap = (
        f"Latent j against the teacher's latent j on {_fmt(ident.get('n_tokens'))} held-out tokens "
        f"({_fmt(ident.get('d_sae'))} latents). Correlation: Pearson r of the activations over tokens, on the latents "
        "where both vary; ratio: over the latents the teacher fired on. Per-latent arrays: "
        f"{_fmt(ident.get('artifact'))}."
    )
    return (
        f'<table id="identity" class="metrics"><caption>{_e(cap)}</caption>'
        f'<thead><tr><th scope="col">Statistic</th>{head}</tr></thead><tbody>{body}</tbody></table>'
    )


def _identity_html(report: Mapping[str, Any]) -> str:
    """The latent identity section: summary table, firing-rate scatter, cosine / correlation histograms,
    feature-density histograms; a 'not available' marker for an older report."""
    ident = _mapping(report.get("latent_identity"))
    if ident is None:
        return _na("latent identity", "not in this report (schema before rsae-report/7)")
    return "\n".join(
        [_identity_table(ident), _identity_scatter(ident), _identity_similarity(ident), _identity_density(ident)]
    )


# --------------------------------------------------------------------------------------------------------
# HTML sections
# --------------------------------------------------------------------------------------------------------


def _rows(metrics: Mapping[str, Any], names: list[str]) -> list[_Row]:
    rows = list(_BASE_ROWS)
    ks: set[str] = set()
    for n in names:
        pa = _mapping((_mapping(metrics.get(n)) or {}).get("probe_accuracy"))
        if pa:
            ks.update(str(k) for k in pa)

    def order(k: str):
        try:
            return (0, float(k), k)
        except ValueError:
            return (1, 0.0, k)

    for k in sorted(ks, key=order):

        def get(m, k=k):
            pa = _mapping(m.get("probe_accuracy")) or {}
            return pa.get(k, pa.get(int(k)) if k.isdigit() else None)

        rows.append(
            (
                f"probe_accuracy_{k}",
                f"Probe accuracy (k={k})",
                get,
                "higher",
                f"sparse probing accuracy with the top {k} latent(s)",
            )
        )
    return rows


SE_ROWS = ("delta_ce", "ce_spliced", "loss_recovered")
"""Rows ranked with the delta CE standard errors: CE spliced and loss recovered differ between two SAEs by the delta
CE difference (times -1 / (CE zero - CE clean) for loss recovered), so the same difference and s.e. judge them."""


def _ce_difference(metrics: Mapping[str, Any], comparisons: Mapping[str, Any], a: str, b: str):
    """(delta CE of a minus b, its s.e., where from): the paired row of ``comparisons`` ("a-b" or "b-a"), else the
    difference of the two SAEs' delta CE with the unpaired s.e. sqrt(se_a^2 + se_b^2) (larger than the paired
    one when the two share the clean run's noise: conservative). s.e. None when there is none."""
    for key, sign in ((f"{a}-{b}", 1.0), (f"{b}-{a}", -1.0)):
        row = _mapping(comparisons.get(key))
        if row is not None and _num(row.get("delta_ce_diff")) is not None:
            return sign * _num(row["delta_ce_diff"]), _num(row.get("delta_ce_diff_se")), "paired"
    ma, mb = _mapping(metrics.get(a)) or {}, _mapping(metrics.get(b)) or {}
    da, db = _num(ma.get("delta_ce")), _num(mb.get("delta_ce"))
    if da is None or db is None:
        return None, None, None
    sa, sb = _num(ma.get("delta_ce_se")), _num(mb.get("delta_ce_se"))
    se = math.hypot(sa, sb) if sa is not None and sb is not None else None
    return da - db, se, "unpaired"


def _best(
    rid: str, better: str | None, nums: list[float | None], names: list[str], metrics, comparisons
) -> tuple[set[int], dict[int, str]]:
    """The best cell of a ranked row (``better``: "lower" / "higher"), and a 'lead' cell with the reason when
    the best value does not beat every other column beyond ``RESOLVED_SE`` standard errors (rows of
    :data:`SE_ROWS`, where a delta CE s.e. exists; other rows: by value). Ties: no best."""
    present = [i for i, x in enumerate(nums) if x is not None]
    if not better or len(present) < 2:
        return set(), {}
    target = min(nums[i] for i in present) if better == "lower" else max(nums[i] for i in present)
    top = [i for i in present if nums[i] == target]
    if len(top) > 1:
        return set(), {}
    i = top[0]
    if rid not in SE_ROWS:
        return {i}, {}
    close = []
    for j in present:
        if j == i:
            continue
        diff, se, how = _ce_difference(metrics, comparisons, names[i], names[j])
        if diff is None or se is None or se <= 0:
            continue  # no s.e. to judge by: the value decides
        if diff >= 0 or abs(diff) < RESOLVED_SE * se:
            close.append(f"{_label(names[j])} ({how} Δ CE difference {diff:+.4f} ± {se:.4f})")
    if close:
        return set(), {i: f"best value, but within {RESOLVED_SE:g} s.e. of: " + "; ".join(close)}
    return {i}, {}


def _l0_flags(metrics: Mapping[str, Any], names: list[str]) -> dict[str, str]:
    """SAE name -> flag text for the SAEs whose L0 is above the teacher's (their errors are at lower sparsity)."""
    t = _num((_mapping(metrics.get("teacher")) or {}).get("l0"))
    if t is None:
        return {}
    out = {}
    for n in names:
        v = _num((_mapping(metrics.get(n)) or {}).get("l0"))
        if n != "teacher" and v is not None and v > t:
            out[n] = f"▲ L0 {v / t - 1:+.1%} vs teacher" if t > 0 else "▲ L0 above teacher"
    return out


def _metrics_table(metrics: Mapping[str, Any], names: list[str], comparisons: Mapping[str, Any] | None = None) -> str:
    """The metrics table: one column per SAE (a column with L0 above the teacher's is flagged ▲), best cells
    per ranked row (:func:`_best`, judged with the delta CE standard errors of ``comparisons`` where they exist).

    Over 80 lines on purpose: the table's template, header, rows and caption in page order."""
    comparisons = _mapping(comparisons) or {}
    flags = _l0_flags(metrics, names)
    head = "".join(
        f'<th data-sae="{_e(n)}" scope="col"'
        + (f' data-l0-flag="higher" title="{_e(_L0_FLAG_HELP)}"' if n in flags else "")
        + f'><span class="swatch" style="background:{_color(n, names)}">'
        f"</span>{_e(_label(n))}<br><code>{_e(n)}</code>"
        + (f'<br><span class="flag">{_e(flags[n])}</span>' if n in flags else "")
        + "</th>"
        for n in names
    )
    body = []
    for rid, label, get, better, help_text in _rows(metrics, names):
        vals = []
        for n in names:
            m = _mapping(metrics.get(n))
            vals.append(get(m) if m is not None else None)
        best, lead = _best(rid, better, [_num(v) for v in vals], names, metrics, comparisons)
        tag = {"lower": "lower is better", "higher": "higher is better"}.get(better or "", "not ranked")
        cells = []
        for i, (n, v) in enumerate(zip(names, vals)):
            cls = ["best"] if i in best else ["lead"] if i in lead else []
            if rid == "l0" and n in flags:
                cls.append("l0-high")
            attr = f' class="{" ".join(cls)}"' if cls else ""
            title = f' title="{_e(lead[i])}"' if i in lead else ""
            cells.append(f'<td data-sae="{_e(n)}"{attr}{title}>{_e(_fmt(v))}</td>')
        body.append(
            f'<tr data-metric="{_e(rid)}" data-better="{_e(better or "none")}">'
            f'<th scope="row" title="{_e(help_text)}">{_e(label)}'
            f'<span class="better">{_e(tag)}</span></th>{"".join(cells)}</tr>'
        )
    toks = []
    for key, what in (("n_tokens", "reconstruction metrics"), ("ce_tokens", "CE metrics")):
        vs = {(_mapping(metrics.get(n)) or {}).get(key) for n in names} - {None}
        if vs:
            toks.append(f"{what} on {', '.join(_fmt(v) for v in sorted(vs, key=str))} held-out tokens")
    cap = (
        "Held-out metrics. Best value per ranked row in bold green; on the Δ CE, CE spliced and loss recovered "
        f"rows only when it beats every other column by at least {RESOLVED_SE:g} standard errors of the Δ CE "
        "difference (paired, from the comparisons below; else the two columns' s.e. combined), otherwise in "
        "italics (hover for why)."
    )
    if flags:
        cap += " ▲: L0 above the teacher's (more active latents per token: not a like-for-like comparison)."
    if toks:
        joined = "; ".join(toks)
        cap += " " + joined[0].upper() + joined[1:] + "."
    return (
        f'<table id="metrics" class="metrics"><caption>{_e(cap)}</caption>'
        f'<thead><tr><th scope="col">Metric</th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


_L0_FLAG_HELP = "L0 above the teacher's: lower errors may come from more active latents per token"


def _kv_table(
    d: Mapping[str, Any] | None, what: str, *, keys: Sequence[str] | None = None, skip: Sequence[str] = ()
) -> str:
    if not d:
        return _na(what)
    order = [k for k in (keys or []) if k in d] + [k for k in d if k not in (keys or []) and k not in skip]
    rows = "".join(f'<tr><th scope="row">{_e(k)}</th><td>{_e(_fmt(d[k]))}</td></tr>' for k in order)
    return f'<table class="kv" data-section="{_e(what)}">{rows}</table>'


def _comparisons_table(comparisons: Mapping[str, Any] | None) -> str:
    """Paired differences between SAEs on the same held-out tokens (``Report.comparisons``)."""
    comparisons = _mapping(comparisons)
    if not comparisons:
        return _na("paired comparisons", "not in this report (schema before rsae-report/3)")
    rows = []
    for pair, row in comparisons.items():
        row = _mapping(row) or {}
        a, _, b = str(pair).partition("-")
        rel, diff, se = _num(row.get("mse_rel")), _num(row.get("delta_ce_diff")), _num(row.get("delta_ce_diff_se"))
        verdict = difference_verdict(diff, se)
        if verdict is None:
            verdict = NA
        elif verdict == "not resolved":
            verdict = f"within {RESOLVED_SE:g} s.e. (not resolved)"
        elif se:
            verdict = f"{verdict} by {abs(diff) / se:.1f} s.e."
        rows.append(
            f'<tr data-pair="{_e(pair)}"><th scope="row">{_e(_label(a))} vs {_e(_label(b))}</th>'
            f"<td>{_e(f'{rel:+.2%}' if rel is not None else NA)}</td>"
            f"<td>{_e(f'{diff:+.4f}' if diff is not None else NA)}</td>"
            f"<td>{_e(f'{se:.4f}' if se is not None else NA)}</td><td>{_e(verdict)}</td></tr>"
        )
    return (
        '<table id="comparisons" class="metrics"><caption>Paired differences on the same held-out tokens: '
        "MSE ratio − 1, and Δ CE of the first minus the second (nats/token) with its standard error "
        'clustered by sequence.</caption><thead><tr><th scope="col">Pair</th><th scope="col">MSE</th>'
        '<th scope="col">Δ CE difference</th><th scope="col">std. error</th><th scope="col">Δ CE</th>'
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _summary(metrics: Mapping[str, Any]) -> str:
    t, r = _mapping(metrics.get("teacher")), _mapping(metrics.get("rsae"))
    if t is None or r is None:
        return ""
    items = []
    for key, label in (("mse", "MSE"), ("l0", "L0"), ("delta_ce", "Δ CE"), ("loss_recovered", "loss recovered")):
        tv, rv = _num(t.get(key)), _num(r.get(key))
        if tv is None or rv is None:
            continue
        rel = f" ({(rv - tv) / abs(tv):+.1%})" if tv != 0 else ""
        line = f"<b>{_e(label)}</b> {_e(_fmt(rv))} vs teacher {_e(_fmt(tv))}{_e(rel)}"
        c = _mapping(metrics.get("control"))
        cv = _num(c.get(key)) if c is not None else None
        if cv is not None:
            line += f", control {_e(_fmt(cv))}"
        items.append(f"<li>{line}</li>")
    if not items:
        return ""
    return f'<div class="summary"><h3>Fine-tuned RSAE at a glance</h3><ul>{"".join(items)}</ul></div>'


def _probing_info(probing: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The scalar parts of ``report["probing"]`` (k values, dense baseline); per-SAE details are in the table."""
    if not probing:
        return None
    out: dict[str, Any] = {}
    if probing.get("ks") is not None:
        out["ks"] = probing["ks"]
    dense = probing.get("dense_baseline")
    if isinstance(dense, Mapping):
        for k in ("metric", "accuracy", "n_classes", "n_train", "n_test"):
            if dense.get(k) is not None:
                out[f"dense baseline {k}"] = dense[k]
    elif _num(dense) is not None:
        out["dense baseline accuracy"] = dense
    for k, v in probing.items():
        if k not in ("ks", "dense_baseline", "by_sae") and (v is None or isinstance(v, (str, int, float))):
            out[k] = v
    return out or None


_CSS = """
:root { --fg:#1d2330; --muted:#5d6675; --line:#dfe3ea; --bg:#f6f7f9; --best:#e3f4e7; --bestfg:#14632d; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif;
       color:var(--fg); background:var(--bg); }
main { max-width:1160px; margin:0 auto; padding:28px 32px 48px; background:#fff; min-height:100vh; }
h1 { font-size:26px; margin:0 0 4px; }
h2 { font-size:19px; margin:34px 0 10px; padding-bottom:4px; border-bottom:2px solid var(--line); }
h3 { font-size:15px; margin:0 0 6px; }
.sub { color:var(--muted); margin:0 0 18px; }
.sub code { font-size:13px; }
code, pre { font-family:"DejaVu Sans Mono", Menlo, Consolas, monospace; }
.summary { background:#f1f5fc; border:1px solid #d5e0f2; border-radius:6px; padding:12px 18px; margin:12px 0; }
.summary ul { margin:0; padding-left:20px; }
table { border-collapse:collapse; }
table.metrics { width:100%; font-variant-numeric:tabular-nums; }
table.metrics caption { caption-side:bottom; text-align:left; color:var(--muted); font-size:13px; padding-top:6px; }
table.metrics th, table.metrics td { padding:6px 12px; border-bottom:1px solid var(--line); }
table.metrics thead th { text-align:right; vertical-align:bottom; font-size:14px; background:#fafbfc;
                         border-bottom:2px solid #c9ced8; }
table.metrics thead th:first-child { text-align:left; }
table.metrics thead code { color:var(--muted); font-size:12px; font-weight:normal; }
table.metrics tbody th { text-align:left; font-weight:600; white-space:nowrap; }
table.metrics td { text-align:right; }
table.metrics tr:hover td, table.metrics tr:hover th { background:#fafbfd; }
td.best { background:var(--best) !important; color:var(--bestfg); font-weight:700; }
td.lead { font-style:italic; color:var(--bestfg); }
td.l0-high { background:#fdecea !important; color:#9b2c1f; font-weight:700; }
.flag { display:inline-block; margin-top:3px; padding:1px 6px; border-radius:3px; background:#fdecea; color:#9b2c1f;
        font-size:11.5px; font-weight:600; }
.better { display:block; font-weight:normal; font-size:11px; color:var(--muted); }
.swatch { display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:6px; }
img.plot { display:block; max-width:100%; height:auto; margin:8px 0; }
.caption { color:var(--muted); font-size:13px; margin:2px 0 10px; }
.na { color:#8a5a00; background:#fff6e0; border:1px dashed #e5c477; border-radius:4px; padding:6px 10px;
      display:inline-block; margin:4px 8px 4px 0; font-size:14px; }
.notes li { margin:3px 0; }
.grid { display:grid; grid-template-columns:1fr 1fr; gap:10px 28px; }
table.kv { font-size:13.5px; width:100%; }
table.kv th { text-align:left; color:var(--muted); font-weight:600; padding:3px 12px 3px 0; vertical-align:top;
              white-space:nowrap; width:10.5em; }
table.kv td { padding:3px 0; overflow-wrap:anywhere; font-family:"DejaVu Sans Mono", Menlo, monospace;
              font-size:12.5px; }
details { margin:12px 0; border:1px solid var(--line); border-radius:6px; padding:6px 12px; background:#fbfbfc; }
summary { cursor:pointer; font-weight:600; }
pre { font-size:12px; overflow:auto; max-height:480px; }
footer { margin-top:36px; color:var(--muted); font-size:12px; }
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll("img.plot"));
  var ok = imgs.every(function (im) { return im.complete && im.naturalWidth > 0; });
  document.body.dataset.plotsCount = String(imgs.length);
  document.body.dataset.plotsOk = ok ? "true" : "false";
  document.body.dataset.pageHeight = String(document.documentElement.scrollHeight);
});
"""

_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)


def render_report_html(report: Mapping[str, Any]) -> str:
    """Render an evaluation report as one self-contained HTML page.

    Over 80 lines on purpose: it is the page's template, section by section in page order.

    Args:
        report: the content of ``report.json`` as a dict (a pydantic :class:`rsae.report.Report` is
            accepted too and dumped to JSON mode first). Reads ``metrics`` (required: ``{sae_name:
            {mse, fvu, fvu_about_zero, l0, alive_fraction, n_tokens, ce_clean, ce_spliced, ce_zero,
            delta_ce, loss_recovered, kl, ce_tokens, probe_accuracy?: {k: acc}}}``, values may be null)
            and, each optional: ``teacher``, ``host_model``, ``config``, ``notes``, ``created_at``,
            ``schema_version``, ``timings_s``, ``versions``, ``data``, ``eval_split``, ``remez``,
            ``calibration``, ``finetune`` (incl. ``curve``), ``control`` (incl. ``curve``),
            ``probing`` (``ks``, ``dense_baseline``), ``plots.gate`` (``h``, ``teacher``, ``rsae_init``,
            ``rsae``, ``latent``, ``theta``, ``note``) and ``plots.preact_hist`` (``edges``, ``counts``,
            ``log``, ``of``; ``plots.gate.hist`` is used when ``plots.preact_hist`` is absent),
            ``comparisons`` (the paired delta CE differences that decide the best cells) and
            ``latent_identity`` (:class:`rsae.report.LatentIdentitySection`).
            Unknown keys are ignored.

    Returns:
        The HTML document (str). Missing or malformed optional parts appear as ``not available``
        markers; all strings from the report are HTML-escaped; the page references no external URL.

    Raises:
        TypeError: ``report`` is not a mapping (or pydantic model).
        ValueError: ``report["metrics"]`` is missing, not a mapping, empty, or an entry is not a mapping.
    """
    if hasattr(report, "model_dump") and not isinstance(report, Mapping):
        report = report.model_dump(mode="json")
    if not isinstance(report, Mapping):
        raise TypeError(f"report must be a mapping, got {type(report).__name__}")
    metrics = report.get("metrics")
    if not isinstance(metrics, Mapping) or not metrics:
        raise ValueError("report['metrics'] must be a non-empty mapping of SAE name -> metrics")
    bad = [str(k) for k, v in metrics.items() if not isinstance(v, Mapping)]
    if bad:
        raise ValueError(f"report['metrics'] entries must be mappings; not for: {', '.join(bad)}")
    names = _sae_names(metrics)

    host = _mapping(report.get("host_model"))
    teacher = _mapping(report.get("teacher"))
    title = "RSAE evaluation report"
    if host and host.get("name") is not None:
        title += f" — {host.get('name')}"
        if host.get("layer") is not None:
            title += f", layer {host.get('layer')}"
    sub = []
    if host and host.get("hook"):
        sub.append(f"hook <code>{_e(host['hook'])}</code>")
    if teacher:
        arch = "/".join(str(teacher[k]) for k in ("family", "architecture") if teacher.get(k) is not None)
        dims = (
            f"{teacher.get('d_in')} → {teacher.get('d_sae')}"
            if teacher.get("d_in") is not None and teacher.get("d_sae") is not None
            else ""
        )
        sub.append(f"teacher {_e(arch)}{' SAE ' if arch else 'SAE '}{_e(dims)}".strip())
    sub.append(f"created {_e(report.get('created_at') or NA)}")
    sub.append(f"schema <code>{_e(report.get('schema_version') or NA)}</code>")

    notes = report.get("notes")
    if isinstance(notes, Sequence) and not isinstance(notes, (str, bytes)) and notes:
        notes_html = '<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"
    else:
        notes_html = _na("notes")

    remez = _mapping(report.get("remez"))
    finetune = _mapping(report.get("finetune"))
    control = _mapping(report.get("control"))
    ft_gate = _mapping((finetune or {}).get("gate"))
    config = report.get("config")
    if config is not None:
        cfg_json = json.dumps(config, indent=2, sort_keys=True, default=str)
        config_html = (
            f'<details id="config"><summary>Full job configuration (JSON)</summary><pre>{_e(cfg_json)}</pre></details>'
        )
    else:
        config_html = _na("job configuration")
    extra_json = {k: report.get(k) for k in ("data", "eval_split", "versions") if report.get(k) is not None}
    extra_html = ""
    if extra_json:
        extra_html = (
            f'<details id="data-split"><summary>Data, eval split and versions (JSON)</summary>'
            f"<pre>{_e(json.dumps(extra_json, indent=2, sort_keys=True, default=str))}</pre></details>"
        )

    sections = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">{" · ".join(sub)}</p>',
        _summary(metrics),
        '<h2 id="sec-metrics">Metrics</h2>',
        _metrics_table(metrics, names, _mapping(report.get("comparisons"))),
        '<h2 id="sec-comparisons">Paired comparisons</h2>',
        _comparisons_table(report.get("comparisons")),
        '<h2 id="sec-gate">Gate fit</h2>',
        _gate_plot(report),
        '<h2 id="sec-curves">Training curves</h2>',
        _curves_plot(report),
        '<h2 id="sec-bars">Downstream cost per SAE</h2>',
        _bars_plot(metrics, names),
        '<h2 id="sec-identity">Latent identity</h2>',
        _identity_html(report),
        '<h2 id="sec-notes">Notes</h2>',
        notes_html,
        '<h2 id="sec-provenance">Provenance</h2>',
        '<div class="grid"><div><h3>Teacher SAE</h3>',
        _kv_table(teacher, "teacher", keys=("family", "architecture", "d_in", "d_sae", "source", "sha256")),
        "</div><div><h3>Host model</h3>",
        _kv_table(host, "host model", keys=("name", "layer", "hook")),
        "</div></div>",
        '<h2 id="sec-settings">Settings</h2>',
        '<div class="grid"><div><h3>Remez fit</h3>',
        _kv_table(remez, "remez", keys=("a", "b", "max_error", "fit_mse", "p", "q", "c", "margin")),
        "</div><div><h3>Calibration</h3>",
        _kv_table(_mapping(report.get("calibration")), "calibration"),
        "</div><div><h3>Fine-tuning</h3>",
        _kv_table(finetune, "finetune", keys=("l1_coefficient", "l1_source", "steps"), skip=("curve", "gate")),
        (_kv_table(ft_gate, "fine-tuned gate") if ft_gate else ""),
        "</div><div><h3>Control</h3>",
        _kv_table({k: v for k, v in control.items() if k != "curve"} if control else None, "control"),
        "</div><div><h3>Probing</h3>",
        _kv_table(_probing_info(_mapping(report.get("probing"))), "probing"),
        "</div><div><h3>Timings (s)</h3>",
        _kv_table(_mapping(report.get("timings_s")), "timings"),
        "</div></div>",
        config_html,
        extra_html,
        "<footer>Generated by <code>rsae.report_html</code>. Self-contained: no external resources.</footer>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f'<body data-report-schema="{_e(report.get("schema_version") or "")}" '
        f'data-saes="{_e(" ".join(names))}">\n<main id="report">\n'
        + "\n".join(s for s in sections if s)
        + f"\n</main>\n<script>{_SCRIPT}</script>\n</body>\n</html>\n"
    )


def write_report_html(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Render ``report`` (see :func:`render_report_html`) and write it to ``path`` atomically.

    The page is written to a temporary file in the same directory and moved over ``path`` with
    ``os.replace``, so readers never see a partial file. Missing parent directories are created.

    Args:
        report: the report dict (or pydantic ``Report``).
        path: destination file, e.g. ``<out_dir>/report.html``.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Raises:
        TypeError, ValueError: as :func:`render_report_html` (nothing is written then).
        OSError: the file cannot be written or moved (the temporary file is removed).
    """
    text = render_report_html(report)
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return dest
