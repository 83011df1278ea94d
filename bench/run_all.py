"""Run every benchmark of issue 14 and write ``docs/benchmarks.md`` plus the raw figures as JSON.

    .venv/bin/python bench/run_all.py                 # full sizes: docs/benchmarks.md, bench/results/<date>.json
    .venv/bin/python bench/run_all.py --quick         # tiny sizes, a temporary folder (printed), not the docs
    .venv/bin/python bench/run_all.py --quick --doc docs/benchmarks.md --json-dir bench/results
    .venv/bin/python bench/run_all.py --only finetune_step,scaling
    .venv/bin/python bench/run_all.py --only api_load --api-baseline f10c9af   # section 5, before/after interleaved

With ``--only`` and an existing document, only the sections of the benchmarks run are replaced (and the target
lines they decide); the rest of ``docs/benchmarks.md`` is kept as it is. Each replaced section names the command,
date, load and raw-figures JSON of the run it comes from.

Each benchmark is a module ``bench/<name>.py`` with ``run(quick: bool) -> list[dict]`` (one dict per figure:
``bench``, ``name``, ``value``, ``unit`` and its parameters). :data:`MODULES` lists them in order; a module that does
not exist (yet) is reported as skipped, one that raises as failed (the others still run; exit status 1).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import math
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

try:
    from bench.common import ROOT, machine_info
except ModuleNotFoundError:  # run as a script
    from common import ROOT, machine_info  # type: ignore[no-redef]

MODULES: list[tuple[str, str]] = [
    ("finetune_step", "1. Fine-tuning throughput: RSAE step vs SAELens's training step"),
    ("sparse_step", "1b. Dense vs sparse-aware RSAE step"),
    ("extraction", "2. Extraction: truncated vs full forward vs SAELens's ActivationsStore"),
    ("upgrade", "3. Whole upgrade vs SAELens training the teacher"),
    ("evaluation", "4. Evaluation: time per SAE column, what dominates, cached vs recomputed lower blocks"),
    ("api_load", "5. API latency under load"),
    ("scaling", "6. Scaling of the step with d_sae and batch"),
    ("encode_latency", "7. Encode latency (POST /v1/jobs/{id}/encode, 128-token text)"),
    ("stream", "8. Streamed fine-tuning: peak RSS vs training tokens"),
]
"""(module under bench/, section title), in the order they run."""


def run_module(name: str, quick: bool, **kwargs: Any) -> dict[str, Any]:
    """Import ``bench.<name>`` and run it (``run(quick, **kwargs)``): ``{"status": "ok"|"skipped"|"failed",
    "seconds", "figures"|"reason"}``."""
    try:
        mod = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as e:
        if e.name in (f"bench.{name}", name):
            return {"status": "skipped", "reason": f"bench/{name}.py does not exist", "seconds": 0.0}
        raise
    t0 = time.perf_counter()
    try:
        figs = mod.run(quick, **kwargs)
    except Exception as e:  # noqa: BLE001 - one benchmark's failure is reported; the others run
        traceback.print_exc()
        return {"status": "failed", "reason": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}
    return {"status": "ok", "seconds": time.perf_counter() - t0, "figures": figs}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        a = abs(v)
        return f"{v:.3g}" if a < 10 else f"{v:,.0f}" if a >= 1000 else f"{v:.1f}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    return str(v).replace("|", "/")


def table(figs: list[dict]) -> str:
    """A markdown table of figures: name, value, unit, then every other key that occurs (first-seen order)."""
    skip = {"bench", "name", "value", "unit"}
    cols: list[str] = []
    for f in figs:
        cols += [k for k in f if k not in skip and k not in cols]
    lines = ["| figure | value | unit | " + " | ".join(cols) + " |", "|---|---:|---|" + "---|" * len(cols)]
    for f in figs:
        cells = [str(f.get("name", "")), _fmt(f.get("value")), f.get("unit", "")] + [_fmt(f.get(c)) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(results: dict[str, dict]) -> list[str]:
    """The issue's targets that the figures decide, one markdown bullet each (met, or the gap)."""

    def figs(mod: str, name: str) -> list[dict]:
        r = results.get(mod, {})
        return [f for f in r.get("figures", []) if f.get("name") == name and f.get("value") is not None]

    out = []
    sp = figs("finetune_step", "speedup_vs_saelens")
    if sp:
        worst = min(sp, key=lambda f: f["value"])
        out.append(f"- Fine-tune tokens/s >= 2x SAELens: worst {worst['value']:.2f}x ({worst['family']}, batch "
                   f"{worst['batch']}, d_sae {worst['d_sae']}, peer {worst['peer']}): "
                   f"{'met' if worst['value'] >= 2 else 'NOT met'}")  # fmt: skip
    ex = [f for f in figs("extraction", "speedup_truncated_vs_full") if f["layer"] <= 8]
    if ex:
        worst = min(ex, key=lambda f: f["value"])
        out.append(f"- Extraction >= 3x a full forward at layer <= 8: worst {worst['value']:.2f}x (layer "
                   f"{worst['layer']}): {'met' if worst['value'] >= 3 else 'NOT met'}")  # fmt: skip
    rss = figs("extraction", "extract_peak_rss_ratio")
    if rss:
        v = rss[0]["value"]
        out.append(f"- Extraction peak RSS at 1M within 10% of 100k: {rss[0]['tokens']} tokens: {v:.2f}x: "
                   f"{'met' if v <= 1.1 else 'NOT met'}")  # fmt: skip
    srss = figs("stream", "stream_peak_rss_ratio")
    if srss:
        v = srss[0]["value"]
        out.append(f"- Streamed fine-tune peak RSS at 1M within 10% of 100k: {srss[0]['tokens']} tokens: {v:.2f}x: "
                   f"{'met' if v <= 1.1 else 'NOT met'}")  # fmt: skip
    up = figs("upgrade", "upgrade_over_saelens")
    if up:
        v = up[0]["value"]
        verdict = "met" if v <= 0.5 else "NOT met"
        out.append(f"- Whole upgrade <= 0.5x SAELens training the teacher: {v:.2f}x: {verdict}")
    ev = figs("evaluation", "evaluate_share_of_job")
    if ev:
        v = ev[0]["value"]
        out.append(f"- Evaluate <= 15% of the job: {v:.0%}: {'met' if v <= 0.15 else 'NOT met'}")
    out += api_targets(results.get("api_load", {}).get("figures", []))
    return out


