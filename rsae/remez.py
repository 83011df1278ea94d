"""Relaxed Remez exchange: minimax rational fit of a teacher's scalar gate on a dense grid.

Problem. Given a target g on the grid G = {t_i} (``grid_points`` equispaced points of [-1, 1], minus the
margin (c - delta, c + delta) around a jump at c), find

    r(t) = P(t) / Q(t),   P(t) = a_0 + ... + a_p t^p,   Q(t) = 1 + B(t),   B(t) = b_1 t + ... + b_q t^q

minimising E(r) = max_i |g(t_i) - r(t_i)|, under the *safe-denominator* constraint B(t) >= 0 on the whole
of [-1, 1] (margin included), so that the RSAE's gate ``P / (1 + |B|)`` (Molina, Schramowski & Kersting
2020, "Padé Activation Units", safe PAU) *is* the fitted r on [-1, 1]: no poles, no cusp of |B|, and a
smooth, monotone transition across the margin (measured, ``docs/remez.md``). Targets: g(t) = t * H(t - c)
(ReLU: c = 0; JumpReLU / TopK: c > 0 the jump, of size c). The RSAE paper (Yin & Yu 2026, as summarised in
``/work/shared/docs/rsae-method.md`` section 3) names a "relaxed Remez exchange" but does not define it;
the definition used here, with the source of each choice, follows. ``docs/remez.md`` has the measurements.

Relaxation (the margin). A jump cannot be approximated uniformly, so the points in (c - delta, c + delta)
are excluded from G; the fit is a minimax problem on the closed set [-1, c - delta] U [c + delta, 1]
(discretised; best approximation on general closed sets: Powell 1981, "Approximation Theory and Methods",
ch. 7 and 10). Default delta = ``MARGIN_RHO * c`` = 0.1 c (relative rule): in the RSAE a JumpReLU latent j
uses t = h / s_j with s_j = theta_j / c, so the unfitted band is h in theta_j (1 - rho, 1 + rho) for every
latent and every c. See :func:`default_fit_params`.

Safe-denominator class. Q = Q(0) + B with B >= 0 means Q has its global minimum at t = 0; this forces
B'(0) = 0, which is imposed as a linear equality (it is implied on a dense grid anyway, up to |b_1| <=
b_2 h, and it makes B >= 0 hold *between* grid points near 0). The class is therefore not the classical
rational class R(p, q): its minimax error for the jump targets is about 6-7x that of unconstrained
rationals from (5, 4) to (9, 8), and its best approximation does *not* show Chebyshev's p + q + 2-point
equioscillation: the safe fits measured equioscillate on p + q points (p + q + 1 at (3, 2)), while the
unconstrained fit (``safe=False``) shows the classical p + q + 2 (Achieser 1956, "Theory of
Approximation", ch. II; Trefethen 2019, "Approximation Theory and Approximation Practice" (ATAP), ch. 24).

Algorithm.

1. Internal basis: P = sum alpha_k T_k(t), Q = beta_0 + sum_{k>=1} beta_k (T_k(t) - T_k(0)) in Chebyshev
   polynomials (so B(0) = 0 exactly and beta_0 = Q(0)); converted to the public monomial ``a``, ``b``,
   normalised to Q(0) = 1, after each inner solve; all reported errors are those of the public
   coefficients. Chebyshev bases are the standard cure for the ill-conditioning of monomials on [-1, 1]
   (ATAP ch. 3 and 24); the dominant conditioning issue here is however the dynamic range of Q at high
   degree (Q(1) / Q(0) ~ 1e6 at (9, 8)), handled by the scalings of step 3.
2. Initial reference X_0: the ``2 (p + q + 2)`` fitted grid points nearest to the Chebyshev extreme points
   of [-1, 1], plus both ends of each fitted interval (the margin edges, where the error of a jump fit
   peaks) and t = 0 (where Q has its minimum) (classical Remez start: Remez 1934; Powell 1981 ch. 7).
3. Inner solve on X_k: the exact minimax rational on the finite set by the *differential correction*
   algorithm (Cheney & Loeb 1961, Numer. Math. 3; Barrodale, Powell & Roberts 1972, SIAM J. Numer. Anal. 9,
   "The differential correction algorithm for rational l_inf approximation"): each iteration solves one
   linear program (scipy ``linprog``: HiGHS dual simplex, feasibility tolerances 1e-9, falling back to
   HiGHS's interior-point method when the simplex reports numerical trouble) in (alpha, beta, z),

       minimise z  s.t.  (+-(f Q - P) - delta_k Q) / (delta_k Q_k) <= z   on X_k,
                         B(s) >= 1e-8 Q(0) s^2   on the safe set S_k,   B'(0) = 0,
                         1e-9 <= beta_0 <= 1,  |beta_j| <= 1 (normalisation),

   until the LP cannot lower the error (relative gain below 1e-6); warm-started from the previous reference
   set's solution. Two scalings are essential at (9, 8): every row is divided by Q_k (the current
   denominator; the differential-correction form permits it since Q_k > 0) and by delta_k, and every column
   by the size of the current coefficient (beta_0 ~ 1e-8 next to beta_j ~ 1). Without the row scaling HiGHS
   stops early and the error is up to 2x the optimum; without the column scaling single 500 x 20 LPs take
   seconds. The bound beta_0 >= 1e-9 max|beta_j| is a dynamic-range cap (Q(1) / Q(0) <~ 1e9): never active
   at <= (9, 8) in the measured range, active at (11, 10) with small margins (``range_capped``).
   Differential correction replaces Remez's nonlinear levelled-error equations, which are ill-posed for
   non-smooth targets and degenerate rationals (ATAP ch. 24).
4. Safe constraint as cutting planes (Reemtsen 1990, "Discretization methods for the solution of
   semi-infinite programming problems", JOTA 71): S_0 = 201 equispaced points of [-1, 1] plus the
   reference points; after each inner solve, the grid points and the real critical points of B in [-1, 1]
   (roots of B', so the check covers the *continuous* interval, margin included) where B < -1e-9 Q(0) are
   added to S, each with a small cluster of neighbours (+-1e-6 .. +-1e-3), because the touching minimum
   that B develops in the margin at the optimum moves slightly after every cut.
5. Exchange (multiple exchange, Remez's second algorithm in cutting-plane form, Reemtsen 1990; Powell 1981
   ch. 9): evaluate the error on all of G; add every local maximum of |error| (taken separately on each
   fitted interval) that exceeds the reference error delta_k to the reference set. Old points are kept, so
   delta_k is non-decreasing and the reference set stays small (< 150 points).
6. Stopping rule: E_k = max_G |error| <= (1 + tol) * delta_k, B >= -1e-9 Q(0) on [-1, 1], and a
   feasibility LP shows that no safe (p, q) rational has error <= (1 - tol) * delta_k on X_k (normalised
   by mean(Q / Q_k) = 1 and the same cap), so that ``lower_bound`` = (1 - tol) delta_k is a certified lower
   bound of the optimum on G (X_k is a subset of G); or ``max_iter`` exchanges (then ``converged`` is
   False). A converged fit is within a factor (1 + tol) / (1 - tol) of the best safe rational on the grid.
   If the feasibility LP finds a better point (differential correction stalled), the inner solve restarts
   from it. The certificate is as good as HiGHS's infeasibility verdict: checked against the independent
   bisection below at modest degree; at (11, 10) it was once demonstrably wrong (``docs/remez.md``).

:func:`grid_minimax_bisection` gives the optimum on G by bisection on epsilon with one LP feasibility test
per step on the whole grid (monomial basis, normalisation Q >= 1): an independent check. It agrees with
:func:`remez_fit` to 0.1 % at modest degree (tested at (5, 4) on 801 points; (7, 6) on 4,001 points: 5e-5);
at (9, 8) its coefficient bound excludes the optimum (largest monomial b_k 1.8e6), so it is not used there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
from numpy.polynomial import chebyshev as npc
from numpy.polynomial import polynomial as npp
from pydantic import BaseModel, ConfigDict
from scipy.optimize import linprog

# The jump families' defaults (jump position c, relative margin rho) live with the families; re-exported here.
from .saes.family import DEFAULT_C, MARGIN_RHO, get_family  # noqa: F401 (defaults re-exported)

log = logging.getLogger(__name__)

_LP_OPTS = {"primal_feasibility_tolerance": 1e-9, "dual_feasibility_tolerance": 1e-9}
_BETA0_MIN = 1e-9  # normalisation 1e-9 <= beta_0 <= 1, |beta_j| <= 1, i.e. the cap Q(0) >= 1e-9 max|beta_j|
_B_EPS = 1e-8  # LP asks B(s) >= _B_EPS * Q(0) * s^2 on the safe set (a hair of slack for LP tolerances)
_B_CLUSTER = np.array([1e-6, 1e-5, 1e-4, 1e-3])  # offsets of the extra cuts around a violated minimum of B
_B_TOL = 1e-9  # accepted violation of B >= 0, relative to Q(0) (effect on r: < 2e-9 relative)


def target_gate(family: str, c: float = 0.0) -> Callable[[np.ndarray], np.ndarray]:
    """Scalar target g of a registered teacher family on the unit interval (its
    :meth:`rsae.saes.Family.remez_target`; for the built-in families g(t) = t * H(t - c), ReLU: c = 0).

    Args:
        family: a registered family name (``relu`` | ``jumprelu`` | ``topk`` | one a user registered).
        c: jump position (unit-interval units).

    Returns:
        Vectorised g: array of any shape -> float64 array of the same shape.

    Raises:
        ValueError: unknown family; a ``c`` the family does not accept (ReLU: c != 0).
    """
    return get_family(family).remez_target(c)


def default_fit_params(family: str, c: float | None = None) -> dict:
    """Documented default Remez inputs ``dict(c, margin, p, q)`` of a registered family
    (:meth:`rsae.saes.Family.remez_defaults`): ReLU c = 0, margin 0, (5, 4); JumpReLU / TopK c =
    ``DEFAULT_C`` unless given, margin ``MARGIN_RHO * c``, (9, 8). At c = 0.25 this is delta = 0.025, which
    gives fit MSE 1.2e-6, max error 1.56e-3 (0.62 % of the jump), and an unfitted band h in theta (0.9, 1.1)
    per latent (``docs/remez.md`` has the measured trade-off table and the reasons).

    Raises:
        ValueError: unknown family; c outside (0, 1) for a jump family; c != 0 for ReLU.
    """
    return get_family(family).remez_defaults(c)


class RationalFit(BaseModel):
    """Result of :func:`remez_fit`. All errors are in the units of the unit-interval gate r(t).

    Attributes:
        a: numerator coefficients a_0..a_p [p + 1] (monomial basis, ascending).
        b: denominator coefficients b_1..b_q [q] of B(t); the gate is P / (1 + |B|) (:func:`rational_eval`).
        max_error: E = max |g - r| over the *fitted* grid points (margin excluded), r evaluated in float64
            exactly as :func:`rational_eval` does with the public coefficients.
        ref_error: delta = minimax error on the final reference set. Converged fits satisfy
            ``ref_error <= max_error <= (1 + tol) * ref_error``.
        grid_mse: mean of (g - r)^2 over *all* ``grid_points`` points of [-1, 1], margin included. Dominated
            by the margin for a jump target (there r moves from ~0 to ~c while g jumps), so it is *not* the
            figure to compare with the RSAE summary.
        fit_mse: mean of (g - r)^2 over the fitted points only (margin excluded). This is the figure to
            compare with the summary's "grid MSE" (2.4e-6 for JumpReLU at (9, 8); 3.8e-7 for ReLU, see
            ``docs/remez.md`` on that one); for ReLU (margin 0) fit_mse == grid_mse.
        iterations: exchange iterations; reference_size: final number of reference points.
        family, c, margin, p, q, grid_points: the inputs.
        converged: the stopping rule of the module docstring was met (certified bracket).
        lower_bound: certified lower bound of the best possible max error of the class on the fitted grid
            ((1 - tol) * ref_error, shown infeasible by an LP), or 0.0 if not certified.
        min_b: min of B(t) over the whole of [-1, 1] (margin included; grid and critical points of B),
            with Q(0) = 1. >= -1e-9 for a safe fit: P / (1 + |B|) equals P / (1 + B) everywhere on [-1, 1].
        max_error_float32: max error on the fitted grid when P and B are evaluated in float32 by Horner's
            rule, as :mod:`rsae.saes.rational` does in torch (a check of the monomial coefficients' conditioning);
            None when not computed.
        safe: True for the safe-denominator class (B >= 0); False for the plain class Q = 1 + B > 0 on the
            fitted grid (then ``__call__`` evaluates P / (1 + B)).
        lp_solves: number of linear programs solved (cost measure).
        range_capped: the class's dynamic-range cap (Q(0) >= 1e-9 x the largest Chebyshev coefficient of
            B) is active, i.e. the fit is limited by conditioning, not by the degree (seen at (11, 10) with
            small margins; never at <= (9, 8) in the measured range).
    """

    model_config = ConfigDict(extra="forbid")

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
    lower_bound: float = 0.0
    min_b: float = 0.0
    max_error_float32: float | None = None
    safe: bool = True
    lp_solves: int = 0
    range_capped: bool = False

    def __call__(self, t: np.ndarray) -> np.ndarray:
        """r(t) for an array t of any shape (float64), in the fitted class's form (see ``safe``)."""
        return rational_eval(np.asarray(self.a), np.asarray(self.b), t, safe=self.safe)


