"""Implementation of :func:`rsae.pipeline.run_upgrade`, one function per stage.

Stages (``rsae.config.STAGES``): extract -> init -> calibrate -> finetune -> evaluate -> package.
Extracted activation folders are reused when their manifest matches the request, so a restarted job
does not extract twice.

Per-family initialisation (``docs/method.md`` gives the reasoning and the measurements):

- ReLU: the gate is shared by all latents (s = 1, not trained); C_in = C_out = a high quantile of |h|.
- JumpReLU: one rational cannot have a jump at every latent's own theta_j, so each latent gets the scale
  s_j = theta_j / a, which makes s_j * g(h / s_j) = h * H(h - theta_j) exactly for the target
  g(t) = t * H(t - a). a is the anchor (:func:`jump_anchor`): by default the upper edge c + delta of the
  band (c - delta, c + delta) the Remez fit excludes, so that every entry the teacher keeps lies in the
  fitted set. C_in = C_out = 1. The scales are trained like the teacher's thresholds.
- TopK (default ``remez.topk_threshold = "per_token"``): each token's jump sits at its separating threshold
  tau_i (midpoint of its k-th and (k+1)-th pre-activation), via the per-token scale s_i = tau_i / a; with
  ``remez.topk_cap`` (default) only the token's k largest pre-activations can be non-zero, so L0 <= k, and
  fine-tuning uses no L1 term (:func:`finetune_sparsity`). ``"global"``: one threshold tau, the
  (1 - k / d_sae) quantile of the teacher's real pre-activations (BatchTopK-style; Bussmann et al. 2024),
  handled as JumpReLU with theta_j = tau.

Compute-matched control (:func:`control_objective`): the teacher with its own gate, same data, batches,
steps, optimiser and L0 target; JumpReLU's control uses its own L0 penalty so its L0 can be held.
"""

from __future__ import annotations

import copy
import datetime as dt
import importlib.metadata
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from .activations import MANIFEST, ActivationStore, extract_activations
from .config import UpgradeConfig
from .device import pick_device
from .errors import NumericalError, TeacherError
from .evaluate import downstream_metrics, reconstruction_metrics
from .formats import provenance as teacher_provenance
from .models import check_layer, load_model
from .pipeline import _Progress, write_json_atomic
from .rational import RationalSAE, topk_separating_threshold
from .remez import MARGIN_RHO, cached_remez_fit, default_fit_params
from .report import Report, SAEMetrics, headline
from .sae import FAMILIES, WEIGHTS_NAME, JumpReLUSAE, SAE, TopKSAE, decoder_norm_l1, load_sae, sha256_file
from .train import calibrate_gate, calibration_loss, sample_pre_acts, set_floor, train_sae

log = logging.getLogger(__name__)