def api_targets(rows: list[dict]) -> list[str]:
    """The API targets of issue 14 per backend and code (``current``, or the ``--api-baseline``): saturation
    throughput of authenticated ``GET /v1/jobs/{id}`` >= 0.5x ``/healthz``'s (same process, no streams, and with
    100 streams); ``GET /v1/jobs/{id}`` p99 <= 20 ms at 200 requests/s with 100 open streams, zero errors."""
    out = []
    for s in (r for r in rows if r.get("bench") == "api_load_summary"):
        v = s["get_job_over_healthz"]
        out.append(f"- API ({s['backend']}, {s['code']}, {s['streams']} streams): GET /v1/jobs/{{id}} throughput "
                   f"{v:.2f}x /healthz's (target >= 0.5): {'met' if v >= 0.5 else 'NOT met'}")  # fmt: skip
    for r in rows:
        if r.get("bench") == "api_load" and r.get("endpoint") == "get_job" and r.get("rate_rps") == 200.0:
            if r.get("streams") != 100 or r.get("p99_ms") is None:
                continue
            ok = r["p99_ms"] <= 20 and r["errors"] == 0 and r.get("streams_open") == 100
            out.append(f"- API ({r['backend']}, {r['code']}): GET /v1/jobs/{{id}} at 200/s with "
                       f"{r.get('streams_open')} open streams: p99 {r['p99_ms']:.1f} ms, {r['errors']} errors, "
                       f"{r['throughput_rps']:.0f}/s served (target p99 <= 20 ms, 0 errors): "
                       f"{'met' if ok else 'NOT met'}")  # fmt: skip
    for r in rows:
        if r.get("bench") == "api_load" and "skipped" in r:
            out.append(f"- API ({r.get('backend', 'all')}): skipped: {r['skipped']}")
    return out