def rational_eval(a: np.ndarray, b: np.ndarray, t: np.ndarray, *, safe: bool = True) -> np.ndarray:
    """r(t) = P(t) / (1 + |B(t)|) with P = sum a_k t^k, B = sum_{k>=1} b_k t^k (numpy, float64).

    Args:
        a: [p + 1] ascending monomial coefficients of P.
        b: [q] coefficients b_1..b_q of B (no constant term); may be empty (then r = P).
        t: array of any shape.
        safe: True (default): the RSAE gate P / (1 + |B|). False: the plain rational P / (1 + B) (used only
            for ``safe=False`` fits; may have poles).

    Returns:
        float64 array of t's shape.
    """
    t = np.asarray(t, dtype=np.float64)
    P = npp.polyval(t, np.asarray(a, dtype=np.float64))
    if len(b) == 0:
        return P
    B = npp.polyval(t, np.concatenate([[0.0], np.asarray(b, dtype=np.float64)]))
    return P / (1.0 + (np.abs(B) if safe else B))


def _horner32(coeffs: np.ndarray, t: np.ndarray) -> np.ndarray:
    c = np.asarray(coeffs, dtype=np.float32)
    t = np.asarray(t, dtype=np.float32)
    out = np.zeros_like(t) + c[-1]
    for k in range(len(c) - 2, -1, -1):
        out = out * t + c[k]
    return out


