"""Stage 4, finetune: train all of the RSAE's parameters, then the compute-matched control.

The RSAE: Adam on MSE + lambda * decoder-norm-weighted L1 (:func:`finetune_sparsity` picks lambda), with the
L0 controller holding its training L0 at the target, by the sparse-aware step of :mod:`rsae.sparse` unless
``finetune.step_path`` is "dense" (a ReLU control too; other controls' objectives keep the dense step). The
control: the teacher with its own gate, trained on the same tokens, batches, steps, optimiser, learning rates
and L0 target, with its family's control objective (:meth:`rsae.saes.Family.control_objective`).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from ..config import UpgradeConfig
from ..errors import TeacherError
from ..evaluate import reconstruction_metrics
from ..hooks import site_for
from ..kl import KLTerm, with_kl
from ..report import ControlSection, CurvePoint, FinetuneSection
from ..saes import SAE, Family, decoder_norm_l1
from ..saes.family import Objective
from ..saes.rational import rational_l0_loss
from ..train import train_sae
from .progress import RunContext
from .state import UpgradeState


def finetune_sparsity(
    cfg: UpgradeConfig, family: Family, teacher: SAE, x_cal: torch.Tensor, teacher_l0: float, rank_capped: bool
) -> tuple[float, str, float | None]:
    """Sparsity settings of the RSAE's fine-tuning: (lambda, where it came from, L0 target or None).

    - The request's ``finetune.l1_coefficient`` wins.
    - A rank-capped gate (TopK with the top-k cap): lambda = 0 and no L0 target; the cap already keeps
      L0 <= k per token, so an L1 term could only shrink the values (measured: ``docs/method.md``).
    - The family's own coefficient when it has one (:meth:`rsae.saes.Family.teacher_l1`; ReLU: the
      teacher's training lambda from its cfg).
    - Otherwise: lambda such that the decoder-norm-weighted L1 term is 10% of the teacher's MSE on
      ``x_cal`` [n, d_in].
    The L0 target (except when capped) is ``finetune.l0_target_ratio`` x ``teacher_l0`` (latents per token).
    """
    ft = cfg.finetune
    l0_target = None if ft.l0_target_ratio is None or rank_capped else ft.l0_target_ratio * teacher_l0
    if ft.l1_coefficient is not None:
        return float(ft.l1_coefficient), "request", l0_target
    if rank_capped:
        return 0.0, "TopK with the top-k cap: no L1 (L0 <= k is enforced by the cap)", None
    own = family.teacher_l1(teacher)
    if own is not None:
        return own[0], own[1], l0_target
    with torch.no_grad():
        z = teacher.encode(x_cal)
        mse0 = (x_cal - teacher.decode(z)).pow(2).sum(-1).mean().item()
        l1_0 = decoder_norm_l1(z, teacher.W_dec).item()
    return 0.1 * mse0 / max(l1_0, 1e-12), "auto: L1 term = 10% of the teacher's MSE", l0_target


def _on_step(
    state: UpgradeState, ctx: RunContext, sae: SAE, curve: list[dict[str, float]], run_index: int, n_runs: int
) -> Callable[[int, dict[str, float]], None]:
    """``train_sae``'s ``on_step``: progress, and a held-out evaluation every ``eval_every`` steps appended
    to ``curve``."""
    ft = state.cfg.finetune
    eval_rows = min(state.evals.rows, 4096)

    def on_step(step: int, parts: dict[str, float]) -> None:
        frac = (run_index + step / max(1, ft.steps)) / n_runs
        if step % ft.eval_every == 0 or step == ft.steps:
            sae.eval()
            m = reconstruction_metrics(sae, state.evals.iter_ordered(2048, eval_rows))
            sae.train()
            point = {
                "step": step,
                "train_mse": parts["mse"],
                "train_l0": parts["l0"],
                "lambda": parts["lambda"],
                "eval_mse": m["mse"],
                "eval_l0": m["l0"],
                "eval_fvu": m["fvu"],
            }
            curve.append(point)
            ctx.progress.report(frac, {"run": "rsae" if run_index == 0 else "control", **point})
        else:
            ctx.progress.report(frac)

    return on_step


class KLSetup:
    """The KL term of ``finetune.objective = "mse+kl"`` (:mod:`rsae.kl`): its coefficient ``beta`` and a factory
    of :class:`rsae.kl.KLTerm` that draw the same training sequences for the RSAE and the control."""

    def __init__(self, state: UpgradeState, cal_x: torch.Tensor) -> None:
        ft = state.cfg.finetune
        model, _ = state.host_model()
        self.site = site_for(model, state.cfg.layer, state.cfg.hook)
        self.model, self.sequences, self.seed = model, ft.kl_sequences, state.cfg.seed + 2
        self.input_ids, _ = state.train.sequences()
        if ft.kl_coefficient is not None:
            self.beta = float(ft.kl_coefficient)
            return
        term = self.term()
        try:
            with torch.no_grad():
                teacher = copy.deepcopy(state.teacher).to(state.device)
                kl0 = term(teacher).item()
                x = cal_x.to(state.device)
                mse0 = (x - teacher(x)).pow(2).sum(-1).mean().item()
        finally:
            term.close()
        self.beta = mse0 / max(kl0, 1e-6)

    def term(self) -> KLTerm:
        """A fresh term (same seed: the same sequence draws step by step); close it after training."""
        return KLTerm(self.model, self.site, self.input_ids, sequences=self.sequences, seed=self.seed)


def _train_control(
    state: UpgradeState,
    ctx: RunContext,
    lam: float,
    lam_source: str,
    l0_target: float | None,
    threshold_lr: float,
    kl: KLSetup | None,
) -> None:
    """Fine-tune a copy of the teacher with its family's control objective (plus the KL term when ``kl``);
    fill ``state.control`` and ``state.control_section``."""
    ft, family = state.cfg.finetune, state.family
    control = copy.deepcopy(state.teacher).to(state.device)
    groups = control.param_groups_with(ft.lr, (family.threshold_parameters(control), threshold_lr))
    objective = family.control_objective(state.teacher, lam, lam_source)
    term = kl.term() if kl is not None else None
    loss_fn = objective.loss_fn if term is None else with_kl(objective.loss_fn, term, kl.beta)
    curve: list[dict[str, float]] = []
    try:
        hist = _train(state, ctx, control, objective.coefficient, loss_fn, groups, l0_target, curve, 1, 2)
    finally:
        if term is not None:
            term.close()
    state.control = control.eval()
    description = objective.description if term is None else f"{objective.description} + beta * KL(clean || spliced)"
    state.control_section = ControlSection(
        steps=ft.steps,
        batch_size=ft.batch_size,
        what="the teacher fine-tuned with its own gate: same training tokens, batches, steps, optimiser, "
        "learning rates, L0 target (controller) and objective terms as the RSAE",
        objective=description,
        initial_coefficient=objective.coefficient,
        final_coefficient=hist[-1]["lambda"] if hist else objective.coefficient,
        curve=[CurvePoint.model_validate(p) for p in curve],
        final_train=hist[-1] if hist else None,
    )


def rsae_objective(state: UpgradeState, lam: float, lam_source: str) -> Objective:
    """The RSAE's fine-tuning objective (``finetune.rsae_penalty``): 'l1' = :func:`rsae.saes.family.sae_loss`
    at ``lam``; 'l0' = :func:`rsae.saes.rational.rational_l0_loss` with the teacher's straight-through bandwidth,
    its coefficient starting where the control's does (:meth:`rsae.saes.Family.control_objective`).

    Raises:
        TeacherError: 'l0' for an upgrade without trained per-latent thresholds (a ReLU or TopK teacher).
    """
    ft = state.cfg.finetune
    if ft.rsae_penalty == "l1":
        if ft.rsae_input_grad != "exact":
            raise TeacherError(
                "finetune.rsae_input_grad 'linear' needs finetune.rsae_penalty 'l0'", field="finetune.rsae_input_grad"
            )
        return Objective(None, lam, f"MSE + lambda * sum_j |z_j| ||W_dec[j]|| (lambda: {lam_source})")
    if not state.rsae.gate_fn.train_scale or state.rsae.topk_k is not None:
        raise TeacherError(
            "finetune.rsae_penalty 'l0' needs a JumpReLU teacher (per-latent thresholds)",
            field="finetune.rsae_penalty",
        )
    start = state.family.control_objective(state.teacher, lam, lam_source).coefficient
    linear = ft.rsae_input_grad == "linear"
    return Objective(
        rational_l0_loss(
            linear_input_grad=linear,
            scales_only=ft.rsae_l0_grad != "gate",
            scales_as_thresholds=ft.rsae_l0_grad == "thresholds",
        ),
        start,
        "MSE + mu * L0 (L0 of the gate's support r(t) > floor, straight-through kernel of width floor to a, b, "
        "C_in and s; the JumpReLU control's kind of penalty), mu starting at the control's coefficient"
        + ("; dz/dh = C_out / C_in on the support (straight-through)" if linear else "")
        + ("; the L0 term's gradient reaches the per-latent scales only" if ft.rsae_l0_grad != "gate" else "")
        + ("; the scales learn through the support's estimator only" if ft.rsae_l0_grad == "thresholds" else ""),
    )


def finetune(state: UpgradeState, ctx: RunContext) -> None:
    """Fine-tune ``state.rsae`` in place (and the control when requested); fill ``state.finetune`` and, with
    the control, ``state.control`` and ``state.control_section``."""
    cfg, ft = state.cfg, state.cfg.finetune
    cal = state.calibration_data()
    # The L0 target is relative to the teacher's L0 on the whole fine-tuning set, not on the calibration rows
    # (a teacher is sparser on the documents it was trained on; docs/method.md).
    teacher_l0 = reconstruction_metrics(state.teacher, state.train.iter_ordered(4096))["l0"]
    lam, lam_source, l0_target = finetune_sparsity(
        cfg, state.family, state.teacher, cal.x, teacher_l0, cal.rule.rank_capped
    )
    kl = KLSetup(state, cal.x[:4096]) if ft.objective == "mse+kl" else None
    state.release_calibration_data()
    threshold_lr = ft.gate_lr if ft.threshold_lr is None else ft.threshold_lr
    rsae = state.rsae
    objective = rsae_objective(state, lam, lam_source)
    term = kl.term() if kl is not None else None
    loss_fn = objective.loss_fn if term is None else with_kl(objective.loss_fn, term, kl.beta)
    curve: list[dict[str, float]] = []
    n_runs = 2 if ft.control else 1
    try:
        groups = rsae.param_groups(ft.lr, ft.gate_lr, threshold_lr)
        hist = _train(state, ctx, rsae, objective.coefficient, loss_fn, groups, l0_target, curve, 0, n_runs)
    finally:
        if term is not None:
            term.close()
    if ft.control:
        _train_control(state, ctx, lam, lam_source, l0_target, threshold_lr, kl)
    state.finetune = FinetuneSection(
        steps=ft.steps,
        batch_size=ft.batch_size,
        lr=ft.lr,
        gate_lr=ft.gate_lr,
        l1_coefficient=objective.coefficient,
        l1_source=lam_source if objective.loss_fn is None else objective.description,
        l0_target=l0_target,
        teacher_l0_train=teacher_l0,
        final_lambda=hist[-1]["lambda"] if hist else objective.coefficient,
        curve=[CurvePoint.model_validate(p) for p in curve],
        final_train=hist[-1] if hist else None,
        gate=rsae.gate_summary(),
        objective=ft.objective,
        kl_coefficient=kl.beta if kl is not None else None,
        kl_sequences=ft.kl_sequences if kl is not None else None,
    )


def _train(state, ctx, sae, coefficient, loss_fn, groups, l0_target, curve, run: int, n_runs: int):
    """``train_sae`` of ``sae`` (run 0: the RSAE, checkpoint "finetune-rsae"; run 1: the control) with the stage's
    settings: the same tokens, batch order (seed), steps, optimiser and L0 target for both. Returns the history."""
    ft = state.cfg.finetune
    return train_sae(
        sae,
        state.train,
        steps=ft.steps,
        batch_size=ft.batch_size,
        lr=ft.lr,
        l1_coefficient=coefficient,
        loss_fn=loss_fn,
        seed=state.cfg.seed + 1,
        device=state.device,
        param_groups=groups,
        l0_target=l0_target,
        l0_gain=ft.l0_gain,
        l0_max_step=ft.l0_max_step,
        on_step=_on_step(state, ctx, sae, curve, run, n_runs),
        checkpoint=ctx.train_checkpoint("finetune-rsae" if run == 0 else "finetune-control", curve),
        path=ft.step_path,
    )
