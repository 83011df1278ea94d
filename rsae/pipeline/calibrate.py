"""Stage 3, calibrate: fit the gate's shared scalars (a, b, C_in, C_out) to the teacher's gate on real
pre-activations, weights frozen; then set the exact-zero floor; measure the teacher and the calibrated RSAE.

Per-token jump rules (TopK) calibrate at unit scale: the RSAE sees h / s_i and targets / s_i
(s_i = tau_i / anchor), since z = s_i G(h / s_i). With a rank cap (TopK), the objective defaults to the
selected entries and the floor is 0: the teacher's top-k rule selects.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from ..evaluate import reconstruction_metrics
from ..report import Agreement, CalibrationSection, SAEMetrics
from ..saes import RationalSAE
from .progress import RunContext
from .state import UpgradeState


def calibration_loss(
    rsae: RationalSAE, h: torch.Tensor, target: torch.Tensor, selected: torch.Tensor | None = None
) -> torch.Tensor:
    """The calibration objective of :func:`calibrate_gate` on one sample (0-dim tensor, squared units of z).

    ``mean (phi_raw(h) - g(h))^2`` over all entries of ``h`` [n, d_sae] (``target`` = g(h), same shape); with
    ``selected`` [n, d_sae] (bool), entries outside it count as exact zeros (the RSAE's selection zeroes
    them), i.e. ``phi_raw`` is replaced by 0 there.
    """
    out = rsae.gate_raw(h)
    if selected is not None:
        out = torch.where(selected, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return (out - target).pow(2).mean()


def calibrate_gate(
    rsae: RationalSAE,
    h: torch.Tensor,
    target: torch.Tensor,
    *,
    steps: int,
    lr: float,
    seed: int = 0,
    sample: int = 1 << 17,
    decay_frac: float = 0.5,
    selected: torch.Tensor | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Calibrate (a, b, C_in, C_out) with all SAE weights (and per-latent scales) frozen.

    Adam on the l2 objective mean (phi_raw(h) - g(h))^2 over the teacher's real pre-activations (RSAE
    summary, "calibration"); each step uses ``sample`` (token, latent) entries: random whole token rows of
    ``h``, so every entry keeps its latent's scale. The learning rate decays linearly to 0 over the last
    ``decay_frac`` of the steps, so the final scalars are not left at the noise level of one sample. Only the
    gate scalars require gradients meanwhile (the weights and per-latent scales are frozen for the loop).

    Cost: one fused gate forward + backward over ``sample`` entries per step (measured costs of the sample
    size: ``docs/method.md``).

    Args:
        h: real pre-activations [n, d_sae]; target: the teacher's gate output g(h), same shape.
        selected: optional bool mask [n, d_sae] of the entries the RSAE's selection keeps (the teacher's
            active entries): the objective becomes mean (selected * phi_raw(h) - g(h))^2, i.e. entries outside
            it count as exact zeros (``CalibrateConfig.objective = "selected"``).
        steps, lr: Adam steps and peak learning rate. sample: entries per step (rounded to whole rows).

    Returns:
        Loss per step (squared units of z).
    """
    params = rsae.gate_scalars()
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    rows = max(1, min(h.shape[0], sample // max(1, h.shape[-1])))
    losses = []
    frozen = [p for p in rsae.parameters() if p.requires_grad and all(p is not q for q in params)]
    for p in frozen:  # no gradient work for the frozen weights / per-latent scales
        p.requires_grad_(False)
    decay_start = int(steps * (1.0 - decay_frac))
    try:
        for step in range(steps):
            if step >= decay_start and steps > decay_start:
                opt.param_groups[0]["lr"] = lr * (steps - step) / (steps - decay_start)
            idx = torch.randint(0, h.shape[0], (rows,), generator=gen).to(h.device)
            loss = calibration_loss(rsae, h[idx], target[idx], None if selected is None else selected[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(step + 1, losses[-1])
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return losses


@torch.no_grad()
def set_floor(rsae: RationalSAE, h: torch.Tensor, teacher_l0: float, *, max_entries: int = 16_000_000) -> float:
    """Set the exact-zero floor (units of r) so that the RSAE's mean L0 on ``h`` equals ``teacher_l0``.

    The floor is the (1 - teacher_l0 / d_sae) quantile of r(t) over the (token, latent) entries of the real
    pre-activations ``h`` [n, d_sae]: exactly as many entries pass as the teacher activates, so L0 is
    matched by construction on these tokens (held-out L0 is measured and reported). Clipped below at 0.

    Returns:
        The floor, in units of r (the unit-interval gate).
    """
    r = rsae.gate_unit(h).reshape(-1).float()
    if r.numel() > max_entries:
        r = r[torch.randperm(r.numel(), device=r.device)[:max_entries]]
    frac_active = min(1.0, max(0.0, teacher_l0 / h.shape[-1]))
    k = max(1, min(r.numel(), int(round((1.0 - frac_active) * r.numel()))))
    floor = max(0.0, r.kthvalue(k).values.item())
    rsae.set_floor(floor)
    return floor


def _agreement(rsae: RationalSAE, x: torch.Tensor, teacher_active: torch.Tensor) -> Agreement:
    """Share of the teacher's active entries the RSAE keeps, and of its inactive ones it lets through."""
    with torch.no_grad():
        rsae_active = rsae.encode(x) != 0
    kept = (rsae_active & teacher_active).sum().item() / max(1, teacher_active.sum().item())
    leaked = (rsae_active & ~teacher_active).sum().item() / max(1, (~teacher_active).sum().item())
    return Agreement(teacher_active_kept=kept, teacher_inactive_leaked=leaked)


def calibrate(state: UpgradeState, ctx: RunContext) -> None:
    """Calibrate ``state.rsae`` in place, set its floor; fill ``state.calibration``, ``state.rsae_init`` (a
    frozen copy), ``state.teacher_metrics`` and ``state.init_metrics`` (held-out)."""
    cfg, rsae = state.cfg, state.rsae
    cal = state.calibration_data()
    rule = cal.rule
    s_tok = rule.theta / state.init.params.anchor if rule.per_token else None
    h_fit = cal.h if s_tok is None else cal.h / s_tok
    target_fit = cal.target if s_tok is None else cal.target / s_tok
    objective = cfg.calibrate.objective
    if objective == "auto":
        objective = "selected" if rule.rank_capped else "all"
    selected = cal.active if objective == "selected" else None
    with torch.no_grad():
        teacher_l0 = cal.active.sum(-1).float().mean().item()
        pre_loss = calibration_loss(rsae, h_fit, target_fit, selected).item()
    steps = cfg.calibrate.steps
    losses = calibrate_gate(
        rsae,
        h_fit,
        target_fit,
        steps=steps,
        lr=cfg.calibrate.lr,
        seed=cfg.seed,
        sample=cfg.calibrate.sample,
        selected=selected,
        on_step=lambda s, _: ctx.progress.report(s / max(1, steps)),
    )
    if rule.rank_capped:  # the cap selects (L0 <= k); the floor only drops kept entries whose r is not positive
        rsae.set_floor(0.0)
        floor, floor_rule = 0.0, "0 (TopK cap: the top-k rule selects; z != 0 where r > 0 among the k largest h)"
    else:
        floor = set_floor(rsae, h_fit, teacher_l0)
        floor_rule = "r-units; L0 on the calibration tokens equals the teacher's"
    agreement = _agreement(rsae, cal.x, cal.active)
    state.teacher_metrics = SAEMetrics(**reconstruction_metrics(state.teacher, state.evals.iter_ordered(2048)))
    state.init_metrics = SAEMetrics(**reconstruction_metrics(rsae, state.evals.iter_ordered(2048)))
    state.rsae_init = copy.deepcopy(rsae).eval()
    fit = state.init.fit
    state.calibration = CalibrationSection(
        steps=steps,
        tokens=cfg.calibrate.tokens,
        objective=objective,
        loss_before=pre_loss,
        loss_after=losses[-1] if losses else pre_loss,
        c_in_init=state.init.c_in,
        thresholds=state.init.thresholds,
        teacher_l0_calibration_tokens=teacher_l0,
        floor=floor,
        floor_over_fit_max_error=floor / fit.max_error if fit.max_error else None,
        floor_rule=floor_rule,
        agreement=agreement,
    )
    m_t, m_i = state.teacher_metrics, state.init_metrics
    ctx.progress.report(
        1.0,
        {
            "stage": "calibrate",
            "teacher_mse": m_t.mse,
            "teacher_l0": m_t.l0,
            "rsae_init_mse": m_i.mse,
            "rsae_init_l0": m_i.l0,
        },
    )