def _rational_eval32(a, b, t) -> np.ndarray:
    P = _horner32(a, t)
    if len(b) == 0:
        return P.astype(np.float64)
    B = _horner32(np.concatenate([[0.0], b]), t)
    return (P / (np.float32(1.0) + np.abs(B))).astype(np.float64)


def fit_grid(grid_points: int, c: float, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """The equispaced grid on [-1, 1] and the mask of fitted points.

    Args:
        grid_points: number of points (>= 2).
        c, margin: the excluded open interval is (c - margin, c + margin); margin <= 0 excludes nothing.

    Returns:
        ``(t, mask)``: t [grid_points] float64, mask [grid_points] bool, True outside the margin.
    """
    t = np.linspace(-1.0, 1.0, grid_points)
    mask = np.ones_like(t, dtype=bool) if margin <= 0 else ~((t > c - margin) & (t < c + margin))
    return t, mask


def _vander(x: np.ndarray, deg: int) -> np.ndarray:
    return np.vander(x, deg + 1, increasing=True)


# --- Chebyshev-basis machinery --------------------------------------------------------------------------


def _pbasis(x: np.ndarray, p: int) -> np.ndarray:
    """[m, p + 1]: T_0..T_p at x."""
    return npc.chebvander(np.asarray(x, dtype=np.float64), p)


def _qbasis(x: np.ndarray, q: int) -> np.ndarray:
    """[m, q + 1]: column 0 = 1 (for beta_0 = Q(0)), column k = T_k(x) - T_k(0) (so B(0) = 0 exactly)."""
    V = npc.chebvander(np.asarray(x, dtype=np.float64), q)
    V[:, 1:] -= npc.chebvander(np.zeros(1), q)[0, 1:]
    return V


def _dB0_row(q: int) -> np.ndarray:
    """[q + 1]: B'(0) = row . beta (T_k'(0) = k sin(k pi / 2)); entry 0 (beta_0) is 0."""
    k = np.arange(1, q + 1)
    return np.concatenate([[0.0], np.rint(k * np.sin(k * np.pi / 2))])


def _cheb_to_monomial(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Chebyshev (alpha, beta) -> monomial (a [p + 1], b [q]) normalised to Q(0) = 1."""
    p, q = len(alpha) - 1, len(beta) - 1
    a = np.zeros(p + 1)
    a_raw = npc.cheb2poly(alpha)
    a[: len(a_raw)] = a_raw
    b = np.zeros(q)
    if q:
        t0 = npc.chebvander(np.zeros(1), q)[0, 1:]
        b_raw = npc.cheb2poly(np.concatenate([[-float(np.dot(beta[1:], t0))], beta[1:]]))
        b[: len(b_raw) - 1] = b_raw[1:]  # the constant term is 0 up to rounding
    return a / beta[0], b / beta[0]


def _B_critical_points(beta: np.ndarray) -> np.ndarray:
    """Real roots in [-1, 1] of B' (Chebyshev beta), plus the end points: where B attains its minima."""
    q = len(beta) - 1
    pts = [-1.0, 1.0]
    if q >= 2:
        t0 = npc.chebvander(np.zeros(1), q)[0, 1:]
        cB = np.concatenate([[-float(np.dot(beta[1:], t0))], beta[1:]])
        d = npc.chebder(cB)
        d = np.trim_zeros(d, "b")
        if len(d) >= 2:
            r = npc.chebroots(d)
            r = r[np.abs(r.imag) < 1e-9].real
            pts.extend(r[(r >= -1.0) & (r <= 1.0)].tolist())
    return np.unique(np.asarray(pts))


class _SafeLP:
    """Linear programs of the differential-correction inner solve on a reference set (Chebyshev basis)."""

    def __init__(self, x: np.ndarray, f: np.ndarray, s: np.ndarray, p: int, q: int, safe: bool):
        self.f, self.p, self.q, self.safe = f, p, q, safe
        self.Pm, self.Qm = _pbasis(x, p), _qbasis(x, q)
        self.np_, self.nq = p + 1, q + 1
        nv = self.np_ + self.nq + 1
        self.nv = nv
        if safe and q:
            s = s[np.abs(s) > 1e-12]  # B(0) = 0 identically
            Qs = _qbasis(s, q)
            # -B(s) + eps s^2 beta_0 <= 0
            self.SB = np.hstack(
                [np.zeros((len(s), self.np_)), (_B_EPS * s**2)[:, None], -Qs[:, 1:], np.zeros((len(s), 1))]
            )
            self.Qs = Qs
            self.Aeq = np.concatenate([np.zeros(self.np_), _dB0_row(q), [0.0]])[None, :]
            self.beq = np.zeros(1)
        else:
            self.SB, self.Qs, self.Aeq, self.beq = np.zeros((0, nv)), np.zeros((0, self.nq)), None, None
        self.bounds = [(None, None)] * self.np_ + [(_BETA0_MIN, 1.0)] + [(-1.0, 1.0)] * q + [(None, None)]
        self.lp_solves = 0

    def error(self, alpha, beta) -> float:
        Q = self.Qm @ beta
        if np.any(Q <= 0):
            return math.inf
        return float(np.max(np.abs(self.f - (self.Pm @ alpha) / Q)))

    def safe_ok(self, beta) -> bool:
        if not (self.safe and self.q) or len(self.Qs) == 0:
            return True
        return bool(np.all(self.Qs[:, 1:] @ beta[1:] >= -_B_TOL * beta[0]))

    def _rows(self, delta: float, Qk: np.ndarray, Qs_k: np.ndarray, with_z: bool) -> np.ndarray:
        w = (1.0 / (Qk * delta))[:, None]  # rows relative to Q_k and to the error level
        zc = -np.ones((len(Qk), 1)) if with_z else np.zeros((len(Qk), 1))
        f = self.f
        A1 = np.hstack([-self.Pm * w, (f - delta)[:, None] * self.Qm * w, zc])
        A2 = np.hstack([self.Pm * w, (-f - delta)[:, None] * self.Qm * w, zc])
        SB = self.SB * (1.0 / Qs_k)[:, None] if len(self.SB) else self.SB
        return np.vstack([A1, A2, SB])

    def _solve(self, c, A, Aeq, beq, bounds, scale=None):
        """linprog with optional column scaling v = scale * u (scale > 0: the expected size of each
        variable, taken from the current iterate; it equilibrates alpha, beta_0 ~ 1e-8 and beta_j ~ 1)."""
        D = np.ones(A.shape[1]) if scale is None else np.asarray(scale, dtype=np.float64)
        bnds = [(None if lo is None else lo / d, None if hi is None else hi / d) for (lo, hi), d in zip(bounds, D)]
        res = None
        for method in ("highs", "highs-ipm"):  # the simplex may report numerical trouble (status 4) at
            res = linprog(
                c * D,
                A_ub=A * D,
                b_ub=np.zeros(A.shape[0]),  # high degree; the interior point
                A_eq=None if Aeq is None else Aeq * D,
                b_eq=beq,  # method then decides
                bounds=bnds,
                method=method,
                options={**_LP_OPTS, "time_limit": 5.0},
            )
            self.lp_solves += 1
            if res.status in (0, 2):
                break
        if res.status == 0:
            res.x = res.x * D
        return res

    def _scale(self, alpha, beta, z: float = 1.0) -> np.ndarray | None:
        ab = np.concatenate([alpha, beta])
        D = np.maximum(np.abs(ab), 1e-6 * np.max(np.abs(ab)))
        return np.concatenate([D, [z]])

    def dc(self, alpha, beta, max_iter: int = 60, delta0: float | None = None):
        """Differential correction from (alpha, beta). Returns (alpha, beta, delta, improved).

        ``delta0`` (optional) replaces the start's own error as the first level: used to warm-start from a
        point that violates a newly added safe constraint (the first LP then looks for a *feasible* point
        with error below delta0)."""
        delta = self.error(alpha, beta) if delta0 is None else float(delta0)
        c = np.zeros(self.nv)
        c[-1] = 1.0
        improved = False
        for _ in range(max_iter):
            Qk = self.Qm @ beta
            if np.any(Qk <= 0):
                break
            Qs_k = np.maximum(self.Qs @ beta, beta[0]) if len(self.SB) else np.ones(0)
            A = self._rows(delta, Qk, Qs_k, True)
            res = self._solve(c, A, self.Aeq, self.beq, self.bounds, self._scale(alpha, beta))
            if res.status != 0:
                log.debug("differential correction LP status %d: %s", res.status, res.message)
                break
            a_new, b_new = res.x[: self.np_], res.x[self.np_ : self.np_ + self.nq]
            d_new = self.error(a_new, b_new)
            if not d_new < delta:
                break
            gain = (delta - d_new) / delta
            alpha, beta, delta, improved = a_new, b_new, d_new, True
            if gain < 1e-6 or res.x[-1] >= -1e-12:
                break
        return alpha, beta, delta, improved

    def feasible_at(self, eps: float, beta_scale: np.ndarray):
        """LP feasibility: a safe rational with error <= eps on the reference set? Returns
        (status, (alpha, beta) or None); status 0 feasible, 2 infeasible (certificate), other = unknown."""
        Qk = self.Qm @ beta_scale
        Qs_k = np.maximum(self.Qs @ beta_scale, beta_scale[0]) if len(self.SB) else np.ones(0)
        A = self._rows(eps, Qk, Qs_k, False)
        # normalisation mean(Q / Q_k) = 1 over the reference set (a homogeneous problem needs a
        # normalisation that cannot shrink to the LP's feasibility tolerance)
        norm = np.concatenate([np.zeros(self.np_), np.mean(self.Qm / Qk[:, None], axis=0), [0.0]])
        Aeq = np.vstack([norm[None, :]] + ([self.Aeq] if self.Aeq is not None else []))
        beq = np.r_[1.0, np.zeros(Aeq.shape[0] - 1)]
        bounds = [(None, None)] * self.np_ + [(0.0, None)] + [(None, None)] * self.q + [(0.0, 0.0)]
        if self.q:  # the class's dynamic-range cap, as in dc(): beta_0 >= _BETA0_MIN |beta_j|
            cap = np.zeros((2 * self.q, self.nv))
            cap[:, self.np_] = -1.0
            j = np.arange(self.q)
            cap[j, self.np_ + 1 + j] = _BETA0_MIN
            cap[self.q + j, self.np_ + 1 + j] = -_BETA0_MIN
            A = np.vstack([A, cap])
        res = self._solve(np.zeros(self.nv), A, Aeq, beq, bounds, self._scale(np.zeros(self.np_), beta_scale))
        if res.status == 0:
            return 0, (res.x[: self.np_], res.x[self.np_ : self.np_ + self.nq])
        return res.status, None


def _dc_solve(
    x: np.ndarray, f: np.ndarray, p: int, q: int, *, safe: bool = True, max_iter: int = 60
) -> tuple[np.ndarray, np.ndarray, float]:
    """Minimax (p, q) rational on the finite set x by differential correction (one call of step 3).

    Args:
        x, f: [m] points and target values.
        p, q: degrees. safe: impose B >= 0 at the points x (and B'(0) = 0).

    Returns:
        ``(a, b_full, delta)``: monomial a [p + 1], b_full = (1, b_1..b_q) [q + 1] (Q = b_full . t^k),
        and delta the max error on x. Kept for tests; :func:`remez_fit` uses the same LPs.
    """
    x = np.asarray(x, dtype=np.float64)
    f = np.asarray(f, dtype=np.float64)
    lp = _SafeLP(x, f, x, p, q, safe)
    alpha = np.linalg.lstsq(lp.Pm, f, rcond=None)[0]
    beta = np.eye(q + 1)[0]
    alpha, beta, delta, _ = lp.dc(alpha, beta, max_iter=max_iter)
    a, b = _cheb_to_monomial(alpha, beta)
    return a, np.concatenate([[1.0], b]), float(delta)


def _segment_maxima(v: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Positions (into v) of local maxima of v, taken separately on each run of consecutive grid indices
    ``idx`` (so each fitted interval's end points count as candidates). Plateaus included."""
    out = []
    brk = np.nonzero(np.diff(idx) > 1)[0] + 1
    for s, e in zip(np.r_[0, brk], np.r_[brk, len(idx)]):
        w = v[s:e]
        left = np.r_[-np.inf, w[:-1]]
        right = np.r_[w[1:], -np.inf]
        out.append(s + np.nonzero((w >= left) & (w >= right))[0])
    return np.concatenate(out) if out else np.zeros(0, dtype=int)


def alternation_count(err: np.ndarray, rel: float = 0.02) -> int:
    """Length of the longest sign-alternating sequence of points where |err| >= (1 - rel) * max|err|.

    Args:
        err: [m] error g - r at the fitted points, in increasing t order. The fitted set may be two
            disjoint intervals (margin removed): the count only uses the order of the points, which is what
            the alternation theorem on a general closed subset of the real line needs (Achieser 1956,
            ch. II), so ``err[mask]`` is passed as is.
        rel: relative tolerance defining "extremal".

    Returns:
        The count. Chebyshev's equioscillation theorem: a best (p, q) rational approximation of defect 0
        has at least p + q + 2 such points (a degree-n polynomial: n + 2). The *safe* class of
        :func:`remez_fit` is not that class (see the module docstring): measured, p + q.
    """
    err = np.asarray(err, dtype=np.float64)
    E = np.max(np.abs(err))
    idx = np.nonzero(np.abs(err) >= (1 - rel) * E)[0]
    count, last = 0, 0
    for i in idx:
        s = np.sign(err[i])
        if s != 0 and s != last:
            count += 1
            last = s
    return count


def remez_fit(
    family: str = "relu",
    *,
    c: float = 0.0,
    p: int = 3,
    q: int = 2,
    grid_points: int = 4001,
    margin: float = 0.0,
    tol: float = 1e-3,
    max_iter: int = 50,
    safe: bool = True,
) -> RationalFit:
    """Relaxed Remez fit of r = P / (1 + B) to the family's target gate on [-1, 1] (see module docstring).

    One long function on purpose: its body is the numbered algorithm of the module docstring (steps 2-6, marked
    in the code), which reads as a specification only in one piece.

    Args:
        family: a registered family name (its :meth:`rsae.saes.Family.remez_target` is the target; built-in:
            g(t) = t * H(t - c), c = 0 for relu).
        c: jump position in (-1, 1), unit-interval units (the service maps h to t = h c / theta).
            Tested for c in [0.05, 0.6].
        p, q: numerator / denominator degrees (verified up to (9, 8); (11, 10) runs but is
            conditioning-limited, see ``docs/remez.md``; a warning is logged beyond p + q = 17).
        grid_points: equispaced grid size on [-1, 1] (the summary's 4,001).
        margin: half-width delta of the excluded interval around the jump (tested in [0.005, 0.2]);
            see :func:`default_fit_params` for the documented rule delta = 0.1 c.
        tol: relative optimality gap at which the exchange stops.
        max_iter: maximum exchange iterations.
        safe: True: B >= 0 on the whole of [-1, 1] (the RSAE's class; the public gate P / (1 + |B|) is the
            fitted rational). False: the plain class Q = 1 + B > 0 on the fitted grid (for tests of the
            classical theory; its gate is P / (1 + B), not the RSAE's).

    Returns:
        :class:`RationalFit`: monomial ``a``, ``b``; certified bracket
        ``lower_bound <= optimum <= max_error <= (1 + tol) ref_error`` when ``converged``; MSEs.
        Time (measured, shared 2-core CPU, 4,001-point grid): 0.5-1.6 s at (9, 8), ~0.1 s at (3, 2);
        (11, 10) median 2.5 s but up to ~140 s (small c and margin), and then often uncertified.

    Raises:
        ValueError: unknown family; c != 0 for ReLU; c outside (-1, 1); negative degrees, margin or tol;
            fewer than p + q + 2 fitted points.
    """
    g = target_gate(family, c)
    if p + q > 17:
        log.warning(
            "remez degrees (%d, %d) are beyond the verified range (<= (9, 8)): the LPs are "
            "conditioning-limited there and certificates may be wrong (docs/remez.md)",
            p,
            q,
        )
    if not -1.0 < c < 1.0:
        raise ValueError(f"jump position c={c} must lie in (-1, 1)")
    if p < 0 or q < 0 or margin < 0 or tol <= 0 or max_iter < 1 or grid_points < 2:
        raise ValueError("need p, q, margin >= 0, tol > 0, max_iter >= 1, grid_points >= 2")
    t, mask = fit_grid(grid_points, c, margin)
    fidx = np.nonzero(mask)[0]
    x, f = t[mask], g(t[mask])
    if len(x) < p + q + 2:
        raise ValueError("too few fitted grid points for the requested degrees")
    Pall = _pbasis(x, p)

    # initial reference (step 2)
    n0 = 2 * (p + q + 2)
    cheb = np.cos(np.pi * np.arange(n0) / (n0 - 1))
    ref = np.abs(x[None, :] - cheb[:, None]).argmin(axis=1)
    gaps = np.nonzero(np.diff(fidx) > 1)[0]
    ref = np.unique(np.r_[ref, gaps, gaps + 1, 0, len(x) - 1, np.nonzero(x == 0.0)[0]]).astype(int)
    # safe set (step 4)
    S = np.linspace(-1.0, 1.0, 201) if safe and q else np.zeros(0)

    lp_solves = 0
    converged, it = False, 0
    alpha, beta = np.linalg.lstsq(Pall[ref], f[ref], rcond=None)[0], np.eye(q + 1)[0]
    delta = E = math.inf
    lower = 0.0
    for it in range(1, max_iter + 1):
        S_all = np.union1d(S, x[ref]) if safe and q else S
        lp = _SafeLP(x[ref], f[ref], S_all, p, q, safe)
        cold = (np.linalg.lstsq(lp.Pm, f[ref], rcond=None)[0], np.eye(q + 1)[0])
        d_warm, d_cold = lp.error(alpha, beta), lp.error(*cold)
        done = False
        if d_warm < d_cold:  # warm start from the previous reference set's solution
            if lp.safe_ok(beta):
                alpha, beta, delta, _ = lp.dc(alpha, beta)
                done = True
            else:  # it violates a new safe cut: first look for a feasible point just above its error
                a2, b2, d2, ok = lp.dc(alpha, beta, delta0=1.02 * d_warm)
                if ok:
                    alpha, beta, delta, done = a2, b2, d2, True
        if not done:
            alpha, beta, delta, _ = lp.dc(*cold)
        status, eps_cert = -1, 0.0
        for _ in range(5):  # step 6: certify the reference-set optimum, restart if DC stalled
            eps_cert = (1 - tol) * delta
            status, better = lp.feasible_at(eps_cert, beta)
            if status != 0:
                break
            a2, b2 = better
            if not lp.error(a2, b2) < delta:
                status = -1
                break
            alpha, beta, delta, _ = lp.dc(a2, b2)
        lp_solves += lp.lp_solves
        certified = status == 2

        # errors of the *public* coefficients (monomial, Q(0) = 1, safe form), so that the stopping rule
        # certifies exactly what is returned
        a, b = _cheb_to_monomial(alpha, beta)
        Qx = 1.0 + npp.polyval(x, np.concatenate([[0.0], b])) if q else np.ones_like(x)
        err = f - rational_eval(a, b, x, safe=safe) if np.all(Qx > 0) else np.full_like(x, np.inf)
        E = float(np.max(np.abs(err)))
        # levelled error of the public coefficients on X_k (equals the differential-correction delta up to
        # the rounding of the basis conversion, ~1e-12 relative)
        delta = float(np.max(np.abs(err[ref]))) if np.isfinite(E) else delta
        bad_s = np.zeros(0)
        if safe and q:
            crit = _B_critical_points(beta)
            pts = np.r_[t, crit]
            Bv = _qbasis(pts, q)[:, 1:] @ beta[1:]
            bad = Bv < -_B_TOL * beta[0]
            if bad.any():  # most negative grid points (local minima) and critical points of B
                Bt = Bv[: len(t)]
                mins = _segment_maxima(-Bt, np.arange(len(t)))
                bad_s = np.unique(np.r_[t[mins[bad[: len(t)][mins]]], crit[bad[len(t) :]]])
                # a touching minimum of B moves a little after each cut: cut a small cluster around it
                offs = np.r_[0.0, np.outer([-1.0, 1.0], _B_CLUSTER).ravel()]
                cl = (bad_s[:, None] + offs[None, :]).ravel()
                S = np.union1d(S, cl[(cl >= -1.0) & (cl <= 1.0)])
        qpos = safe or bool(np.all(Qx > 0))
        log.debug(
            "exchange %d: |X|=%d |S|=%d E=%.6e delta=%.6e certified=%s (status %s) B-cuts=%d",
            it,
            len(ref),
            len(S_all),
            E,
            delta,
            certified,
            status,
            len(bad_s),
        )
        if E <= (1 + tol) * delta and len(bad_s) == 0 and qpos:
            lower = eps_cert if certified else 0.0
            converged = certified
            if certified:
                break
        cand = _segment_maxima(np.abs(err), fidx) if np.isfinite(E) else np.arange(len(x))
        cand = cand[np.abs(err[cand]) > delta] if np.isfinite(E) else np.setdiff1d(np.nonzero(~(Qx > 0))[0], ref)
        new = np.setdiff1d(cand, ref)
        if len(new) == 0 and len(bad_s) == 0:
            j = int(np.argmax(np.abs(err))) if np.isfinite(E) else -1
            if j < 0 or j in ref:
                break  # nothing left to exchange (uncertified stop)
            new = np.array([j])
        ref = np.union1d(ref, new).astype(int)

    a, b = _cheb_to_monomial(alpha, beta)
    capped = bool(q and beta[0] < 2 * _BETA0_MIN * np.max(np.abs(beta[1:])))
    r_all = rational_eval(a, b, t, safe=safe)
    g_all = g(t)
    e_fit = (g_all - r_all)[mask]
    crit = _B_critical_points(beta)
    pts = np.r_[t, crit]
    min_b = float(np.min(npp.polyval(pts, np.concatenate([[0.0], b])))) if q else 0.0
    e32 = (g_all - _rational_eval32(a, b, t))[mask] if safe else np.full(1, np.nan)
    fit = RationalFit(
        a=a.tolist(),
        b=b.tolist(),
        max_error=float(np.max(np.abs(e_fit))),
        ref_error=float(delta),
        grid_mse=float(np.mean((g_all - r_all) ** 2)),
        fit_mse=float(np.mean(e_fit**2)),
        iterations=it,
        reference_size=int(len(ref)),
        family=family,
        c=float(c),
        margin=float(margin),
        p=p,
        q=q,
        grid_points=grid_points,
        converged=bool(converged),
        lower_bound=float(lower),
        min_b=min_b,
        max_error_float32=float(np.max(np.abs(e32))),
        safe=bool(safe),
        lp_solves=int(lp_solves),
        range_capped=capped,
    )
    if capped:
        log.warning(
            "remez %s (p=%d,q=%d) c=%.3g margin=%.3g: the dynamic-range cap Q(0) >= %.0e max|beta| "
            "is active; the fit is optimal only within the capped class (conditioning limit)",
            family,
            p,
            q,
            c,
            margin,
            _BETA0_MIN,
        )
    if not converged:
        log.warning(
            "remez %s (p=%d,q=%d) c=%.3g margin=%.3g did not converge in %d iterations: max err %.3e, ref err %.3e",
            family,
            p,
            q,
            c,
            margin,
            it,
            fit.max_error,
            delta,
        )
    log.info(
        "remez %s (p=%d,q=%d) c=%.3g margin=%.3g: max err %.3e (ref %.3e), fit MSE %.3e, %d iters, %d LPs",
        family,
        p,
        q,
        c,
        margin,
        fit.max_error,
        delta,
        fit.fit_mse,
        it,
        lp_solves,
    )
    return fit


def grid_minimax_bisection(
    family: str = "relu",
    *,
    c: float = 0.0,
    p: int = 3,
    q: int = 2,
    grid_points: int = 4001,
    margin: float = 0.0,
    rtol: float = 1e-4,
    safe: bool = False,
) -> float:
    """The best possible max error of a (p, q) rational on the fitted grid, by bisection on eps.

    Independent of :func:`remez_fit` (no exchange, no differential correction, monomial basis): for each
    eps one LP tests whether P, Q exist with |g Q - P| <= eps Q and Q >= 1 on the fitted grid, coefficients
    of Q bounded by 1e6 (Q > 0 normalised). With ``safe=True`` also B = Q - Q(0) >= 0 on *every* grid point
    of [-1, 1], margin included (the RSAE class as :func:`remez_fit` defines it, except that B'(0) = 0 is
    only implied up to the grid spacing).

    Args:
        family, c, p, q, grid_points, margin: as :func:`remez_fit`.
        rtol: relative width of the final bisection bracket.
        safe: see above.

    Returns:
        The upper end of the final bracket (an achievable error, up to LP tolerances), float.

    Caveat: the optimum's coefficients grow with the degree; at (9, 8) (default JumpReLU target, 4,001
    points) the bound 1e6 excludes the optimum (largest monomial b_k 1.8e6) and the bisection returns 1.92e-3
    (in ~500 s) where :func:`remez_fit` achieves 1.56e-3. Use at modest degree (<= (7, 6)).
    """
    g = target_gate(family, c)
    t, mask = fit_grid(grid_points, c, margin)
    x, f = t[mask], g(t[mask])
    m = len(x)
    Vp, Vq = _vander(x, p), _vander(x, q)
    Vq_all = _vander(t, q)

    def feasible(eps: float) -> bool:
        A = [
            np.hstack([-Vp, (f - eps)[:, None] * Vq]),
            np.hstack([Vp, (-f - eps)[:, None] * Vq]),
            np.hstack([np.zeros((m, p + 1)), -Vq]),
        ]
        bu = [np.zeros(m), np.zeros(m), -np.ones(m)]
        if safe and q > 0:
            A.append(np.hstack([np.zeros((len(t), p + 2)), -Vq_all[:, 1:]]))
            bu.append(np.zeros(len(t)))
        res = linprog(
            np.zeros(p + q + 2),
            A_ub=np.vstack(A),
            b_ub=np.concatenate(bu),
            bounds=[(None, None)] * (p + 1) + [(-1e6, 1e6)] * (q + 1),
            method="highs",
        )
        return res.status == 0

    lo, hi = 0.0, float(np.max(np.abs(f - npp.polyval(x, np.linalg.lstsq(Vp, f, rcond=None)[0]))))
    while hi - lo > rtol * hi:
        mid = 0.5 * (lo + hi)
        if feasible(mid):
            hi = mid
        else:
            lo = mid
    return hi


_CACHE_VERSION = "v2"  # v2: Chebyshev basis, row-scaled differential correction, B >= 0 on all of [-1, 1]


def cached_remez_fit(
    family: str,
    *,
    c: float,
    p: int,
    q: int,
    grid_points: int,
    margin: float,
    tol: float = 1e-3,
    max_iter: int = 50,
    cache: Path | None = None,
) -> RationalFit:
    """:func:`remez_fit` (safe class), cached on disk as JSON keyed by
    (family, c, p, q, grid, margin, tol, max_iter, algorithm version).

    A fit depends only on these inputs, so it is shared across jobs. ``cache`` defaults to
    ``rsae.models.cache_dir() / "remez"``. Unreadable or stale entries are recomputed and overwritten.

    Raises:
        ValueError: as :func:`remez_fit`.
    """
    from .models import cache_dir

    key = json.dumps([family, round(c, 12), p, q, grid_points, round(margin, 12), tol, max_iter, _CACHE_VERSION])
    folder = cache or cache_dir() / "remez"
    f = folder / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    if f.is_file():
        try:
            return RationalFit(**json.loads(f.read_text()))
        except (json.JSONDecodeError, TypeError):
            pass
    fit = remez_fit(family, c=c, p=p, q=q, grid_points=grid_points, margin=margin, tol=tol, max_iter=max_iter)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f".{f.name}.{uuid.uuid4().hex}.tmp")  # unique: concurrent fits never share it
    tmp.write_text(json.dumps(fit.model_dump()))
    tmp.replace(f)
    return fit
