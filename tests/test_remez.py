"""Relaxed Remez fit: known minimax results, equioscillation, certified optimality, caching."""

import numpy as np
import pytest

from rsae.remez import (alternation_count, cached_remez_fit, fit_grid, grid_minimax_bisection, rational_eval,
                        remez_fit, target_gate)


def _err(fit, grid_points=4001):
    t, mask = fit_grid(grid_points, fit.c, fit.margin)
    return (target_gate(fit.family, fit.c)(t) - fit(t))[mask]


def test_polynomial_fit_matches_chebyshev_closed_form():
    # Best degree-n polynomial approximation of t^(n+1) on [-1, 1] leaves T_{n+1}(t) / 2^n: error 2^-n.
    # With q = 0 the Remez fit is a polynomial fit; check it against this classical result (n = 3).
    from rsae import remez

    n = 3
    x = np.linspace(-1, 1, 2001)
    a, b, delta = remez._dc_solve(x, x ** (n + 1), n, 0)
    err = x ** (n + 1) - np.polynomial.polynomial.polyval(x, a) / b[0]
    assert np.max(np.abs(err)) == pytest.approx(2.0 ** -n, rel=1e-3)
    assert alternation_count(err) >= n + 2


def test_relu_32_equioscillates_and_is_certified():
    fit = remez_fit("relu", p=3, q=2)
    assert fit.converged
    err = _err(fit)
    assert np.max(np.abs(err)) == pytest.approx(fit.max_error)
    # Chebyshev equioscillation: p + q + 2 alternating extrema of equal size.
    assert alternation_count(err, rel=0.01) >= fit.p + fit.q + 2
    # certified bracket: reference error <= optimum <= grid error <= (1 + tol) reference error
    assert fit.ref_error <= fit.max_error <= (1 + 1e-3) * fit.ref_error
    # the known optimum for type (3, 2) on [-1, 1] (docs/method.md): max error ~2.2e-2, grid MSE ~2.3e-4
    assert fit.max_error == pytest.approx(2.18e-2, rel=0.01)
    assert fit.grid_mse == pytest.approx(2.29e-4, rel=0.02)


def test_remez_matches_independent_lp_bisection_on_a_smaller_grid():
    fit = remez_fit("relu", p=3, q=2, grid_points=801)
    best = grid_minimax_bisection("relu", p=3, q=2, grid_points=801, rtol=1e-4)
    assert fit.max_error <= best * (1 + 2e-3)
    assert fit.max_error >= best * (1 - 2e-3)


def test_error_falls_with_degree():
    errs = [remez_fit("relu", p=p, q=p - 1).max_error for p in (2, 3, 5)]
    assert errs[0] > errs[1] > errs[2]


def test_safe_denominator_has_no_poles_and_matches_fit():
    fit = remez_fit("relu", p=3, q=2)
    t = np.linspace(-50, 50, 10001)
    y = rational_eval(np.array(fit.a), np.array(fit.b), t)
    assert np.all(np.isfinite(y))
    tt, _ = fit_grid(4001, 0.0, 0.0)
    B = np.polynomial.polynomial.polyval(tt, [0.0, *fit.b])
    assert np.all(B >= -1e-9)  # safe form equals the fitted rational on the grid


def test_cache_roundtrip(tmp_path):
    f1 = cached_remez_fit("relu", c=0.0, p=3, q=2, grid_points=1001, margin=0.0, cache=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 1
    f2 = cached_remez_fit("relu", c=0.0, p=3, q=2, grid_points=1001, margin=0.0, cache=tmp_path)
    assert f1 == f2


def test_bad_inputs():
    with pytest.raises(ValueError):
        target_gate("sigmoid")
    with pytest.raises(ValueError):
        remez_fit("relu", p=3, q=2, grid_points=5)
