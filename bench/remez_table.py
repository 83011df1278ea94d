"""Measured trade-off tables for the relaxed Remez fit (``rsae/remez.py``), pasted into ``docs/remez.md``.

Run from the repository root:  .venv/bin/python bench/remez_table.py   (about 1-2 minutes on 2 cores)
Sections can be named: ``... remez_table.py tradeoff relu``; ``sweep`` (robustness over the whole c x delta
range, ~7 minutes) runs only when named.

All errors are in unit-interval gate units (the jump of the JumpReLU target t * H(t - c) has size c);
"fit MSE" is over the fitted grid points (margin excluded), the figure comparable with the RSAE summary.
Seconds are wall-clock on the machine that runs the script (CPU shared with other processes).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsae.remez import alternation_count, default_fit_params, fit_grid, remez_fit, target_gate  # noqa: E402

logging.disable(logging.WARNING)
DEGREES = [(3, 2), (5, 4), (7, 6), (9, 8)]


def timed(*args, **kw):
    t0 = time.perf_counter()
    fit = remez_fit(*args, **kw)
    return fit, time.perf_counter() - t0


def table_tradeoff():
    print("## Table 1: JumpReLU target, c x delta x degree (4,001-point grid)\n")
    print(
        "| c | delta | rho=delta/c | (p,q) | max error | max err / c | fit MSE | iters | LPs | seconds "
        "| certified | float32 max err / max err |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in (0.1, 0.25, 0.5):
        for d in (0.01, 0.025, 0.05, 0.1):
            for p, q in DEGREES:
                f, s = timed("jumprelu", c=c, p=p, q=q, margin=d)
                print(
                    f"| {c} | {d} | {d / c:.2f} | ({p},{q}) | {f.max_error:.3e} | {f.max_error / c:.2e} | "
                    f"{f.fit_mse:.2e} | {f.iterations} | {f.lp_solves} | {s:.2f} | "
                    f"{'yes' if f.converged else 'NO'} | {f.max_error_float32 / f.max_error:.2f} |",
                    flush=True,
                )
    print()


def table_rule():
    print("## Table 2: the default rule delta = 0.1 c at (9, 8), for the c the service may choose\n")
    print(
        "| c | delta | band in h (x theta) | h range covered (x theta) | max error | max err / c | fit MSE "
        "| seconds | certified | float32 max err |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6):
        prm = default_fit_params("jumprelu", c=c)
        f, s = timed("jumprelu", **prm)
        print(
            f"| {c} | {prm['margin']:.4f} | (0.90, 1.10) | [-{1 / c:.3g}, {1 / c:.3g}] | {f.max_error:.3e} | "
            f"{f.max_error / c:.2e} | {f.fit_mse:.2e} | {s:.2f} | {'yes' if f.converged else 'NO'} | "
            f"{f.max_error_float32:.3e} |",
            flush=True,
        )
    print()


def table_fine_delta():
    print("## Table 3: where the summary's 2.4e-6 lies, c = 0.25, (9, 8)\n")
    print("| delta | rho | max error | fit MSE | grid MSE (margin incl.) |")
    print("|---|---|---|---|---|")
    for d in (0.01, 0.0125, 0.015, 0.0175, 0.02, 0.0225, 0.025, 0.03, 0.04, 0.05):
        f, _ = timed("jumprelu", c=0.25, p=9, q=8, margin=d)
        print(f"| {d} | {d / 0.25:.3f} | {f.max_error:.3e} | {f.fit_mse:.2e} | {f.grid_mse:.2e} |", flush=True)
    print()


def table_classes():
    print("## Table 4: safe class (B >= 0) vs plain rationals (Q > 0 on the fitted grid), c = 0.25, delta = 0.025\n")
    print("| (p,q) | class | max error | fit MSE | alternation (1 %) | p+q+2 | seconds |")
    print("|---|---|---|---|---|---|---|")
    t, mask = fit_grid(4001, 0.25, 0.025)
    g = target_gate("jumprelu", 0.25)(t)
    for p, q in DEGREES:
        for safe in (True, False):
            f, s = timed("jumprelu", c=0.25, p=p, q=q, margin=0.025, safe=safe)
            alt = alternation_count((g - f(t))[mask], rel=0.01)
            print(
                f"| ({p},{q}) | {'safe' if safe else 'plain'} | {f.max_error:.3e} | {f.fit_mse:.2e} | {alt} | "
                f"{p + q + 2} | {s:.2f} |",
                flush=True,
            )
    print()


def table_relu():
    print("## Table 5: ReLU, the summary's 3.8e-7\n")
    print("| (p,q) | margin around 0 | max error | fit MSE | grid MSE (margin incl.) |")
    print("|---|---|---|---|---|")
    for p, q in [(3, 2), (5, 4), (7, 6), (8, 7), (9, 8)]:
        f, _ = timed("relu", p=p, q=q)
        print(f"| ({p},{q}) | 0 | {f.max_error:.3e} | {f.fit_mse:.2e} | {f.grid_mse:.2e} |", flush=True)
    for m in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5):
        f, _ = timed("relu", p=3, q=2, margin=m)
        print(f"| (3,2) | {m} | {f.max_error:.3e} | {f.fit_mse:.2e} | {f.grid_mse:.2e} |", flush=True)
    # the margin at which the (3, 2) fit MSE reaches 3.8e-7 (fit MSE decreases with the margin)
    lo, hi = 0.0, 0.9
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        if remez_fit("relu", p=3, q=2, margin=mid).fit_mse > 3.8e-7:
            lo = mid
        else:
            hi = mid
    f = remez_fit("relu", p=3, q=2, margin=hi)
    print(
        f"\n(3,2) fit MSE = 3.8e-7 needs a margin of {hi:.4f} around t = 0 (fitted set "
        f"[-1, -{hi:.3f}] U [{hi:.3f}, 1]; there: max error {f.max_error:.3e}, fit MSE {f.fit_mse:.2e}).\n"
    )


def table_extrapolation():
    print("## Table 6: the default JumpReLU fit outside [-1, 1] (real h beyond theta / c)\n")
    f = remez_fit("jumprelu", **default_fit_params("jumprelu"))
    print("| t range | h range (x theta) | max abs(r(t) - g(t)) |")
    print("|---|---|---|")
    for lo, hi in [
        (1.0, 1.05),
        (1.0, 1.1),
        (1.0, 1.25),
        (1.0, 1.5),
        (1.0, 2.0),
        (1.0, 5.0),
        (-2.0, -1.0),
        (-5.0, -1.0),
    ]:
        t = np.linspace(lo, hi, 4001)
        e = np.max(np.abs(f(t) - target_gate("jumprelu", f.c)(t)))
        print(f"| [{lo}, {hi}] | [{lo / f.c:g}, {hi / f.c:g}] | {e:.2e} |")
    print(
        f"\nInside [-1, 1] (fitted points): {f.max_error:.2e}. Asymptotic slope a_p / abs(b_q) = "
        f"{f.a[-1] / abs(f.b[-1]):.3f} (target: 1).\n"
    )


def sweep():
    """Robustness over the whole range the service may use (optional: ~7 minutes)."""
    print(
        "## Robustness sweep: c in {0.05, 0.1, 0.15, 0.25, 0.35, 0.5, 0.6} x delta in {0.005, 0.01, 0.025, "
        "0.05, 0.1, 0.2}\n"
    )
    print(
        "| (p,q) | fits | certified | error below the next-lower degree's | median s | max s | max float32 err / err |"
    )
    print("|---|---|---|---|---|---|---|")
    rows = {pq: [] for pq in DEGREES + [(11, 10)]}
    for c in (0.05, 0.1, 0.15, 0.25, 0.35, 0.5, 0.6):
        for d in (0.005, 0.01, 0.025, 0.05, 0.1, 0.2):
            prev = np.inf
            for pq in DEGREES + [(11, 10)]:
                f, s = timed("jumprelu", c=c, p=pq[0], q=pq[1], margin=d)
                rows[pq].append((f.converged, f.max_error < prev, s, f.max_error_float32 / f.max_error))
                prev = f.max_error
    for pq, r in rows.items():
        conv, mono, sec, f32 = (np.array(x) for x in zip(*r))
        print(
            f"| {pq} | {len(r)} | {conv.sum()} | {mono.sum()} | {np.median(sec):.2f} | {sec.max():.1f} | "
            f"{f32.max():.3g} |",
            flush=True,
        )
    print()


def timing():
    print("## Timing of the default fits (5 repeats each)\n")
    for fam in ("relu", "jumprelu", "topk"):
        prm = default_fit_params(fam)
        ts = []
        for _ in range(5):
            f, s = timed(fam, **prm)
            ts.append(s)
        print(
            f"- {fam} {prm}: median {np.median(ts):.2f} s, max {max(ts):.2f} s; max error {f.max_error:.4e}, "
            f"fit MSE {f.fit_mse:.3e}, certified {f.converged}, iterations {f.iterations}, LPs {f.lp_solves}, "
            f"min B on [-1, 1] {f.min_b:.1e}, float32 max error {f.max_error_float32:.4e}"
        )
    print()


if __name__ == "__main__":
    which = sys.argv[1:] or ["timing", "rule", "fine", "classes", "relu", "extrapolation", "tradeoff"]
    for name in which:
        {
            "tradeoff": table_tradeoff,
            "rule": table_rule,
            "fine": table_fine_delta,
            "classes": table_classes,
            "relu": table_relu,
            "extrapolation": table_extrapolation,
            "timing": timing,
            "sweep": sweep,
        }[name]()
