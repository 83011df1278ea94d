"""Stage 2, initialize: fit the rational gate to the teacher's gate (relaxed Remez) and copy the teacher.

The family (:class:`rsae.saes.Family`) says where the teacher's gate jumps (its :class:`~rsae.saes.JumpRule`)
and what the Remez target and default degrees are; this stage places the jump on the unit interval:

- no jump (ReLU): one shared gate, s = 1 (not trained), C_in = C_out = a high quantile of |h|.
- per-latent thresholds theta_j (JumpReLU, TopK 'global'): each latent gets the scale s_j = theta_j / a, so
  that s_j g(h / s_j) = h H(h - theta_j) exactly for the target g(t) = t H(t - a); a is the anchor
  (:func:`jump_anchor`). C_in = C_out = 1. The scales are trained like the teacher's thresholds.
- per-token thresholds tau_i (TopK 'per_token'): the same with s_i = tau_i / a per token, computed by the
  RSAE's gate at inference (the rule's ``rational`` entries).

``docs/method.md`` gives the reasoning and the measurements.
"""

from __future__ import annotations

from typing import Any

import torch

from ..checks import check_rational_init
from ..config import UpgradeConfig
from ..remez import cached_remez_fit
from ..report import FitParams
from ..saes import Family, RationalSAE
from ..saes.family import MARGIN_RHO
from ..stats import quantile
from .progress import RunContext
from .state import InitResult, UpgradeState


def choose_c(
    u_active: torch.Tensor, quantile_: float = 0.999, lo: float = 0.04, hi: float = 0.5, anchor_factor: float = 1.0
) -> float:
    """Jump position c on the unit interval from real data: 1 / (``anchor_factor`` x the ``quantile_`` of
    h / theta over the teacher's active entries ``u_active`` [n]), clipped to [lo, hi] and rounded to 2
    significant digits (so fits cache).

    The teacher's threshold lands at the anchor a = ``anchor_factor`` x c (1 + rho for the default
    'upper_edge' placement, 1 for 'center'; :func:`jump_anchor`), so latent j uses s_j = theta_j / a and
    t = a h / theta_j: this rule puts all but 0.1% of the active pre-activations in [-1, 1], where the Remez
    fit is accurate, instead of extrapolating the rational beyond it.
    """
    if u_active.numel() == 0:
        return hi
    c = 1.0 / (anchor_factor * max(quantile(u_active, quantile_), 1e-6))
    c = min(hi, max(lo, c))
    return float(f"{c:.2g}")


def jump_anchor(c: float, margin: float, placement: str) -> float:
    """Unit-interval position a where the teacher's threshold lands (s_j = theta_j / a).

    ``"upper_edge"``: a = c + margin, the upper edge of the band (c - margin, c + margin) that the Remez fit
    excludes. Every entry the teacher keeps (h > theta_j) then has t > a, inside the fitted set, where
    |r(t) - t| <= the fit's max error; the band, where r rises from ~0 to ~a, maps to h in
    theta_j ((c - margin) / (c + margin), 1), entries the teacher zeroes, which the exact-zero floor drops.
    The fitted rational is thereby a relaxed minimax fit of the teacher's target t H(t - a) with a one-sided
    margin (a - 2 margin, a) below its jump. ``"center"``: a = c, the band straddles theta_j
    (h in theta_j (1 - rho, 1 + rho)), so the smallest active entries get transitional values at init
    (measured: JumpReLU init +0.008 nats delta CE, TopK init +4.3% MSE; docs/method.md).

    Raises:
        ValueError: unknown ``placement``.
    """
    if placement == "upper_edge":
        return float(c) + float(margin)
    if placement == "center":
        return float(c)
    raise ValueError(f"unknown jump placement {placement!r}")


def fit_params(cfg: UpgradeConfig, family: Family, c: float | None = None) -> dict[str, Any]:
    """Remez settings: the family's defaults (:meth:`rsae.saes.Family.remez_defaults`; for a jump family
    the margin follows ``c``, the jump position chosen from data, by its relative rule) overridden by the
    request's ``remez`` fields (its ``c`` wins over the data's). ``c`` None: a family without a jump."""
    if c is not None:
        c = cfg.remez.c if cfg.remez.c is not None else c
    params = dict(family.remez_defaults(c))
    for key in ("p", "q", "margin"):
        v = getattr(cfg.remez, key)
        if v is not None:
            params[key] = v
    return params


def _data_c(state: UpgradeState) -> tuple[float | None, str]:
    """The jump position c chosen from data (None without a jump) and the placement in use."""
    cal = state.calibration_data()
    placement = state.cfg.remez.jump_placement
    if cal.rule.theta is None:
        return None, placement
    upper = placement == "upper_edge" and state.cfg.remez.margin is None
    anchor_factor = 1.0 + MARGIN_RHO if upper else 1.0
    return choose_c((cal.h / cal.rule.theta)[cal.active], anchor_factor=anchor_factor), placement


def initialize(state: UpgradeState, ctx: RunContext) -> None:
    """Fill ``state.init`` (the Remez fit and its inputs) and ``state.rsae`` (the teacher's weights, the
    fitted gate, scales from the jump rule; uncalibrated).

    Raises:
        InvalidThresholdsError: the initial RSAE is not finite on the calibration rows because thresholds are
            tiny compared with the pre-activations (:func:`rsae.checks.check_rational_init`).
    """
    cfg, family, teacher = state.cfg, state.family, state.teacher
    cal = state.calibration_data()
    rule = cal.rule
    c_data, placement = _data_c(state)
    fp = fit_params(cfg, family, c_data)
    info = dict(rule.info)
    info["c_rule"] = "request" if cfg.remez.c is not None else "data: anchor = 1 / q99.9(h / theta | active)"
    anchor = None if rule.theta is None else jump_anchor(fp["c"], fp["margin"], placement)
    if anchor is not None:
        fp["anchor"], fp["jump_placement"] = anchor, placement
    r = cfg.remez
    fit = cached_remez_fit(
        family.name,
        c=fp["c"],
        p=fp["p"],
        q=fp["q"],
        grid_points=r.grid_points,
        margin=fp["margin"],
        tol=r.tol,
        max_iter=r.max_iter,
    )
    rational_cfg: dict[str, Any] = {
        "jump": fp["c"],
        "margin": fp["margin"],
        "fit_max_error": fit.max_error,
        "thresholds": info,
        "tail": cfg.remez.tail,
    }
    if anchor is not None:
        rational_cfg.update(anchor=anchor, jump_placement=placement)
    rational_cfg.update(rule.rational)
    if rule.theta is None:
        c_in = max(quantile(cal.h.abs(), cfg.calibrate.c_in_quantile, seed=cfg.seed), 1e-6)
        scale = None
    else:
        c_in = 1.0
        scale = None if rule.per_token else rule.theta / anchor
    state.rsae = RationalSAE.from_teacher(
        teacher, a=fit.a, b=fit.b, c_in=c_in, c_out=c_in, scale=scale, rational=rational_cfg
    ).to(state.device)
    with torch.no_grad():
        check_rational_init(state.rsae.gate(cal.h), cal.h, teacher)
    state.init = InitResult(fit=fit, params=FitParams(**fp), c_in=c_in, thresholds=info, rank_capped=rule.rank_capped)
    ctx.progress.report(1.0)