def markdown(report: dict[str, Any]) -> str:
    """``docs/benchmarks.md`` from a run's report (machine, command, targets, one section per benchmark)."""
    m, quick = report["machine"], report["quick"]
    head = [
        "# Benchmarks",
        "",
        "Generated by `bench/run_all.py` (method: `bench/README.md`); raw figures: "
        f"`{report.get('json', '')}`. Do not edit by hand.",
        "",
    ]
    if quick:
        head += [
            "> **Quick, preliminary, machine busy.** Produced by `--quick`: tiny sizes, on a machine shared with "
            "other jobs (load average above). The figures prove that every benchmark runs; they say nothing about "
            "speed. Regenerate on a quiet machine with `bench/run_all.py` (full sizes).",
            "",
        ]
    head += [
        f"- Command: `{report['command']}`",
        f"- Date (UTC): {m['date_utc']}; wall time of the run {report['seconds']:.0f} s",
        f"- CPU: {m['cpu']}, {m['logical_cores']} logical cores, torch threads {m['torch_threads']}, "
        f"RAM {(m['ram_bytes'] or 0) / 2**30:.0f} GiB, load average (1 min) at start {m['load_avg_1m']:.2f}",
        f"- GPU: {m['gpu'] or 'none'}",
        f"- Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, sae-lens {m['sae_lens']}",
        "",
        "## Targets (issue 14)" + (" -- quick sizes: these verdicts decide nothing" if quick else ""),
        "",
        *(targets(report["results"]) or ["- (no figures decide a target in this run)"]),
        "",
    ]
    body = []
    for name, title in MODULES:
        r = report["results"].get(name)
        if r is None:
            continue
        body += [f"## {title}", "", f"`bench/{name}.py` -- {r['status']}, {r['seconds']:.0f} s", ""]
        run = r.get("run")
        if run and (run["command"] != report["command"] or report.get("only")):
            body += [
                f"Run on its own: `{run['command']}`, {run['date_utc']}, load average (1 min) at start "
                f"{run['load_avg_1m']:.2f}, {'quick' if run['quick'] else 'full'} sizes; raw figures "
                f"`{report.get('json', '')}`.",
                "",
            ]
        if r["status"] != "ok":
            body += [f"{r['status']}: {r.get('reason')}", ""]
            continue
        body += [table(r["figures"]) if r["figures"] else "(no figures)", ""]
    return "\n".join(head + body)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks, write the JSON and the markdown; 1 if any benchmark failed."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, under a minute on an idle machine")
    ap.add_argument("--only", default=None, help="comma list of module names (default: all of MODULES)")
    ap.add_argument("--doc", type=Path, default=None, help="markdown out (default: docs/benchmarks.md; quick: temp)")
    ap.add_argument("--json-dir", type=Path, default=None, help="JSON folder (default: bench/results; quick: temp)")
    ap.add_argument("--from-json", type=Path, default=None, help="no run: write the document from this raw-figures "
                    "JSON of an earlier run (with --only: splice those sections)")  # fmt: skip
    ap.add_argument("--api-baseline", default=None, help="api_load: a git ref whose API also runs, interleaved")
    ap.add_argument("--api-plan", choices=("full", "targets"), default="full", help="api_load: the full plan, or "
                    "only the runs the targets read (saturation of both GETs, GET /jobs/{id} at 200/s)")  # fmt: skip
    a = ap.parse_args(argv)
    names = [n for n, _ in MODULES] if not a.only else [n.strip() for n in a.only.split(",")]
    unknown = set(names) - {n for n, _ in MODULES}
    if unknown:
        ap.error(f"unknown benchmark(s) {sorted(unknown)}; known: {[n for n, _ in MODULES]}")
    tmp = Path(tempfile.mkdtemp(prefix="rsae-bench-")) if a.quick else None
    doc = a.doc or (tmp / "benchmarks.md" if tmp else ROOT / "docs" / "benchmarks.md")
    json_dir = a.json_dir or (tmp if tmp else ROOT / "bench" / "results")
    json_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_json = json_dir / f"{'quick' if a.quick else 'full'}-{stamp}.json"
    argv_shown = sys.argv[1:] if argv is None else argv
    report: dict[str, Any] = {
        "command": shlex.join([".venv/bin/python", "bench/run_all.py", *argv_shown]),
        "quick": a.quick,
        "machine": machine_info(),
        "results": {},
        "json": _rel(out_json),
    }
    report["only"] = bool(a.only)
    t0 = time.perf_counter()
    if a.from_json is not None:
        report = {**json.loads(a.from_json.read_text()), "json": _rel(a.from_json), "only": bool(a.only)}
        names = []
    for name in names:
        print(f"[run_all] {name} ...", file=sys.stderr, flush=True)
        kwargs: dict[str, Any] = {}
        if name == "api_load" and not a.quick:
            from bench.api_load import full_plan, targets_plan

            kwargs = {"baseline": a.api_baseline, "plan": targets_plan() if a.api_plan == "targets" else full_plan()}
        r = run_module(name, a.quick, **kwargs)
        r["run"] = {
            "command": report["command"],
            "date_utc": report["machine"]["date_utc"],
            "load_avg_1m": report["machine"]["load_avg_1m"],
            "quick": a.quick,
        }
        report["results"][name] = r
        print(f"[run_all] {name}: {r['status']} in {r['seconds']:.1f} s", file=sys.stderr, flush=True)
    if a.from_json is None:
        report["seconds"] = time.perf_counter() - t0
        out_json.write_text(json.dumps(report, indent=1, default=str))
    doc.parent.mkdir(parents=True, exist_ok=True)
    if a.only and doc.exists():
        doc.write_text(spliced(doc.read_text(), report))
    else:
        doc.write_text(markdown(report) + "\n")
    print(json.dumps({"doc": str(doc), "json": report["json"]}))
    return 1 if any(r["status"] == "failed" for r in report["results"].values()) else 0