SUPPORTED_FAMILIES = FAMILIES


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("rsae-service", "torch", "transformers", "scipy", "safetensors"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def _quantile(x: torch.Tensor, q: float, max_n: int = 4_000_000, seed: int = 0) -> float:
    flat = x.reshape(-1)
    if flat.numel() > max_n:
        g = torch.Generator().manual_seed(seed)
        flat = flat[torch.randint(0, flat.numel(), (max_n,), generator=g)]
    return torch.quantile(flat.float(), q).item()


def _acts(cfg: UpgradeConfig, model, tok, split: str, n: int, folder: Path, dev: str, prog: _Progress,
          lo: float, hi: float) -> ActivationStore:
    want = {"layer": cfg.layer, "rows": n, "ctx_len": cfg.data.ctx_len, "dataset": cfg.data.dataset,
            "split": split, "eval_fraction": cfg.data.eval_fraction, "seed": cfg.seed, "model": cfg.model}
    mf = folder / MANIFEST
    if mf.is_file():
        have = json.loads(mf.read_text())
        if all(have.get(k) == v for k, v in want.items()):
            log.info("reusing %s activations in %s", split, folder)
            prog.report(hi)
            return ActivationStore(folder)
    extract_activations(model, tok, layer=cfg.layer, dataset=cfg.data.dataset, split=split, n_tokens=n,
                        out_dir=folder, ctx_len=cfg.data.ctx_len, eval_fraction=cfg.data.eval_fraction,
                        seed=cfg.seed, batch_size=cfg.data.batch_size, shard_tokens=cfg.data.shard_tokens,
                        device=dev, meta={"model": cfg.model},
                        on_progress=lambda f: prog.report(lo + (hi - lo) * f))
    return ActivationStore(folder)


def _batches(store: ActivationStore, batch: int, max_rows: int | None = None):
    n = 0
    for s in store.iter_shards():
        a = s["acts"]
        for i in range(0, a.shape[0], batch):
            if max_rows is not None and n >= max_rows:
                return
            b = a[i:i + batch]
            if max_rows is not None:
                b = b[: max_rows - n]
            n += b.shape[0]
            yield b


def _load_teacher(cfg: UpgradeConfig) -> SAE:
    teacher = load_sae(cfg.teacher)
    if isinstance(teacher, RationalSAE):
        raise TeacherError("the teacher is already a rational SAE", field="teacher")
    if cfg.family is not None and cfg.family != teacher.family:
        raise TeacherError(f"family {cfg.family!r} requested but the teacher's cfg says {teacher.family!r}",
                           field="family")
    if teacher.family not in SUPPORTED_FAMILIES:
        raise TeacherError(f"teacher family {teacher.family!r} not supported; supported: "
                           f"{SUPPORTED_FAMILIES}", field="teacher")
    return teacher


def fit_params(cfg: UpgradeConfig, family: str, c: float | None = None) -> dict[str, Any]:
    """Remez settings for ``family``: the documented defaults (:func:`rsae.remez.default_fit_params`; the
    margin follows ``c`` by its relative rule) overridden by the request's ``remez`` fields.

    ``c``: the jump position chosen from data (:func:`choose_c`); the request's ``remez.c`` wins.
    """
    if family != "relu":
        c = cfg.remez.c if cfg.remez.c is not None else c
    params = dict(default_fit_params(family, c=None if family == "relu" else c))
    for key in ("p", "q", "margin"):
        v = getattr(cfg.remez, key)
        if v is not None:
            params[key] = v
    return params


def choose_c(u_active: torch.Tensor, quantile: float = 0.999, lo: float = 0.04, hi: float = 0.5,
             anchor_factor: float = 1.0) -> float:
    """Jump position c on the unit interval from real data: 1 / (``anchor_factor`` x the ``quantile`` of
    h / theta over the teacher's active entries ``u_active`` [n]), clipped to [lo, hi] and rounded to 2
    significant digits (so fits cache).

    The teacher's threshold lands at the anchor a = ``anchor_factor`` x c (1 + rho for the default
    'upper_edge' placement, 1 for 'center'; :func:`jump_anchor`), so latent j uses s_j = theta_j / a and
    t = a h / theta_j: this rule puts all but 0.1% of the active pre-activations in [-1, 1], where the Remez
    fit is accurate, instead of extrapolating the rational beyond it.
    """
    if u_active.numel() == 0:
        return hi
    c = 1.0 / (anchor_factor * max(_quantile(u_active, quantile), 1e-6))
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


def jump_thresholds(teacher: SAE, h: torch.Tensor, topk_mode: str = "per_token"
                    ) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """Jump positions of the teacher's gate for the real pre-activations ``h`` [n, d_sae], and the rule used.

    Returns ``theta`` broadcastable against ``h``: [d_sae] per latent (JumpReLU: the teacher's thresholds;
    TopK 'global': tau, the (1 - k / d_sae) quantile of h, for every latent), [n, 1] per token (TopK
    'per_token': the midpoint of each token's k-th and (k+1)-th pre-activation), or None (ReLU).
    """
    if isinstance(teacher, JumpReLUSAE):
        return teacher.threshold.detach().clone(), {"rule": "teacher's per-latent thresholds"}
    if isinstance(teacher, TopKSAE):
        if topk_mode == "per_token":
            tau = topk_separating_threshold(h, teacher.k)
            return tau, {"rule": "per token: tau_i = midpoint of the token's k-th and (k+1)-th pre-activation",
                         "mode": "per_token", "k": teacher.k, "tau_median": tau.median().item()}
        tau = max(_quantile(h, 1.0 - teacher.k / teacher.d_sae), 1e-6)
        return (torch.full((teacher.d_sae,), tau, device=h.device),
                {"rule": "tau = (1 - k/d_sae) quantile of real pre-activations (mean count above tau = k)",
                 "mode": "global", "tau": tau, "k": teacher.k})
    return None, {"rule": "ReLU: jump at 0"}


def finetune_sparsity(cfg: UpgradeConfig, teacher: SAE, x_cal: torch.Tensor, teacher_l0: float,
                      topk_capped: bool) -> tuple[float, str, float | None]:
    """Sparsity settings of the RSAE's fine-tuning: (lambda, where it came from, L0 target or None).

    - The request's ``finetune.l1_coefficient`` wins.
    - TopK with the top-k cap (``remez.topk_cap``): lambda = 0 and no L0 target. The cap already keeps
      L0 <= k per token, whatever lambda is, so an L1 term could only shrink the values (measured: the
      controller chasing 0.95 k pushed lambda to 7.5 and the held-out MSE rose 10% above the teacher's);
      the TopK teacher itself was trained without L1 (Gao et al. 2024).
    - ReLU: the teacher's training lambda from its cfg (``metadata.l1_coefficient``) when recorded.
    - Otherwise: lambda such that the decoder-norm-weighted L1 term is 10% of the teacher's MSE on
      ``x_cal`` [n, d_in].
    The L0 target (except capped TopK) is ``finetune.l0_target_ratio`` x ``teacher_l0`` (the teacher's
    mean L0 on the calibration tokens; latents per token).
    """
    ft = cfg.finetune
    l0_target = None if ft.l0_target_ratio is None else ft.l0_target_ratio * teacher_l0
    if topk_capped:
        l0_target = None
    if ft.l1_coefficient is not None:
        return float(ft.l1_coefficient), "request", l0_target
    if topk_capped:
        return 0.0, "TopK with the top-k cap: no L1 (L0 <= k is enforced by the cap)", None
    if teacher.family == "relu" and isinstance(teacher.metadata.get("l1_coefficient"), (int, float)):
        return float(teacher.metadata["l1_coefficient"]), "teacher cfg metadata.l1_coefficient", l0_target
    with torch.no_grad():
        z = teacher.encode(x_cal)
        mse0 = (x_cal - teacher.decode(z)).pow(2).sum(-1).mean().item()
        l1_0 = decoder_norm_l1(z, teacher.W_dec).item()
    return 0.1 * mse0 / max(l1_0, 1e-12), "auto: L1 term = 10% of the teacher's MSE", l0_target


def control_objective(teacher: SAE, lam: float, lam_source: str) -> dict[str, Any]:
    """Objective of the compute-matched control (the teacher fine-tuned with its own gate).

    ReLU and TopK: the RSAE's objective (MSE + lambda * decoder-norm-weighted L1, same lambda, same L0
    controller; lambda = 0 for capped TopK, whose L0 stays at k). JumpReLU: MSE + mu * L0 with the
    straight-through kernel estimator for the thresholds (:func:`rsae.teacher.jumprelu_l0_loss`, the
    family's own sparsity penalty, Rajamanoharan et al. 2024), mu starting at the teacher's training
    coefficient (``metadata.l0_coefficient``; else the RSAE's lambda, which the controller then rescales)
    and adapted by the same L0 controller as the RSAE's lambda (``lam``, ``lam_source``: the RSAE's).
    Reason: a JumpReLU's L0 is set by its thresholds, which an L1 term barely moves; with the L1 objective the
    control ended at held-out L0 76.8 against the RSAE's 70.2 (target 69.9), so the two were not compared at
    equal L0.

    Returns:
        ``{"loss_fn": callable or None (train_sae's default), "coefficient": float, "objective": str}``.
    """
    if isinstance(teacher, JumpReLUSAE):
        from .teacher import jumprelu_l0_loss

        mu = teacher.metadata.get("l0_coefficient")
        mu = float(mu) if isinstance(mu, (int, float)) and mu > 0 else float(lam)
        return {"loss_fn": jumprelu_l0_loss, "coefficient": mu,
                "objective": "MSE + mu * L0 (straight-through kernel estimator for the thresholds; the JumpReLU "
                             "family's own penalty), mu from the teacher's l0_coefficient, adapted to the same L0 "
                             "target as the RSAE"}
    return {"loss_fn": None, "coefficient": float(lam),
            "objective": f"MSE + lambda * sum_j |z_j| ||W_dec[j]|| (as the RSAE; lambda: {lam_source})"}


COMPARISONS = (("rsae_init", "teacher"), ("rsae", "teacher"), ("rsae", "control"), ("control", "teacher"))


def comparison_table(metrics: dict[str, dict[str, Any]], paired: dict[str, dict[str, float | None]]
                     ) -> dict[str, dict[str, float | None]]:
    """``Report.comparisons``: for each pair (a, b) of :data:`COMPARISONS` present in ``metrics``,
    ``mse_rel`` = MSE_a / MSE_b - 1 and, when CE was evaluated, ``delta_ce_diff`` (nats/token) and its
    sequence-clustered standard error ``delta_ce_diff_se`` from ``paired``
    (:func:`rsae.evaluate.downstream_metrics`, keyed "a-b" or "b-a", the latter negated)."""
    out: dict[str, dict[str, float | None]] = {}
    for a, b in COMPARISONS:
        if a not in metrics or b not in metrics:
            continue
        row: dict[str, float | None] = {"mse_rel": metrics[a]["mse"] / metrics[b]["mse"] - 1.0}
        if f"{a}-{b}" in paired:
            row["delta_ce_diff"], row["delta_ce_diff_se"] = paired[f"{a}-{b}"]["diff"], paired[f"{a}-{b}"]["se"]
        elif f"{b}-{a}" in paired:
            row["delta_ce_diff"], row["delta_ce_diff_se"] = -paired[f"{b}-{a}"]["diff"], paired[f"{b}-{a}"]["se"]
        out[f"{a}-{b}"] = row
    return out


def _gate_plot(teacher: SAE, rsae_init: RationalSAE, rsae: RationalSAE, h: torch.Tensor,
               topk_mode: str, bins: int = 120) -> dict[str, Any]:
    """Data of the gate figure: teacher vs RSAE gates over the real pre-activation range, plus a histogram.

    ReLU: the shared gate over pooled h. JumpReLU (and TopK 'global'): the latent with the median threshold
    among latents active on these tokens, over its own h range (other latents differ only by their scale).
    TopK 'per_token': pooled h / tau_i (each token's separating threshold), where both gates are
    u * H(u - 1) and G(c u) / c.
    """
    theta, _ = jump_thresholds(teacher, h, topk_mode)
    with torch.no_grad():
        if theta is not None and theta.dim() == 2:  # per-token TopK: normalised units
            u_all = (h / theta).reshape(-1)
            lo, hi = _quantile(u_all, 0.0005), max(_quantile(u_all, 0.99995), 2.5)
            grid = torch.linspace(lo, hi, 400, device=h.device)
            c = rsae.jump_anchor

            def curve(sae: RationalSAE) -> list[float]:
                return (sae.gate_fn(c * grid[:, None].expand(-1, h.shape[1]))[:, 0] / c).tolist()

            counts, edges = torch.histogram(u_all.float().cpu().clamp(lo, hi), bins=bins)
            return {"h": grid.tolist(), "teacher": (grid * (grid > 1.0)).tolist(), "rsae_init": curve(rsae_init),
                    "rsae": curve(rsae), "latent": None, "theta": 1.0, "x_label": "h / tau_i (per-token threshold)",
                    "note": "TopK, per-token threshold: x = h / tau_i, gates divided by tau_i (same for all tokens)",
                    "hist": {"edges": edges.tolist(), "counts": counts.long().tolist(), "log": True,
                             "of": "all (token, latent) pre-activations / tau_i"}}
        if theta is None:
            j, vals = 0, h.reshape(-1)
        else:
            cand = torch.nonzero((teacher.gate(h) != 0).any(0)).flatten()
            if cand.numel() == 0:
                cand = torch.arange(h.shape[1], device=h.device)
            order = theta[cand].argsort()
            j = int(cand[order[order.numel() // 2]])
            vals = h[:, j]
        lo, hi = _quantile(vals, 0.0005), _quantile(vals, 0.9995)
        if theta is not None:
            hi = max(hi, 2.5 * float(theta[j]))
        grid = torch.linspace(lo, hi, 400, device=h.device)
        cols = grid[:, None].expand(-1, h.shape[1])

        def curve(sae: RationalSAE) -> list[float]:
            return sae.gate(cols)[:, j].tolist()

        teacher_curve = torch.relu(grid) if theta is None else grid * (grid > theta[j])
        counts, edges = torch.histogram(vals.float().cpu().clamp(lo, hi), bins=bins)
    return {"h": grid.tolist(), "teacher": teacher_curve.tolist(), "rsae_init": curve(rsae_init),
            "rsae": curve(rsae), "latent": None if theta is None else j,
            "theta": None if theta is None else float(theta[j]),
            "note": ("shared gate, all latents" if theta is None else
                     f"latent {j} (median threshold among active latents); other latents differ by their scale"),
            "hist": {"edges": edges.tolist(), "counts": counts.long().tolist(), "log": True,
                     "of": "all (token, latent) pre-activations" if theta is None else f"latent {j}"}}


def run(cfg: UpgradeConfig, out_dir: Path, work_dir: Path | None, prog: _Progress) -> dict[str, Any]:
    """Run all stages; see :func:`rsae.pipeline.run_upgrade` for the contract."""
    timings: dict[str, float] = {}
    dev = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = work_dir or out_dir.parent / "work"
    work.mkdir(parents=True, exist_ok=True)
    teacher = _load_teacher(cfg).to(dev)
    family = teacher.family
    notes: list[str] = []

    # -- extract -------------------------------------------------------------------------------------
    t0 = time.time()
    prog.enter("extract")
    model, tok = load_model(cfg.model, device=dev)
    check_layer(model, cfg.layer)
    d_model = model.config.hidden_size
    if teacher.d_in != d_model:
        raise TeacherError(f"teacher d_in={teacher.d_in} but model {cfg.model!r} has hidden size {d_model}",
                           field="teacher")
    tmeta_hook = teacher.metadata.get("hook_name")
    if tmeta_hook and tmeta_hook != cfg.hook:
        notes.append(f"teacher cfg names hook {tmeta_hook!r}; this upgrade reads {cfg.hook!r}")
    train = _acts(cfg, model, tok, "train", cfg.data.train_tokens, work / "acts-train", dev, prog, 0.0, 0.8)
    evals = _acts(cfg, model, tok, "eval", cfg.data.eval_tokens, work / "acts-eval", dev, prog, 0.8, 1.0)
    timings["extract"] = time.time() - t0

    # -- init: Remez fit + copy of the teacher --------------------------------------------------------
    t0 = time.time()
    prog.enter("init")
    x_cal = train.load(cfg.calibrate.tokens).to(dev)
    h = sample_pre_acts(teacher, x_cal)
    theta, theta_info = jump_thresholds(teacher, h, cfg.remez.topk_threshold)
    per_token = theta is not None and theta.dim() == 2
    with torch.no_grad():
        target = teacher.gate(h).detach()
        teacher_active = target != 0
    placement = cfg.remez.jump_placement
    anchor_factor = 1.0 + MARGIN_RHO if placement == "upper_edge" and cfg.remez.margin is None else 1.0
    c_data = None if theta is None else choose_c((h / theta)[teacher_active], anchor_factor=anchor_factor)
    fp = fit_params(cfg, family, c_data)
    anchor = None if theta is None else jump_anchor(fp["c"], fp["margin"], placement)
    theta_info["c_rule"] = ("request" if cfg.remez.c is not None else
                            "data: anchor = 1 / q99.9(h / theta | active)")
    if anchor is not None:
        fp["anchor"], fp["jump_placement"] = anchor, placement
    r = cfg.remez
    fit = cached_remez_fit(family, c=fp["c"], p=fp["p"], q=fp["q"], grid_points=r.grid_points,
                           margin=fp["margin"], tol=r.tol, max_iter=r.max_iter)
    rational_cfg = {"jump": fp["c"], "margin": fp["margin"], "fit_max_error": fit.max_error,
                    "thresholds": theta_info}
    if anchor is not None:
        rational_cfg.update(anchor=anchor, jump_placement=placement)
    if theta is None:
        c_in = c_out = max(_quantile(h.abs(), cfg.calibrate.c_in_quantile, seed=cfg.seed), 1e-6)
        scale = None
    else:
        c_in = c_out = 1.0
        scale = None if per_token else theta / anchor
        if per_token:
            rational_cfg["topk_k"] = teacher.k
            rational_cfg["topk_cap"] = bool(cfg.remez.topk_cap)
    rsae = RationalSAE.from_teacher(teacher, a=fit.a, b=fit.b, c_in=c_in, c_out=c_out, scale=scale,
                                    rational=rational_cfg).to(dev)
    # The gate is calibrated at unit scale: per-token TopK upgrades see h / s_i (s_i = tau_i / anchor) and
    # targets / s_i, since z = s_i * G(h / s_i).
    s_tok = theta / anchor if per_token else None
    h_fit = h if s_tok is None else h / s_tok
    target_fit = target if s_tok is None else target / s_tok
    timings["init"] = time.time() - t0
    prog.report(1.0)

    # -- calibrate: gate scalars only, weights frozen ---------------------------------------------------
    t0 = time.time()
    prog.enter("calibrate")
    topk_capped = per_token and bool(cfg.remez.topk_cap)
    cal_objective = cfg.calibrate.objective
    if cal_objective == "auto":
        cal_objective = "selected" if topk_capped else "all"
    selected = teacher_active if cal_objective == "selected" else None
    with torch.no_grad():
        teacher_l0_cal = teacher_active.sum(-1).float().mean().item()
        pre_loss = calibration_loss(rsae.gate_fn, h_fit, target_fit, selected).item()
    cal_losses = calibrate_gate(rsae, h_fit, target_fit, steps=cfg.calibrate.steps, lr=cfg.calibrate.lr,
                                seed=cfg.seed, sample=cfg.calibrate.sample, selected=selected,
                                on_step=lambda s, l: prog.report(s / max(1, cfg.calibrate.steps)))
    if topk_capped:  # the cap selects (L0 <= k); the floor only drops kept entries whose r is not positive
        rsae.gate_fn.floor.fill_(0.0)
        floor, floor_rule = 0.0, "0 (TopK cap: the top-k rule selects; z != 0 where r > 0 among the k largest h)"
    else:
        floor = set_floor(rsae, h_fit, teacher_l0_cal)
        floor_rule = "r-units; L0 on the calibration tokens equals the teacher's"
    with torch.no_grad():
        rsae_active = rsae.encode(x_cal) != 0
        agreement = {
            "teacher_active_kept": (rsae_active & teacher_active).sum().item() / max(1, teacher_active.sum().item()),
            "teacher_inactive_leaked": (rsae_active & ~teacher_active).sum().item()
            / max(1, (~teacher_active).sum().item())}
    m_teacher = reconstruction_metrics(teacher, _batches(evals, 2048))
    m_init = reconstruction_metrics(rsae, _batches(evals, 2048))
    rsae_init = copy.deepcopy(rsae).eval()
    prog.report(1.0, {"stage": "calibrate", "teacher_mse": m_teacher["mse"], "teacher_l0": m_teacher["l0"],
                      "rsae_init_mse": m_init["mse"], "rsae_init_l0": m_init["l0"]})
    timings["calibrate"] = time.time() - t0

    # -- finetune: all parameters; then the compute-matched control -------------------------------------
    t0 = time.time()
    prog.enter("finetune")
    ft = cfg.finetune
    # The L0 target is relative to the teacher's L0 on the whole fine-tuning set, not on the calibration rows:
    # a teacher is sparser on the documents it was trained on (measured: 70.2 there vs 73.5 held out), and
    # fine-tuning rows beyond those would otherwise push the RSAE's held-out L0 above the teacher's.
    teacher_l0_train = reconstruction_metrics(teacher, _batches(train, 4096))["l0"]
    lam, lam_source, l0_target = finetune_sparsity(cfg, teacher, x_cal, teacher_l0_train, topk_capped)
    del x_cal, h, h_fit, target, target_fit, teacher_active, rsae_active, selected
    eval_rows = min(evals.rows, 4096)
    n_runs = 2 if ft.control else 1

    def make_on_step(sae: SAE, curve: list[dict[str, float]], run_index: int):
        def on_step(step: int, parts: dict[str, float]) -> None:
            frac = (run_index + step / max(1, ft.steps)) / n_runs
            if step % ft.eval_every == 0 or step == ft.steps:
                sae.eval()
                m = reconstruction_metrics(sae, _batches(evals, 2048, eval_rows))
                sae.train()
                point = {"step": step, "train_mse": parts["mse"], "train_l0": parts["l0"],
                         "lambda": parts["lambda"], "eval_mse": m["mse"], "eval_l0": m["l0"],
                         "eval_fvu": m["fvu"]}
                curve.append(point)
                prog.report(frac, {"run": "rsae" if run_index == 0 else "control", **point})
            else:
                prog.report(frac)
        return on_step

    gate_params = rsae.gate_parameters()
    gate_ids = {id(p) for p in gate_params}
    threshold_lr = ft.gate_lr if ft.threshold_lr is None else ft.threshold_lr
    scale_params = [p for p in gate_params if p is rsae.gate_fn.log_scale]
    groups = [{"params": [p for p in rsae.parameters() if id(p) not in gate_ids and p.requires_grad], "lr": ft.lr},
              {"params": [p for p in gate_params if p is not rsae.gate_fn.log_scale], "lr": ft.gate_lr}]
    if scale_params:
        groups.append({"params": scale_params, "lr": threshold_lr})
    curve: list[dict[str, float]] = []
    hist = train_sae(rsae, train, steps=ft.steps, batch_size=ft.batch_size, lr=ft.lr, l1_coefficient=lam,
                     seed=cfg.seed + 1, device=dev, param_groups=groups, l0_target=l0_target,
                     on_step=make_on_step(rsae, curve, 0),
                     checkpoint=prog.train_checkpoint("finetune-rsae", curve))
    control = None
    control_info: dict[str, Any] | None = None
    if ft.control:
        control = copy.deepcopy(teacher).to(dev)
        ctrl_gate = [control.log_threshold] if isinstance(control, JumpReLUSAE) else []
        ctrl_ids = {id(p) for p in ctrl_gate}
        ctrl_groups = [{"params": [p for p in control.parameters() if id(p) not in ctrl_ids], "lr": ft.lr}]
        if ctrl_gate:
            ctrl_groups.append({"params": ctrl_gate, "lr": threshold_lr})
        ctrl = control_objective(teacher, lam, lam_source)
        ctrl_curve: list[dict[str, float]] = []
        ctrl_hist = train_sae(control, train, steps=ft.steps, batch_size=ft.batch_size, lr=ft.lr,
                              l1_coefficient=ctrl["coefficient"], loss_fn=ctrl["loss_fn"], seed=cfg.seed + 1,
                              device=dev, param_groups=ctrl_groups, l0_target=l0_target,
                              on_step=make_on_step(control, ctrl_curve, 1),
                              checkpoint=prog.train_checkpoint("finetune-control", ctrl_curve))
        control_info = {"what": "the teacher fine-tuned with its own gate: same training tokens, batches, steps, "
                                "optimiser, learning rates and L0 target (controller) as the RSAE",
                        "objective": ctrl["objective"], "initial_coefficient": ctrl["coefficient"],
                        "final_coefficient": ctrl_hist[-1]["lambda"] if ctrl_hist else ctrl["coefficient"],
                        "curve": ctrl_curve, "final_train": ctrl_hist[-1] if ctrl_hist else None}
    timings["finetune"] = time.time() - t0

    # -- evaluate ------------------------------------------------------------------------------------------
    t0 = time.time()
    prog.enter("evaluate")
    saes: dict[str, SAE] = {"teacher": teacher, "rsae_init": rsae_init, "rsae": rsae}
    if control is not None:
        control.eval()
        saes["control"] = control
    metrics: dict[str, dict[str, Any]] = {"teacher": m_teacher, "rsae_init": m_init}
    for k in saes:
        if k not in metrics:
            metrics[k] = reconstruction_metrics(saes[k], _batches(evals, 2048))
    ds: dict[str, Any] = {"paired": {}}
    if cfg.eval.ce_sequences > 0:
        ids, _ = evals.sequences(cfg.eval.ce_sequences)
        ds = downstream_metrics(model, cfg.layer, saes, ids, batch_size=cfg.eval.batch_size, device=dev,
                                on_progress=lambda f: prog.report(0.8 * f))
        for k in saes:
            metrics[k].update(ce_clean=ds["clean"]["ce"], ce_zero=ds["zero"]["ce"], ce_spliced=ds[k]["ce_spliced"],
                              delta_ce=ds[k]["delta_ce"], delta_ce_se=ds[k]["delta_ce_se"],
                              loss_recovered=ds[k]["loss_recovered"], kl=ds[k]["kl"], ce_tokens=ds["clean"]["tokens"])
    comparisons = comparison_table(metrics, ds["paired"])
    probing = _probe(cfg, saes, train, evals, notes)
    if probing is not None:
        for k in saes:
            metrics[k]["probe_accuracy"] = probing["by_sae"][k]["k"]
    x_plot = train.load(min(cfg.calibrate.tokens, 2048)).to(dev)
    with torch.no_grad():
        plots = {"gate": _gate_plot(teacher, rsae_init, rsae, sample_pre_acts(teacher, x_plot),
                                    cfg.remez.topk_threshold)}
    del x_plot
    timings["evaluate"] = time.time() - t0

    # -- package -------------------------------------------------------------------------------------------
    t0 = time.time()
    prog.enter("package")
    teacher_w = Path(cfg.teacher) / WEIGHTS_NAME
    provenance = {"source": str(cfg.teacher), "sha256": sha256_file(teacher_w),
                  "architecture": teacher.architecture, "family": family, "d_in": teacher.d_in,
                  "d_sae": teacher.d_sae, "l1_coefficient": teacher.metadata.get("l1_coefficient"),
                  "k": getattr(teacher, "k", None)}
    provenance["original"] = teacher_provenance(cfg.teacher).get("original")  # format it was imported from
    rsae.metadata = {**teacher.metadata, "model_name": cfg.model, "hook_name": cfg.hook, "hook_layer": cfg.layer,
                     # the cfg follows the SAELens 6 schema; with this key SAELens keeps the metadata on load
                     "sae_lens_version": "6.0.0",
                     "teacher": provenance, "method": "rsae (Yin & Yu 2026, arXiv 2606.14990)",
                     "upgrade_config": cfg.model_dump(mode="json"), "versions": _versions()}
    bad = [n for n, t in rsae.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:  # never publish a broken SAE as a success
        raise NumericalError(f"the upgraded SAE has non-finite values in {bad}; try a lower finetune.lr or "
                             "calibrate.lr, or report the teacher", field="settings.finetune.lr")
    rsae.cpu().save(out_dir)
    sm = {k: SAEMetrics(**v) for k, v in metrics.items()}
    notes += [
        "Position 0 of every sequence (attention sink) is excluded from activations and metrics.",
        "FVU is pooled about the per-dimension mean; fvu_about_zero divides by sum x^2.",
        f"{evals.manifest['stats']['frac_norm_above_3x_median_sample']:.2%} of held-out tokens (sample) have "
        "residual norm > 3x the median; they are kept and weigh heavily in MSE and FVU.",
        "L0 counts exactly non-zero latents; the RSAE's exact zeros come from "
        + ("the top-k cap (only each token's k largest pre-activations can be non-zero) and a floor of 0 on r."
           if topk_capped else "its floor (r-units), set so its L0 on the calibration tokens equals the teacher's."),
    ]
    if family == "topk" and theta_info.get("mode") == "global":
        notes.append(f"TopK teacher: the RSAE replaces per-token top-{teacher.k} by the threshold tau = "
                     f"{theta_info['tau']:.4g}; its L0 varies per token (mean reported).")
    elif family == "topk":
        notes.append(f"TopK teacher: the RSAE's jump sits at each token's separating threshold (midpoint of its "
                     f"{teacher.k}-th and {teacher.k + 1}-th pre-activation); the rational shapes the values and "
                     "the floor decides the entries inside the margin around the jump.")
    g = rsae.gate_fn
    report = Report(
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(),
        config=cfg.model_dump(mode="json"),
        host_model={"name": cfg.model, "layer": cfg.layer, "hook": cfg.hook, "d_model": d_model,
                    "n_layers": model.config.num_hidden_layers, "device": dev},
        teacher=provenance,
        data={"train": {k: train.manifest[k] for k in ("rows", "ctx_len", "dataset", "split", "stats")},
              "eval": {k: evals.manifest[k] for k in ("rows", "ctx_len", "dataset", "split", "stats")}},
        remez={**{k: v for k, v in fit.__dict__.items()}, "params": fp},
        calibration={"steps": cfg.calibrate.steps, "tokens": cfg.calibrate.tokens, "objective": cal_objective,
                     "loss_before": pre_loss,
                     "loss_after": cal_losses[-1] if cal_losses else pre_loss, "c_in_init": c_in,
                     "thresholds": theta_info, "teacher_l0_calibration_tokens": teacher_l0_cal,
                     "floor": floor, "floor_over_fit_max_error": floor / fit.max_error if fit.max_error else None,
                     "floor_rule": floor_rule,
                     "agreement": agreement},
        finetune={"steps": ft.steps, "batch_size": ft.batch_size, "lr": ft.lr, "gate_lr": ft.gate_lr,
                  "l1_coefficient": lam, "l1_source": lam_source, "l0_target": l0_target,
                  "teacher_l0_train": teacher_l0_train,
                  "final_lambda": hist[-1]["lambda"] if hist else lam, "curve": curve,
                  "final_train": hist[-1] if hist else None,
                  "gate": {"a": g.a.tolist(), "b": g.b.tolist(), "c_in": g.c_in.item(), "c_out": g.c_out.item(),
                           "floor": g.floor.item(), "train_scale": g.train_scale,
                           "scale_median": g.scale.median().item()}},
        control=control_info,
        probing=probing,
        plots=plots,
        metrics=sm,
        comparisons=comparisons,
        headline=headline(sm),
        eval_split={"model": cfg.model, "layer": cfg.layer, "dataset": cfg.data.dataset, "split": "eval",
                    "eval_fraction": cfg.data.eval_fraction, "seed": cfg.seed, "ctx_len": cfg.data.ctx_len,
                    "eval_tokens": cfg.data.eval_tokens},
        notes=notes,
        timings_s={**{k: round(v, 2) for k, v in timings.items()}, "package": 0.0},
        versions=_versions(),
    )
    data = json.loads(report.model_dump_json())
    _write_html(data, out_dir, notes)
    data["timings_s"]["package"] = round(time.time() - t0, 2)
    write_json_atomic(out_dir / "report.json", data)
    prog.report(1.0, {"stage": "package", **{k: v for k, v in data["headline"].items() if v is not None}},
                force=True)
    return data


def _probe(cfg: UpgradeConfig, saes: dict[str, SAE], train: ActivationStore, evals: ActivationStore,
           notes: list[str]) -> dict[str, Any] | None:
    """k-sparse probing of every SAE on the data set's labels (None when unlabelled or disabled)."""
    if not cfg.eval.probe_ks or cfg.eval.probe_train_sequences == 0:
        return None
    _, tr_labels = train.sequences(cfg.eval.probe_train_sequences)
    _, ev_labels = evals.sequences()
    if (tr_labels >= 0).sum() < 10 or len(set((ev_labels[ev_labels >= 0]).tolist())) < 2:
        notes.append("sparse probing skipped: the data set has too few labelled sequences")
        return None
    from .probing import probe_sae

    out: dict[str, Any] = {"ks": cfg.eval.probe_ks, "train_sequences": cfg.eval.probe_train_sequences,
                           "by_sae": {}}
    for i, (name, sae) in enumerate(saes.items()):
        res = probe_sae(sae, train, evals, ks=cfg.eval.probe_ks, max_sequences=cfg.eval.probe_train_sequences,
                        seed=cfg.seed, dense=(i == 0))
        out["by_sae"][name] = res["sae"]
        if i == 0:
            out["dense_baseline"] = res["dense"]
            out["activations_top_k"] = res["activations_top_k"]
    return out


def _write_html(data: dict[str, Any], out_dir: Path, notes: list[str]) -> None:
    """Write ``report.html`` beside ``report.json`` (a failure to render is noted, never fatal)."""
    try:
        from .report_html import write_report_html
    except ImportError:  # pragma: no cover - the renderer ships with the package
        return
    try:
        write_report_html(data, out_dir / "report.html")
    except Exception as e:  # noqa: BLE001 - a plotting failure must not lose the upgraded SAE
        log.exception("report.html could not be rendered")
        notes.append(f"report.html could not be rendered: {type(e).__name__}: {e}")
