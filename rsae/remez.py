"""Relaxed Remez exchange: minimax rational fit of a teacher's scalar gate on a dense grid.

Problem. Given a target g on the grid G = {t_i} (``grid_points`` equispaced points of [-1, 1], minus the
margin (c - delta, c + delta) around a jump at c), find

    r(t) = P(t) / Q(t),   P(t) = a_0 + ... + a_p t^p,   Q(t) = 1 + B(t),   B(t) = b_1 t + ... + b_q t^q

minimising E(r) = max_i |g(t_i) - r(t_i)|, under the *safe-denominator* constraint B(t_i) >= 0 on G, so
that the RSAE's gate ``P / (1 + |B|)`` (Molina et al. 2020, "Padé Activation Units", safe PAU) equals the
fitted r on the whole fitted set and has no poles anywhere.

Algorithm (the "relaxation" of the classical Remez algorithm, documented here because the RSAE paper does
not give it):

1. Reference set X_0: ``2 (p + q + 2)`` grid points nearest to Chebyshev extreme points of the fitted
   interval(s).
2. Inner solve on X_k: the exact minimax rational on the finite set X_k by the *differential correction*
   algorithm (Cheney & Loeb 1961; Barrodale, Powell & Roberts 1972, SIAM J. Numer. Anal. 9, "The
   differential correction algorithm for rational l_inf approximation"): each iteration solves one linear
   program (scipy ``linprog``, HiGHS) in (a, b, z), with the normalisation |b_j| <= 1 and b_0 >= 1e-9,
   and stops when the LP cannot lower the error (z >= -1e-14 relative). This replaces Remez's nonlinear
   levelled-error equations, which are ill-posed for non-smooth targets.
3. Exchange (multiple exchange, Remez's second algorithm in cutting-plane form, cf. Reemtsen 1990,
   "Discretization methods for semi-infinite programming"): evaluate the error on all of G; add every
   local maximum of |error| that exceeds the reference error delta_k to the reference set (old points are
   kept, so delta_k is non-decreasing).
4. Stop when E_k = max_G |error| <= (1 + tol) * delta_k, or after ``max_iter`` exchanges. Because the
   minimax error on X_k is a lower bound of the minimax error on G, ``[delta_k, E_k]`` brackets the true
   grid optimum (under the same safe-denominator constraint): the returned fit is certified to within
   ``tol`` of optimal.

:func:`grid_minimax_bisection` gives the unconstrained optimum on G (Q > 0 only) by bisection on epsilon
with an LP feasibility test, the independent check that ``rsae-method.md`` asks for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.optimize import linprog

log = logging.getLogger(__name__)


def target_gate(family: str, c: float = 0.0) -> Callable[[np.ndarray], np.ndarray]:
    """Scalar target g(t) = t * H(t - c) of a teacher family on the unit interval.

    ReLU: c = 0. JumpReLU / TopK: c is the (scaled) jump position. H(0) = 0 convention (the jump's value is
    excluded from the fit anyway by the margin).
    """
    if family not in ("relu", "jumprelu", "topk"):
        raise ValueError(f"unknown family {family!r}")
    cc = 0.0 if family == "relu" else float(c)
    return lambda t: np.where(t > cc, t, 0.0)


@dataclass
class RationalFit:
    """Result of :func:`remez_fit`.

    Attributes:
        a: numerator coefficients a_0..a_p (monomial basis, ascending).
        b: denominator coefficients b_1..b_q of B(t); Q = 1 + |B|.
        max_error: E = max |g - r| on the fitted grid.
        ref_error: delta = minimax error on the final reference set (lower bound of the grid optimum).
        grid_mse: mean of (g - r)^2 on the whole grid of ``grid_points`` points (margin included), the
            figure the RSAE summary quotes.
        fit_mse: mean of (g - r)^2 on the fitted grid (margin excluded).
        iterations: exchange iterations; reference_size: final |X|.
        family, c, margin, p, q, grid_points: the inputs.
    """

    a: list[float]
    b: list[float]
    max_error: float
    ref_error: float
    grid_mse: float
    fit_mse: float
    iterations: int
    reference_size: int
    family: str
    c: float
    margin: float
    p: int
    q: int
    grid_points: int
    converged: bool

    def __call__(self, t: np.ndarray) -> np.ndarray:
        return rational_eval(np.asarray(self.a), np.asarray(self.b), t)


def rational_eval(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """r(t) = P(t) / (1 + |B(t)|) with P = sum a_k t^k, B = sum_{k>=1} b_k t^k (numpy, float64)."""
    t = np.asarray(t, dtype=np.float64)
    P = np.polynomial.polynomial.polyval(t, a)
    B = np.polynomial.polynomial.polyval(t, np.concatenate([[0.0], b])) if len(b) else 0.0 * t
    return P / (1.0 + np.abs(B))


def fit_grid(grid_points: int, c: float, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """``(grid, fitted)``: the equispaced grid on [-1, 1] and the mask of points outside (c-margin, c+margin)."""
    t = np.linspace(-1.0, 1.0, grid_points)
    mask = np.ones_like(t, dtype=bool) if margin <= 0 else ~((t > c - margin) & (t < c + margin))
    return t, mask


def _vander(x: np.ndarray, deg: int) -> np.ndarray:
    return np.vander(x, deg + 1, increasing=True)


def _dc_solve(x: np.ndarray, f: np.ndarray, p: int, q: int, *, safe: bool = True,
              max_iter: int = 100) -> tuple[np.ndarray, np.ndarray, float]:
    """Differential correction on the finite set x: minimax rational (p, q). Returns (a, b_full, delta),
    b_full = (b_0..b_q) with b_0 > 0 (not yet normalised)."""
    m = len(x)
    Vp, Vq = _vander(x, p), _vander(x, q)
    # start from the least-squares polynomial (Q = 1)
    a = np.linalg.lstsq(Vp, f, rcond=None)[0]
    bq = np.zeros(q + 1)
    bq[0] = 1.0
    Qk = Vq @ bq
    delta = np.max(np.abs(f - (Vp @ a) / Qk))
    nv = p + 1 + q + 1 + 1  # a, b, z
    c = np.zeros(nv)
    c[-1] = 1.0
    bounds = [(None, None)] * (p + 1) + [(1e-9, 1.0)] + [(-1.0, 1.0)] * q + [(None, None)]
    for _ in range(max_iter):
        # (f Q - P) - delta Q <= z Qk ;  -(f Q - P) - delta Q <= z Qk
        A1 = np.hstack([-Vp, (f - delta)[:, None] * Vq, -Qk[:, None]])
        A2 = np.hstack([Vp, (-f - delta)[:, None] * Vq, -Qk[:, None]])
        rows = [A1, A2]
        if safe and q > 0:  # B(x) = Q(x) - b_0 >= 0
            rows.append(np.hstack([np.zeros((m, p + 1)), np.zeros((m, 1)), -Vq[:, 1:], np.zeros((m, 1))]))
        A = np.vstack(rows)
        res = linprog(c, A_ub=A, b_ub=np.zeros(A.shape[0]), bounds=bounds, method="highs")
        if res.status != 0:
            break
        z = res.x[-1]
        if z >= -1e-14 * max(1.0, delta):
            break
        a_new, b_new = res.x[: p + 1], res.x[p + 1: p + q + 2]
        Q_new = Vq @ b_new
        if np.any(Q_new <= 0):
            break
        d_new = np.max(np.abs(f - (Vp @ a_new) / Q_new))
        if d_new >= delta:
            break
        a, bq, Qk, delta = a_new, b_new, Q_new, d_new
    return a, bq, float(delta)


def _local_maxima(err: np.ndarray) -> np.ndarray:
    """Indices of local maxima of |err| (plateaus and end points included)."""
    e = np.abs(err)
    left = np.concatenate([[-np.inf], e[:-1]])
    right = np.concatenate([e[1:], [-np.inf]])
    return np.nonzero((e >= left) & (e >= right))[0]


def alternation_count(err: np.ndarray, rel: float = 0.02) -> int:
    """Length of the longest sign-alternating sequence of points where |err| >= (1 - rel) * max|err|.

    Chebyshev's equioscillation theorem: a best (p, q) rational approximation of defect 0 has at least
    p + q + 2 such points (a degree-n polynomial: n + 2).
    """
    E = np.max(np.abs(err))
    idx = np.nonzero(np.abs(err) >= (1 - rel) * E)[0]
    count, last = 0, 0
    for i in idx:
        s = np.sign(err[i])
        if s != 0 and s != last:
            count += 1
            last = s
    return count


def remez_fit(family: str = "relu", *, c: float = 0.0, p: int = 3, q: int = 2, grid_points: int = 4001,
              margin: float = 0.0, tol: float = 1e-3, max_iter: int = 50, safe: bool = True) -> RationalFit:
    """Relaxed Remez fit of r = P/Q to the family's target gate on [-1, 1] (see module docstring).

    Args:
        family: ``relu`` | ``jumprelu`` | ``topk``; target g(t) = t * H(t - c) (c = 0 for relu).
        c: jump position in (-1, 1).
        p, q: numerator / denominator degrees.
        grid_points: equispaced grid size on [-1, 1] (the summary's 4,001).
        margin: half-width of the excluded interval around the jump.
        tol: relative optimality gap at which the exchange stops.
        max_iter: maximum exchange iterations.
        safe: require B >= 0 on the grid (safe denominator). False gives the plain Q > 0 class.

    Returns:
        :class:`RationalFit` with coefficients, certified error bracket [ref_error, max_error] and MSEs.

    Raises:
        ValueError: degrees or margin leave fewer than p + q + 2 fitted points.
    """
    g = target_gate(family, c)
    t, mask = fit_grid(grid_points, c, margin)
    x, f = t[mask], g(t[mask])
    if len(x) < p + q + 2:
        raise ValueError("too few fitted grid points for the requested degrees")
    n0 = min(len(x), 2 * (p + q + 2))
    cheb = np.cos(np.pi * np.arange(n0) / (n0 - 1))  # Chebyshev extreme points of [-1, 1]
    ref = np.unique(np.abs(x[None, :] - cheb[:, None]).argmin(axis=1))
    Vp_all, Vq_all = _vander(x, p), _vander(x, q)
    converged, it = False, 0
    a = np.zeros(p + 1)
    bq = np.eye(q + 1)[0]
    delta = E = math.inf
    for it in range(1, max_iter + 1):
        a, bq, delta = _dc_solve(x[ref], f[ref], p, q, safe=safe)
        err = f - (Vp_all @ a) / (Vq_all @ bq)
        E = float(np.max(np.abs(err)))
        if E <= (1 + tol) * delta:
            converged = True
            break
        cand = _local_maxima(err)
        cand = cand[np.abs(err[cand]) > delta]
        new = np.setdiff1d(cand, ref)
        if len(new) == 0:
            new = np.array([int(np.argmax(np.abs(err)))])
            if new[0] in ref:
                break
        ref = np.union1d(ref, new)
    b_norm = bq[1:] / bq[0]
    a_norm = a / bq[0]
    r_all = rational_eval(a_norm, b_norm, t)
    fit = RationalFit(
        a=a_norm.tolist(), b=b_norm.tolist(), max_error=E, ref_error=delta,
        grid_mse=float(np.mean((g(t) - r_all) ** 2)), fit_mse=float(np.mean((f - r_all[mask]) ** 2)),
        iterations=it, reference_size=int(len(ref)), family=family, c=float(c), margin=float(margin),
        p=p, q=q, grid_points=grid_points, converged=converged,
    )
    log.info("remez %s (p=%d,q=%d) c=%.3g: max err %.3e (ref %.3e), grid MSE %.3e, %d iters",
             family, p, q, c, E, delta, fit.grid_mse, it)
    return fit


def grid_minimax_bisection(family: str = "relu", *, c: float = 0.0, p: int = 3, q: int = 2,
                           grid_points: int = 4001, margin: float = 0.0, rtol: float = 1e-4,
                           safe: bool = False) -> float:
    """The best possible max error of a (p, q) rational on the fitted grid, by bisection on eps.

    Feasibility LP for eps: exists P, Q with |g Q - P| <= eps Q and Q >= 1 on the grid (Q > 0 normalised).
    With ``safe=True`` also B = Q - Q(0) >= 0 (the RSAE class). Used to judge :func:`remez_fit`.
    """
    g = target_gate(family, c)
    t, mask = fit_grid(grid_points, c, margin)
    x, f = t[mask], g(t[mask])
    m = len(x)
    Vp, Vq = _vander(x, p), _vander(x, q)

    def feasible(eps: float) -> bool:
        A = [np.hstack([-Vp, (f - eps)[:, None] * Vq]), np.hstack([Vp, (-f - eps)[:, None] * Vq]),
             np.hstack([np.zeros((m, p + 1)), -Vq])]
        bu = [np.zeros(m), np.zeros(m), -np.ones(m)]
        if safe and q > 0:
            A.append(np.hstack([np.zeros((m, p + 2)), -Vq[:, 1:]]))
            bu.append(np.zeros(m))
        res = linprog(np.zeros(p + q + 2), A_ub=np.vstack(A), b_ub=np.concatenate(bu),
                      bounds=[(None, None)] * (p + 1) + [(-1e6, 1e6)] * (q + 1), method="highs")
        return res.status == 0

    lo, hi = 0.0, float(np.max(np.abs(f - np.polynomial.polynomial.polyval(
        x, np.linalg.lstsq(Vp, f, rcond=None)[0]))))
    while hi - lo > rtol * hi:
        mid = 0.5 * (lo + hi)
        if feasible(mid):
            hi = mid
        else:
            lo = mid
    return hi


def cached_remez_fit(family: str, *, c: float, p: int, q: int, grid_points: int, margin: float,
                     tol: float = 1e-3, max_iter: int = 50, cache: Path | None = None) -> RationalFit:
    """:func:`remez_fit`, cached on disk as JSON keyed by (family, c, p, q, grid, margin, tol).

    A fit depends only on these inputs, so it is shared across jobs. ``cache`` defaults to
    ``rsae.models.cache_dir() / "remez"``.
    """
    from .models import cache_dir

    key = json.dumps([family, round(c, 12), p, q, grid_points, round(margin, 12), tol, max_iter, "v1"])
    folder = cache or cache_dir() / "remez"
    f = folder / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    if f.is_file():
        try:
            return RationalFit(**json.loads(f.read_text()))
        except (json.JSONDecodeError, TypeError):
            pass
    fit = remez_fit(family, c=c, p=p, q=q, grid_points=grid_points, margin=margin, tol=tol,
                    max_iter=max_iter)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(fit)))
    tmp.replace(f)
    return fit