def spliced(text: str, report: dict[str, Any]) -> str:
    """``text`` (the current document) with the sections of the benchmarks in ``report`` replaced by this run's,
    and its target lines of those benchmarks (``- API ...`` for ``api_load``) replaced by the run's verdicts; a
    section missing from ``text`` is appended. The other sections and lines stay as they are."""
    one = markdown(report).split("\n")
    new_targets = [ln for ln in one if ln.startswith("- API")]
    lines = text.rstrip("\n").split("\n")
    if "api_load" in report["results"]:
        lines = [ln for ln in lines if not ln.startswith("- API")]
        at = next((i for i, ln in enumerate(lines) if ln.startswith("## Targets")), None)
        if at is not None:
            end = next(i for i in range(at + 2, len(lines) + 1) if i == len(lines) or not lines[i].startswith("- "))
            lines[end:end] = new_targets
    for name, title in MODULES:
        if name not in report["results"]:
            continue
        head = f"## {title}"
        i0 = one.index(head)
        i1 = next((i for i in range(i0 + 1, len(one)) if one[i].startswith("## ")), len(one))
        section = one[i0:i1]
        if head in lines:
            j0 = lines.index(head)
            j1 = next((j for j in range(j0 + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
            lines[j0:j1] = section
        else:
            lines += ["", *section]
    return "\n".join(lines) + "\n"


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


if __name__ == "__main__":
    sys.exit(main())
